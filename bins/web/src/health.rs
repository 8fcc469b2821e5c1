//! `/health` (readiness: the whole stack can do work), `/health/live`
//! (liveness: this process serves) and the `healthcheck` client used by an
//! exec-form Docker HEALTHCHECK.

use crate::error::ErrorBody;
use crate::state::{AppState, read_snapshot};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use taskstack::backend::Store;
use utoipa::ToSchema;

/// One round trip to a store.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreCheck {
    pub ok: bool,
    /// The round trip, in milliseconds.
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueWorkers {
    pub queue: String,
    pub workers: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkersCheck {
    pub ok: bool,
    /// Live workers on each configured queue.
    pub queues: Vec<QueueWorkers>,
    /// Configured queues no live worker consumes.
    pub missing: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BeatLeader {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub since: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BeatCheck {
    pub ok: bool,
    /// Whether this deployment expects a beat (`web_expect_beat`).
    pub required: bool,
    pub leader: Option<BeatLeader>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    /// Redis: the broker, or with a RabbitMQ broker the result backend's
    /// server (results, task states, worker records); absent with a
    /// RabbitMQ broker and PostgreSQL results, where no Redis is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<StoreCheck>,
    /// The PostgreSQL result store (`result_backend = "postgresql://..."`);
    /// absent when results live on Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgresql: Option<StoreCheck>,
    /// The RabbitMQ broker (`broker_url = "amqp://..."`): a passive
    /// declaration of the default queue; absent with a Redis broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<StoreCheck>,
    pub workers: WorkersCheck,
    pub beat: BeatCheck,
}

/// The readiness report.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok` or `fail`.
    pub status: String,
    /// The names of the failed checks.
    pub failed: Vec<String>,
    pub checks: Checks,
}

impl StoreCheck {
    /// A round trip's outcome: its latency, or why it failed.
    fn of<E: std::fmt::Display>(r: Result<std::time::Duration, E>) -> Self {
        match r {
            Ok(d) => Self {
                ok: true,
                latency_ms: Some(d.as_secs_f64() * 1000.0),
                error: None,
            },
            Err(e) => Self {
                ok: false,
                latency_ms: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// One round trip to each store the backend works with: `(redis,
/// postgresql, rabbitmq)`.
async fn check_stores(
    state: &AppState,
) -> (Option<StoreCheck>, Option<StoreCheck>, Option<StoreCheck>) {
    let (mut redis, mut postgresql, mut rabbitmq) = (None, None, None);
    for (store, r) in state.backend().pings().await {
        let slot = match store {
            Store::Redis => &mut redis,
            Store::PostgreSql => &mut postgresql,
            Store::RabbitMq => &mut rabbitmq,
        };
        *slot = Some(StoreCheck::of(r));
    }
    (redis, postgresql, rabbitmq)
}

async fn check_workers(state: &AppState) -> WorkersCheck {
    match read_snapshot(state.backend().as_ref()).await {
        Ok(s) => {
            let queues: Vec<QueueWorkers> = state
                .settings
                .queues
                .iter()
                .map(|q| QueueWorkers {
                    queue: q.clone(),
                    workers: s.workers_on(q) as u64,
                })
                .collect();
            let missing: Vec<String> = queues
                .iter()
                .filter(|q| q.workers == 0)
                .map(|q| q.queue.clone())
                .collect();
            WorkersCheck {
                ok: missing.is_empty(),
                queues,
                missing,
                error: None,
            }
        }
        Err(e) => WorkersCheck {
            ok: false,
            queues: Vec::new(),
            missing: state.settings.queues.clone(),
            error: Some(e.to_string()),
        },
    }
}

async fn check_beat(state: &AppState) -> BeatCheck {
    let required = state.settings.expect_beat;
    match state.beat_leader().await {
        Ok(h) => BeatCheck {
            ok: !required || h.is_some(),
            required,
            error: (required && h.is_none())
                .then(|| "no beat instance holds the leader lock".to_owned()),
            leader: h.map(|h| BeatLeader {
                id: h.id,
                host: h.host,
                pid: h.pid,
                since: h.since,
            }),
        },
        Err(e) => BeatCheck {
            ok: !required,
            required,
            leader: None,
            error: Some(e.to_string()),
        },
    }
}

/// Readiness: every store the backend works with (Redis, a PostgreSQL
/// result store, a RabbitMQ broker) answers, every configured queue has a live worker and,
/// when a beat is expected, a beat leader holds the lock.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses(
        (status = 200, description = "Everything needed to do work is up", body = HealthReport),
        (status = 503, description = "Something is missing; `failed` names it", body = HealthReport),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let ((redis, postgresql, rabbitmq), workers, beat) = tokio::join!(
        check_stores(&state),
        check_workers(&state),
        check_beat(&state)
    );
    let failed: Vec<String> = [
        ("rabbitmq", rabbitmq.as_ref().is_none_or(|c| c.ok)),
        ("redis", redis.as_ref().is_none_or(|c| c.ok)),
        ("postgresql", postgresql.as_ref().is_none_or(|c| c.ok)),
        ("workers", workers.ok),
        ("beat", beat.ok),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n.to_owned())
    .collect();
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(HealthReport {
            status: if failed.is_empty() { "ok" } else { "fail" }.into(),
            failed,
            checks: Checks {
                redis,
                postgresql,
                rabbitmq,
                workers,
                beat,
            },
        }),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    pub status: String,
}

/// Liveness: answers as long as the process serves requests.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses((status = 200, description = "The process serves", body = Live))
)]
pub async fn live() -> Json<Live> {
    Json(Live {
        status: "ok".into(),
    })
}

/// The fallback for paths that match no route.
pub async fn no_route() -> (StatusCode, Json<ErrorBody>) {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "not_found".into(),
            message: "no such route; see /openapi.json".into(),
            details: None,
        }),
    )
}

/// Where `healthcheck` reaches this process's own listener: loopback for a
/// wildcard address.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /health` on `addr` with a deadline: `Ok(body)` on 200, `Err` with
/// the status and body (or the connection error) otherwise.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let r =
        taskstack::http_client::request(&addr.to_string(), "GET", "/health", None, None, timeout)
            .await
            .map_err(|e| e.to_string())?;
    if r.status == 200 {
        Ok(r.text())
    } else {
        Err(format!("/health answered {}: {}", r.status, r.text()))
    }
}
