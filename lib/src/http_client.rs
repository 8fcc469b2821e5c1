//! One HTTP/1.1 request with a deadline, through hyper's client
//! (hyper-util's legacy `Client`): the web's `healthcheck`, `stackctl
//! verify` and the tests all talk HTTP through this, so framing
//! (content-length, chunked, keep-alive) is hyper's, never hand parsed.
//! Feature `http-client`.

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("{method} http://{addr}{path}: not a valid request: {detail}")]
    Invalid {
        method: String,
        addr: String,
        path: String,
        detail: String,
    },
    #[error("{method} http://{addr}{path}: {detail}")]
    Failed {
        method: String,
        addr: String,
        path: String,
        /// The error and its causes (`connection refused`, ...).
        detail: String,
    },
    #[error("{method} http://{addr}{path}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        addr: String,
        path: String,
        timeout: Duration,
    },
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced, never cut).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; `Null` when it is empty or not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An error with its causes, `: `-separated (hyper's own message is only
/// "client error (Connect)").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Sends `method path` to `addr` (`host:port`, `[v6]:port`) with an
/// optional bearer token and JSON body, and reads the whole answer; the
/// connection, the request and the body together get `timeout`.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let invalid = |detail: String| HttpError::Invalid {
        method: method.to_owned(),
        addr: addr.to_owned(),
        path: path.to_owned(),
        detail,
    };
    let failed = |detail: String| HttpError::Failed {
        method: method.to_owned(),
        addr: addr.to_owned(),
        path: path.to_owned(),
        detail,
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(token) = bearer {
        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match json {
        Some(v) => {
            req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(body)).map_err(|e| invalid(chain(&e)))?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    connector.set_nodelay(true);
    // One request per client: nothing to pool, and no idle connection
    // outlives the call.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| failed(chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(format!("cannot read the answer: {}", chain(&e))))?
            .to_bytes();
        Ok(Response {
            status,
            body: body.to_vec(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout {
            method: method.to_owned(),
            addr: addr.to_owned(),
            path: path.to_owned(),
            timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A server that answers every connection with `answer` (raw bytes),
    /// after reading the request head; its address.
    async fn raw_server(answer: &'static [u8]) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn plain_chunked_and_multibyte_bodies_arrive_whole() {
        let t = Duration::from_secs(5);
        let addr = raw_server(b"HTTP/1.1 202 Accepted\r\ncontent-length: 7\r\n\r\n{\"a\":1}").await;
        let r = request(&addr, "GET", "/", None, None, t)
            .await
            .expect("plain");
        assert_eq!((r.status, r.text().as_str()), (202, "{\"a\":1}"));
        let addr = raw_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n:2}\r\n0\r\n\r\n",
        )
        .await;
        let r = request(&addr, "GET", "/", None, None, t)
            .await
            .expect("chunked");
        assert_eq!((r.status, r.json()), (200, serde_json::json!({"b": 2})));
        // Chunks that split a multi-byte character: bytes, not characters,
        // are framed, and the text is whole.
        let addr = raw_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n\"\xC3\r\n3\r\n\xA9\"\n\r\n0\r\n\r\n",
        )
        .await;
        let r = request(&addr, "GET", "/", None, None, t)
            .await
            .expect("utf-8");
        assert_eq!(r.json(), serde_json::json!("é"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_is_named() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let e = request(
            &addr,
            "GET",
            "/health",
            None,
            None,
            Duration::from_millis(200),
        )
        .await
        .expect_err("no answer");
        assert!(
            matches!(e, HttpError::Timeout { .. }) && e.to_string().contains("/health"),
            "{e}"
        );
        drop(l);
        let e = request(&addr, "GET", "/", None, None, Duration::from_secs(5))
            .await
            .expect_err("closed");
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
