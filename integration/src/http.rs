//! HTTP for tests: `stackctl`'s minimal HTTP/1.1 client (one request per
//! connection, a JSON body in and out) with a test-sized timeout.

use anyhow::Result;
use serde_json::Value;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request with a JSON body (or none); returns the status
/// and the JSON body (Null when empty or not JSON).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    stackctl::http::request(addr, method, path, token, body, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))
}

/// Like [`request`], returning the body as text.
pub async fn request_text(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, String)> {
    stackctl::http::request_text(addr, method, path, token, body, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))
}
