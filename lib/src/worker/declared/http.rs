//! HTTP tasks: the task's JSON object POSTed to an endpoint, the answer's
//! JSON body as the result. Connections are pooled per worker.

use super::output::{self, BODY_EXCERPT, Captured, MAX_OUTPUT};
use crate::config::{ConfigError, HttpDecl};
use crate::worker::{TaskContext, TaskError, TaskOutcome};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Per-request timeout when the declaration sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Header naming the task.
pub const TASK_HEADER: &str = "x-taskstack-task";
/// Header carrying the task id.
pub const TASK_ID_HEADER: &str = "x-taskstack-task-id";
/// Header with the Unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-taskstack-timestamp";
/// Header with `sha256=<hex HMAC-SHA256 of timestamp then body>`.
pub const SIGNATURE_HEADER: &str = "x-taskstack-signature";

type Inner = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// The worker's pooled HTTP client, made on first use (inside the runtime).
#[derive(Debug, Clone, Default)]
pub struct Client(Arc<OnceLock<Inner>>);

impl Client {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self) -> &Inner {
        self.0.get_or_init(|| {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            c.set_connect_timeout(Some(Duration::from_secs(10)));
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(c)
        })
    }
}

/// A declared endpoint, resolved: its signing key read.
#[derive(Debug)]
pub struct Endpoint {
    url: hyper::Uri,
    shown: String,
    timeout: Duration,
    key: Option<ring::hmac::Key>,
    client: Client,
}

impl Endpoint {
    pub fn resolve(task: &str, decl: &HttpDecl, client: Client) -> Result<Self, ConfigError> {
        let bad = |key: &str, reason: String| {
            ConfigError::Load(format!("task `{task}`: key `{key}`: {reason}"))
        };
        let url: hyper::Uri = decl
            .url
            .as_str()
            .parse()
            .map_err(|e| bad("http", format!("{e}")))?;
        let key = match &decl.secret_file {
            None => None,
            Some(path) => {
                let raw = std::fs::read(path).map_err(|e| {
                    bad(
                        "secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let secret = raw.strip_suffix(b"\n").unwrap_or(&raw);
                let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
                if secret.is_empty() {
                    return Err(bad("secret_file", format!("{} is empty", path.display())));
                }
                Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
            }
        };
        Ok(Self {
            url,
            shown: crate::secret::redact_url(decl.url.as_str()),
            timeout: decl.timeout.unwrap_or(DEFAULT_TIMEOUT),
            key,
            client,
        })
    }
}

/// `sha256=<hex>` of HMAC-SHA256(key, timestamp ‖ body).
pub fn signature(key: &ring::hmac::Key, timestamp: &str, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(timestamp.as_bytes());
    ctx.update(body);
    let tag = ctx.sign();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256=");
    for b in tag.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The delay a `Retry-After` value asks for: seconds or an HTTP date.
fn retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(s).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or_default())
}

/// POSTs `body` for the task of `ctx` and maps the answer.
pub async fn run(ep: Arc<Endpoint>, ctx: TaskContext, body: Vec<u8>) -> TaskOutcome {
    let header = |v: &str| {
        HeaderValue::from_bytes(v.as_bytes()).map_err(|_| {
            output::failure(
                "InvalidRequest",
                format!("{v:?} cannot be sent in a header"),
            )
        })
    };
    let mut req = hyper::Request::post(ep.url.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(TASK_HEADER, header(&ctx.name)?)
        .header(TASK_ID_HEADER, header(&ctx.id)?);
    if let Some(key) = &ep.key {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        req = req
            .header(SIGNATURE_HEADER, header(&signature(key, &ts, &body))?)
            .header(TIMESTAMP_HEADER, header(&ts)?);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| output::failure("InvalidRequest", e.to_string()))?;
    let exchange = async {
        let resp = ep.client.get().request(req).await.map_err(|e| {
            TaskError::retry(format!(
                "POST {}: {}",
                ep.shown,
                crate::http_client::chain(&e)
            ))
        })?;
        let status = resp.status();
        let wait = resp.headers().get(RETRY_AFTER).and_then(retry_after);
        let body = Limited::new(resp.into_body(), MAX_OUTPUT)
            .collect()
            .await
            .map(|b| b.to_bytes());
        Ok::<_, TaskError>((status, wait, body))
    };
    let (status, wait, body) = match tokio::time::timeout(ep.timeout, exchange).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(TaskError::retry(format!(
                "POST {}: no answer within {}",
                ep.shown,
                humantime::format_duration(ep.timeout)
            )));
        }
    };
    answer(
        &ep.shown,
        status.as_u16(),
        wait,
        body.map_err(|e| e.to_string()),
    )
}

/// The outcome of an answer (see the README's "Program and HTTP tasks").
fn answer(
    shown: &str,
    status: u16,
    wait: Option<Duration>,
    body: Result<Bytes, String>,
) -> TaskOutcome {
    if matches!(status, 429 | 502 | 503 | 504) {
        return Err(TaskError::Retry {
            reason: format!("POST {shown} answered {status}"),
            countdown: wait,
        });
    }
    let body = match body {
        Ok(b) => b,
        Err(e) if (200..300).contains(&status) => {
            return Err(output::failure(
                "InvalidOutput",
                format!(
                    "POST {shown} answered {status} but its body could not be read within {} MiB: {e}",
                    MAX_OUTPUT >> 20
                ),
            ));
        }
        Err(e) => Bytes::from(format!("(body unreadable: {e})")),
    };
    if (200..300).contains(&status) {
        let c = Captured {
            total: body.len() as u64,
            bytes: body.to_vec(),
        };
        return output::parse_output(&c, "the answer's body").map_err(|m| {
            output::failure(
                "InvalidOutput",
                format!("POST {shown} answered {status}: {m}"),
            )
        });
    }
    let text = String::from_utf8_lossy(&body);
    Err(output::failure(
        "HTTPError",
        format!(
            "POST {shown} answered {status}: {}",
            output::excerpt(text.trim(), BODY_EXCERPT)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(b: &str) -> Result<Bytes, String> {
        Ok(Bytes::from(b.to_owned()))
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(answer("u", 200, None, ok("{\"a\":1}")), Ok(json!({"a": 1})));
        assert_eq!(answer("u", 204, None, ok("")), Ok(serde_json::Value::Null));
        let bad = answer("u", 200, None, ok("<html>"));
        assert!(
            matches!(bad, Err(TaskError::Fail(ref e)) if e.exc_type == "InvalidOutput"),
            "{bad:?}"
        );
        for s in [429, 502, 503, 504] {
            let r = answer("u", s, Some(Duration::from_secs(7)), ok(""));
            assert_eq!(
                r,
                Err(TaskError::Retry {
                    reason: format!("POST u answered {s}"),
                    countdown: Some(Duration::from_secs(7))
                })
            );
        }
        let r = answer("u", 422, None, ok(&"x".repeat(5000)));
        let Err(TaskError::Fail(e)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(e.exc_type, "HTTPError");
        assert!(
            e.message.contains("422") && e.message.len() < 1200,
            "{}",
            e.message
        );
        assert!(matches!(
            answer("u", 500, None, ok("boom")),
            Err(TaskError::Fail(_))
        ));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(
            retry_after(&HeaderValue::from_static("12")),
            Some(Duration::from_secs(12))
        );
        let past = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(retry_after(&past), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_then_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, "what do ya want ", b"for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
