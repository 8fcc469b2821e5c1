//! What a declared task's program or endpoint produced, read within bounds,
//! and the task outcome it maps to.

use crate::proto::ExceptionInfo;
use crate::worker::{TaskError, TaskOutcome};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest stdout (or HTTP answer) taken as a result; more is refused as
/// `InvalidOutput` (the rest is read and dropped, so the program never
/// blocks on a full pipe).
pub const MAX_OUTPUT: usize = 8 << 20;
/// How much of the end of stderr becomes the traceback.
pub const STDERR_TAIL: usize = 8 << 10;
/// How much of an HTTP error answer is quoted.
pub const BODY_EXCERPT: usize = 1 << 10;

/// The exit code asking for a retry (`EX_TEMPFAIL` of sysexits.h).
pub const EX_TEMPFAIL: i32 = 75;

/// Bytes read from a stream, within a bound.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The kept bytes: the first `limit` (head) or the last `limit` (tail).
    pub bytes: Vec<u8>,
    /// Bytes read in all.
    pub total: u64,
}

impl Captured {
    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

/// Reads `r` to its end keeping its first `limit` bytes.
pub async fn read_head(mut r: impl AsyncRead + Unpin, limit: usize) -> Captured {
    let mut c = Captured::default();
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        c.total += n as u64;
        let room = limit.saturating_sub(c.bytes.len());
        c.bytes.extend_from_slice(&buf[..n.min(room)]);
    }
    c
}

/// Reads `r` to its end keeping its last `limit` bytes.
pub async fn read_tail(mut r: impl AsyncRead + Unpin, limit: usize) -> Captured {
    let mut c = Captured::default();
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        c.total += n as u64;
        c.bytes.extend_from_slice(&buf[..n]);
        if c.bytes.len() > 2 * limit {
            let cut = c.bytes.len() - limit;
            c.bytes.drain(..cut);
        }
    }
    if c.bytes.len() > limit {
        let cut = c.bytes.len() - limit;
        c.bytes.drain(..cut);
    }
    c
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signalled(i32),
}

/// What ended the program early, if anything did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    None,
    /// The soft limit passed: the program got SIGTERM.
    Soft,
    /// The hard limit passed: the program's group was terminated.
    Hard,
}

/// `message` followed by the stderr tail, when there is one.
fn with_stderr(message: String, stderr: &Captured) -> String {
    let tail = String::from_utf8_lossy(&stderr.bytes);
    let tail = tail.trim_end();
    if tail.is_empty() {
        message
    } else if stderr.truncated() {
        format!(
            "{message}\n--- last {} bytes of stderr ---\n{tail}",
            stderr.bytes.len()
        )
    } else {
        format!("{message}\n--- stderr ---\n{tail}")
    }
}

/// A failure recorded as `exc_type` of module `taskstack`.
pub fn failure(exc_type: &str, message: String) -> TaskError {
    TaskError::Fail(ExceptionInfo {
        exc_type: exc_type.into(),
        exc_module: "taskstack".into(),
        message,
    })
}

/// The outcome of a program run: see the README's "Program and HTTP tasks".
pub fn program_outcome(
    ended: Ended,
    limit: Limit,
    stdout: &Captured,
    stderr: &Captured,
) -> TaskOutcome {
    match (limit, ended) {
        (Limit::Hard, _) => {
            let m = "hard time limit exceeded; the program's process group was terminated";
            return Err(TaskError::Fail(ExceptionInfo::celery(
                "TimeLimitExceeded",
                with_stderr(m.into(), stderr),
            )));
        }
        (Limit::Soft, e) if e != Ended::Exited(0) => {
            let m = format!(
                "soft time limit exceeded (SIGTERM sent); the program {}",
                describe(e)
            );
            return Err(TaskError::Fail(ExceptionInfo::celery(
                "SoftTimeLimitExceeded",
                with_stderr(m, stderr),
            )));
        }
        _ => {}
    }
    match ended {
        Ended::Exited(0) => parse_output(stdout, "stdout")
            .map_err(|m| failure("InvalidOutput", with_stderr(m, stderr))),
        Ended::Exited(EX_TEMPFAIL) => {
            let tail = String::from_utf8_lossy(&stderr.bytes);
            let last = tail.trim_end().lines().last().unwrap_or("").to_owned();
            Err(TaskError::retry(if last.is_empty() {
                "the program exited with 75 (EX_TEMPFAIL)".to_owned()
            } else {
                format!("the program exited with 75 (EX_TEMPFAIL): {last}")
            }))
        }
        e => Err(failure(
            "ProcessExitError",
            with_stderr(format!("the program {}", describe(e)), stderr),
        )),
    }
}

