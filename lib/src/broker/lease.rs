//! Worker leases and heartbeat records.
//!
//! A worker's lease (a score in one ZSET) covers every message it holds. The
//! worker renews it every third of its length; when it stops renewing (it
//! was killed, or lost Redis), any live worker's reaper puts its messages
//! back at the front of their queues.

use super::pool::on_lane;
use super::{BrokerError, Lane, REAP};
use crate::proto::Keys;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a worker tells the world about itself; stored with an expiry of one
/// lease length, so a record that exists is a live worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerRecord {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub queues: Vec<String>,
    pub tasks: Vec<String>,
    pub concurrency: usize,
    pub started_at: String,
    pub last_heartbeat: String,
    pub processed: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub version: String,
    /// Where this worker serves Prometheus `/metrics` (`ip:port` as bound:
    /// with the default setting, a free port when 9101 was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

fn deadline(lease: Duration) -> i64 {
    super::now_ms() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

fn record_ttl_ms(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis())
        .unwrap_or(u64::MAX)
        .max(1000)
}

/// Takes the lease, names the landing list's source queue and writes the
/// first heartbeat. Returns whether the lease was newly created (false on a
/// renewal that found it alive).
pub(crate) async fn heartbeat(
    lane: &mut Lane,
    keys: &Keys,
    record: &WorkerRecord,
    landing_source: &str,
    lease: Duration,
) -> Result<bool, BrokerError> {
    let json = serde_json::to_string(record).map_err(|e| BrokerError::Reply {
        op: "heartbeat",
        detail: e.to_string(),
    })?;
    let mut p = redis::pipe();
    p.cmd("ZADD")
        .arg(keys.leases())
        .arg(deadline(lease))
        .arg(&record.id)
        .cmd("HSET")
        .arg(keys.landing_sources())
        .arg(&record.id)
        .arg(landing_source)
        .ignore()
        .cmd("SET")
        .arg(keys.worker(&record.id))
        .arg(json)
        .arg("PX")
        .arg(record_ttl_ms(lease))
        .ignore()
        // The held counts and sequences live while the worker does
        // (fetch.lua gives them an expiry when it creates them; see
        // `Keys::held_counts` and `Keys::held_seqs`).
        .cmd("PEXPIRE")
        .arg(keys.held_counts(&record.id))
        .arg(super::consume::held_count_ttl_ms(lease))
        .ignore()
        .cmd("PEXPIRE")
        .arg(keys.held_seqs(&record.id))
        .arg(super::consume::held_count_ttl_ms(lease))
        .ignore();
    let (added,): (i64,) = on_lane!(&mut *lane, "heartbeat", |c| p.query_async(c))?;
    Ok(added == 1)
}

/// How long a task marked started in a reaped worker's in-flight hash keeps
/// its revocation refused (it may still be running there): a day, longer
/// than the STARTED record it stands in for would last by default
/// (`result_expires`, an hour), since a reaper does not know that setting.
pub(crate) const ORPHAN_START_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Restores the messages of every worker whose lease expired before `now_ms`.
/// Returns (workers reaped, messages restored).
pub(crate) async fn reap(
    lane: &mut Lane,
    keys: &Keys,
    now_ms: i64,
) -> Result<(u64, u64), BrokerError> {
    let mut inv = REAP.prepare_invoke();
    inv.key(keys.leases())
        .key(keys.landing_sources())
        .arg(now_ms)
        .arg(keys.inflight_prefix())
        .arg(keys.landing_prefix())
        .arg(keys.worker_prefix())
        .arg(100)
        .arg(keys.started_prefix())
        .arg(u64::try_from(ORPHAN_START_TTL.as_millis()).unwrap_or(u64::MAX))
        .arg(keys.running_prefix())
        .arg(keys.held_counts_prefix())
        .arg(keys.held_seqs_prefix())
        .arg(keys.hold_queues_prefix())
        .arg(crate::proto::keys::HOLD_SLOT_UNIT);
    on_lane!(&mut *lane, "reap", |c| inv.invoke_async(c))
}

/// Ends a worker's lease at once and hands back anything it still holds.
/// Returns the number of messages handed back.
pub(crate) async fn release(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
) -> Result<u64, BrokerError> {
    let leases = keys.leases();
    on_lane!(&mut *lane, "release lease", |c| redis::cmd("ZADD")
        .arg(&leases)
        .arg(0)
        .arg(worker_id)
        .query_async::<()>(c))?;
    // Score 0 sorts first, so this reaps our lease (and any other expired one).
    let (_, restored) = reap(lane, keys, 0).await?;
    Ok(restored)
}

/// Reads the heartbeat records of every live worker.
pub async fn live_workers(lane: &mut Lane, keys: &Keys) -> Result<Vec<WorkerRecord>, BrokerError> {
    let ids: Vec<String> = on_lane!(&mut *lane, "list workers", |c| redis::cmd("ZRANGEBYSCORE")
        .arg(keys.leases())
        .arg(super::now_ms())
        .arg("+inf")
        .query_async(c))?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let record_keys: Vec<String> = ids.iter().map(|id| keys.worker(id)).collect();
    let raw: Vec<Option<String>> = on_lane!(&mut *lane, "read workers", |c| redis::cmd("MGET")
        .arg(&record_keys)
        .query_async(c))?;
    Ok(raw
        .into_iter()
        .flatten()
        .filter_map(|s| serde_json::from_str(&s).ok())
        .collect())
}

/// Reads one worker's heartbeat record, if it is alive.
pub async fn worker_record(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
) -> Result<Option<WorkerRecord>, BrokerError> {
    let key = keys.worker(worker_id);
    let raw: Option<String> = on_lane!(&mut *lane, "read worker", |c| redis::cmd("GET")
        .arg(&key)
        .query_async(c))?;
    raw.map(|s| {
        serde_json::from_str(&s).map_err(|e| BrokerError::Reply {
            op: "read worker",
            detail: e.to_string(),
        })
    })
    .transpose()
}
