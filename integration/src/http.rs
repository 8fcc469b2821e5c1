//! HTTP for tests: taskstack's client (`taskstack::http_client`, hyper)
//! with a test-sized timeout, async and blocking.

use anyhow::Result;
use serde_json::Value;
use std::time::Duration;
use taskstack::http_client::{self, Response};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn send(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Response> {
    Ok(http_client::request(addr, method, path, token, body, TIMEOUT).await?)
}

/// One request with a JSON body (or none); returns the status and the
/// JSON body (Null when empty or not JSON).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let r = send(addr, method, path, token, body).await?;
    Ok((r.status, r.json()))
}

/// Like [`request`], returning the body as text.
pub async fn request_text(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, String)> {
    let r = send(addr, method, path, token, body).await?;
    Ok((r.status, r.text()))
}

/// `GET path` from a synchronous test (a runtime of its own): the status
/// and the body as text.
pub fn get_blocking(addr: &str, path: &str) -> Result<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(send(addr, "GET", path, None, None))?;
    Ok((r.status, r.text()))
}
