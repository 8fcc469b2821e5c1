//! The `/metrics` endpoint the worker and the beat serve.

use tokio_util::sync::CancellationToken;

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
