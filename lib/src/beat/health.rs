//! `taskstack-beat healthcheck`, and what it reads: the state file the beat
//! writes at start (who runs here), the heartbeat record each instance keeps
//! in Redis while its loop runs, and the leader lock. Needs no shell and no
//! port.

use super::lock::{LockHolder, holder};
use crate::broker::{Broker, BrokerError, Lane, on_lane};
use crate::proto::Keys;
use crate::service::state::StatePath;
use serde::{Deserialize, Serialize};

/// A beat instance's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Standby,
}

/// What a beat instance tells the world about itself; stored with an expiry
/// (see [`Keys::beat_instance`]), so a record that exists is a live loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub role: Role,
    /// The leader as last seen by this instance (its id), if any.
    pub leader: Option<String>,
    pub started_at: String,
    pub last_seen: String,
    pub version: String,
    /// Where this instance serves Prometheus `/metrics` (`ip:port` as bound:
    /// with the default setting, a free port when 9102 was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// Reads one instance's heartbeat record, if fresh.
pub async fn instance_record(
    lane: &mut Lane,
    keys: &Keys,
    id: &str,
) -> Result<Option<InstanceRecord>, BrokerError> {
    let raw: Option<String> = on_lane!(&mut *lane, "read beat heartbeat", |c| redis::cmd("GET")
        .arg(keys.beat_instance(id))
        .query_async(c))?;
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

fn describe(h: &LockHolder) -> String {
    format!(
        "{} (host {}, pid {}, since {})",
        h.id, h.host, h.pid, h.since
    )
}

/// Healthy when every beat recorded at `at` (one per process on this host
/// by default) runs, Redis answers, and
/// the instance either holds the leader lock or is a standby whose loop is
/// alive (fresh heartbeat). Ok says which; Err says what failed.
pub async fn check(at: &StatePath, broker: &Broker) -> Result<String, String> {
    let keys = broker.keys();
    let states = crate::service::state::read_all_live(at, "beat", keys.namespace())?;
    let mut lane = broker.broker_pool().lane();
    let mut healthy = Vec::with_capacity(states.len());
    let unreachable = |e: BrokerError| format!("cannot reach Redis: {e}");
    for s in &states {
        let leader = holder(&mut lane, keys).await.map_err(unreachable)?;
        let record = instance_record(&mut lane, keys, &s.id)
            .await
            .map_err(unreachable)?;
        healthy.push(judge(leader, record, s, "Redis")?);
    }
    Ok(healthy.join("; "))
}

/// [`check`] against the lock and heartbeat records a backend keeps
/// (PostgreSQL with a RabbitMQ broker).
pub async fn check_on(
    at: &StatePath,
    backend: &dyn crate::backend::Backend,
) -> Result<String, String> {
    let states = crate::service::state::read_all_live(at, "beat", backend.namespace())?;
    let mut lock = backend.leader_lock(crate::backend::Use::Request);
    let unreachable = |e: crate::backend::BackendError| format!("cannot reach the store: {e}");
    let mut healthy = Vec::with_capacity(states.len());
    for s in &states {
        let leader = lock.holder().await.map_err(unreachable)?;
        let record = lock.instance(&s.id).await.map_err(unreachable)?;
        healthy.push(judge(
            leader.as_deref().and_then(LockHolder::parse),
            record.and_then(|r| serde_json::from_str(&r).ok()),
            s,
            "the store",
        )?);
    }
    Ok(healthy.join("; "))
}

fn judge(
    leader: Option<LockHolder>,
    record: Option<InstanceRecord>,
    state: &crate::service::state::State,
    store: &str,
) -> Result<String, String> {
    let Some(record) = record.filter(|r| r.pid == state.pid) else {
        return Err(format!(
            "beat {} has no fresh heartbeat in {store} (its loop is stalled or cannot reach \
             {store})",
            state.id
        ));
    };
    match (&leader, record.role) {
        (Some(h), _) if h.id == state.id => Ok(format!("leader: {}", describe(h))),
        (_, Role::Standby) => Ok(match &leader {
            Some(h) => format!("standby {}; leader is {}", state.id, describe(h)),
            None => format!("standby {}; no leader at this moment", state.id),
        }),
        (other, Role::Leader) => Err(format!(
            "beat {} believes it leads but the lock is {}",
            state.id,
            other
                .as_ref()
                .map_or_else(|| "free".to_owned(), |h| format!("held by {}", describe(h)))
        )),
    }
}
