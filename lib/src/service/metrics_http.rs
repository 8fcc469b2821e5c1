//! The `/metrics` endpoint the worker and the beat serve.

use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the metrics endpoint cannot listen.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr} ({key}): {source}; give each process on this host \
     its own port, leave {key} at its default (a taken port then falls back to a free one), \
     or set it to off"
)]
pub struct BindError {
    key: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the metrics endpoint at `addr` (the value of `key`). With
/// `fallback` (the key has its default value) a port already in use, e.g.
/// by another worker on this host, is replaced by a free port on the same
/// address, with a WARN naming it; the caller announces the bound address.
/// A port the operator chose is used or the start fails.
pub async fn bind(
    key: &'static str,
    addr: SocketAddr,
    fallback: bool,
) -> Result<TcpListener, BindError> {
    let err = |source| BindError { key, addr, source };
    match TcpListener::bind(addr).await {
        Err(e) if fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .await
                .map_err(err)?;
            let bound = listener.local_addr().map_err(err)?;
            tracing::warn!(
                taken = %addr,
                serving = %bound,
                "{key}: port {} is taken (another process on this host); serving /metrics on \
                 port {} instead (announced in the heartbeat record)",
                addr.port(),
                bound.port()
            );
            Ok(listener)
        }
        r => r.map_err(err),
    }
}

/// Content type of the Prometheus text format the `render` closures produce.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text (prometheus-client's encoder).
pub const OPENMETRICS_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` (the body `render` returns, as `content_type`) on
/// `listener` until `stop` is cancelled.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    content_type: &'static str,
    render: F,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, content_type)], render()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