fn describe(e: Ended) -> String {
    match e {
        Ended::Exited(c) => format!("exited with status {c}"),
        Ended::Signalled(s) => format!(
            "was killed by signal {s}{}",
            nix::sys::signal::Signal::try_from(s)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
    }
}

/// The result a successful run or answer carries: its JSON (`null` when
/// empty), or why it is not one.
pub fn parse_output(out: &Captured, what: &str) -> Result<Value, String> {
    if out.truncated() {
        return Err(format!(
            "{what} was {} bytes, more than the {} MiB a result may have",
            out.total,
            MAX_OUTPUT >> 20
        ));
    }
    if out.bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.bytes).map_err(|e| {
        let text = String::from_utf8_lossy(&out.bytes);
        format!("{what} is not JSON ({e}): {}", excerpt(&text, 200))
    })
}

/// The first `max` bytes of `s` (at a character boundary), marked when cut.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cap(s: &str) -> Captured {
        Captured {
            bytes: s.as_bytes().to_vec(),
            total: s.len() as u64,
        }
    }

    fn exc(o: TaskOutcome) -> ExceptionInfo {
        match o {
            Err(TaskError::Fail(e)) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn exit_codes_and_output_map_to_outcomes() {
        let none = Captured::default();
        let ok = |out: &str| program_outcome(Ended::Exited(0), Limit::None, &cap(out), &none);
        assert_eq!(ok("{\"a\": 1}\n"), Ok(json!({"a": 1})));
        assert_eq!(ok(""), Ok(Value::Null));
        assert_eq!(ok(" \n"), Ok(Value::Null));
        let e = exc(ok("done!"));
        assert_eq!(
            (e.exc_type.as_str(), e.exc_module.as_str()),
            ("InvalidOutput", "taskstack")
        );
        assert!(e.message.contains("done!"), "{}", e.message);

        let retry = program_outcome(Ended::Exited(75), Limit::None, &none, &cap("db busy\n"));
        assert!(
            matches!(retry, Err(TaskError::Retry { ref reason, countdown: None }) if reason.ends_with("db busy")),
            "{retry:?}"
        );

        let e = exc(program_outcome(
            Ended::Exited(3),
            Limit::None,
            &cap("{}"),
            &cap("Traceback...\nValueError: x\n"),
        ));
        assert_eq!(e.exc_type, "ProcessExitError");
        assert!(
            e.message.contains("status 3") && e.message.contains("ValueError: x"),
            "{}",
            e.message
        );
        let e = exc(program_outcome(
            Ended::Signalled(9),
            Limit::None,
            &none,
            &none,
        ));
        assert!(e.message.contains("signal 9 (SIGKILL)"), "{}", e.message);
    }

    #[test]
    fn limits_name_themselves() {
        let none = Captured::default();
        let e = exc(program_outcome(
            Ended::Signalled(15),
            Limit::Hard,
            &none,
            &none,
        ));
        assert_eq!(
            (e.exc_type.as_str(), e.exc_module.as_str()),
            ("TimeLimitExceeded", "celery.exceptions")
        );
        let e = exc(program_outcome(
            Ended::Exited(1),
            Limit::Soft,
            &none,
            &cap("cleanup\n"),
        ));
        assert_eq!(e.exc_type, "SoftTimeLimitExceeded");
        assert!(e.message.contains("cleanup"), "{}", e.message);
        // A program that wraps up in time after SIGTERM succeeds.
        assert_eq!(
            program_outcome(Ended::Exited(0), Limit::Soft, &cap("1"), &none),
            Ok(json!(1))
        );
    }

    #[tokio::test]
    async fn readers_keep_the_head_or_the_tail_and_count_everything() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let h = read_head(&data[..], 1000).await;
        assert_eq!((h.bytes.as_slice(), h.total), (&data[..1000], 200_000));
        assert!(h.truncated());
        let t = read_tail(&data[..], 1000).await;
        assert_eq!((t.bytes.as_slice(), t.total), (&data[199_000..], 200_000));
        let small = read_tail(&b"abc"[..], 1000).await;
        assert!(!small.truncated());
        let e = parse_output(&h, "stdout").expect_err("too big");
        assert!(e.contains("200000 bytes"), "{e}");
    }
}
