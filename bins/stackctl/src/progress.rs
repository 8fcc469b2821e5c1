//! Per-service progress of `up` and `scale`: on a terminal, one line per
//! service redrawn in place; otherwise (CI logs, pipes) a plain line each
//! time a service's state changes.

use std::collections::BTreeMap;
use std::io::Write;

/// Where a service is in `up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for its dependencies.
    Waiting,
    /// Containers being created or started.
    Starting,
    /// Started; waiting for its health check.
    Checking,
    /// Every container healthy (or running, without a health check).
    Ready,
    /// Unhealthy or exited.
    Failed,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Waiting => "waiting",
            Self::Starting => "starting",
            Self::Checking => "health check",
            Self::Ready => "ready",
            Self::Failed => "FAILED",
        })
    }
}

/// Receives progress.
pub trait Progress: Send {
    /// `service` moved to `stage`; `detail` says more (e.g. what it waits for).
    fn stage(&mut self, service: &str, stage: Stage, detail: &str);
    /// A line of its own (a warning, a removed container).
    fn note(&mut self, line: &str);
}

/// Plain lines, one per change, to any writer (stderr by default).
#[derive(Debug)]
pub struct Lines<W: Write + Send> {
    out: W,
    last: BTreeMap<String, (Stage, String)>,
    start: std::time::Instant,
}

impl<W: Write + Send> Lines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            last: BTreeMap::new(),
            start: std::time::Instant::now(),
        }
    }
}

impl<W: Write + Send> Progress for Lines<W> {
    fn stage(&mut self, service: &str, stage: Stage, detail: &str) {
        let now = (stage, detail.to_owned());
        if self.last.get(service) == Some(&now) {
            return;
        }
        self.last.insert(service.to_owned(), now);
        let t = self.start.elapsed().as_secs_f64();
        let sep = if detail.is_empty() { "" } else { ": " };
        let _ = writeln!(self.out, "[{t:6.1}s] {service:<10} {stage}{sep}{detail}");
    }

    fn note(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
    }
}

/// A block of lines, one per service, redrawn in place (ANSI cursor moves)
/// on a terminal.
#[derive(Debug)]
pub struct Live<W: Write + Send> {
    out: W,
    rows: BTreeMap<String, (Stage, String)>,
    order: Vec<String>,
    drawn: usize,
    start: std::time::Instant,
}

impl<W: Write + Send> Live<W> {
    /// `services` in the order they are shown.
    pub fn new(out: W, services: &[String]) -> Self {
        Self {
            out,
            rows: BTreeMap::new(),
            order: services.to_vec(),
            drawn: 0,
            start: std::time::Instant::now(),
        }
    }

    fn redraw(&mut self) {
        let mut s = String::new();
        if self.drawn > 0 {
            s.push_str(&format!("\x1b[{}A", self.drawn));
        }
        let t = self.start.elapsed().as_secs_f64();
        for name in &self.order {
            let (stage, detail) = self
                .rows
                .get(name)
                .cloned()
                .unwrap_or((Stage::Waiting, String::new()));
            let mark = match stage {
                Stage::Ready => "\x1b[32m✔\x1b[0m",
                Stage::Failed => "\x1b[31m✘\x1b[0m",
                _ => "\x1b[33m…\x1b[0m",
            };
            let sep = if detail.is_empty() { "" } else { ": " };
            s.push_str(&format!("\x1b[2K {mark} {name:<10} {stage}{sep}{detail}\n"));
        }
        s.push_str(&format!("\x1b[2K   {t:.1}s\n"));
        self.drawn = self.order.len() + 1;
        let _ = self.out.write_all(s.as_bytes());
        let _ = self.out.flush();
    }
}

impl<W: Write + Send> Progress for Live<W> {
    fn stage(&mut self, service: &str, stage: Stage, detail: &str) {
        if !self.order.iter().any(|s| s == service) {
            self.order.push(service.to_owned());
        }
        self.rows
            .insert(service.to_owned(), (stage, detail.to_owned()));
        self.redraw();
    }

    fn note(&mut self, line: &str) {
        // Above the block: clear it, print, redraw below.
        if self.drawn > 0 {
            let _ = write!(self.out, "\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
        let _ = writeln!(self.out, "{line}");
        self.redraw();
    }
}

/// Records everything (tests).
#[derive(Debug, Default)]
pub struct Recorder {
    pub events: Vec<String>,
}

impl Progress for Recorder {
    fn stage(&mut self, service: &str, stage: Stage, detail: &str) {
        let e = format!("{service} {stage} {detail}").trim_end().to_owned();
        if self.events.last() != Some(&e) {
            self.events.push(e);
        }
    }

    fn note(&mut self, line: &str) {
        self.events.push(line.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_only_on_change() {
        let mut buf = Vec::new();
        {
            let mut p = Lines::new(&mut buf);
            p.stage("redis", Stage::Starting, "");
            p.stage("redis", Stage::Starting, "");
            p.stage("redis", Stage::Ready, "healthy");
            p.note("done");
        }
        let text = String::from_utf8(buf).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].ends_with("redis      ready: healthy"), "{text}");
        assert_eq!(lines[2], "done");
    }

    #[test]
    fn the_terminal_block_is_redrawn_in_place() {
        let mut buf = Vec::new();
        {
            let mut p = Live::new(&mut buf, &["a".to_owned(), "b".to_owned()]);
            p.stage("a", Stage::Ready, "");
            p.stage("b", Stage::Failed, "exited");
        }
        let text = String::from_utf8(buf).expect("utf8");
        assert!(
            text.contains("\x1b[3A"),
            "moves up over the 3 lines drawn: {text:?}"
        );
        assert!(text.contains("b          FAILED: exited"), "{text:?}");
    }
}
