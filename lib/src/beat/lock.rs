//! The leader lock: one Redis key whose value says who leads, with a random
//! token. Taken with `SET NX PX`; renewed (`beat_renew.lua`) and released
//! (`beat_release.lua`) only by scripts that compare the whole value, so an
//! instance can never extend or delete a lock another instance took.

use crate::broker::{BrokerError, Lane, on_lane};
use crate::proto::Keys;
use redis::Script;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;

static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/beat_renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/beat_release.lua")));

/// Who holds the lock: the JSON value of [`Keys::beat_lock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The beat instance (`<host>.<pid>.<tag>`).
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// When this holder took the lock (RFC 3339).
    pub since: String,
    /// Random per acquisition: two terms of the same instance differ.
    pub token: String,
}

impl LockHolder {
    /// A fresh claim for `id`, with a new random token.
    pub fn new(id: &str, host: &str) -> Self {
        Self {
            id: id.to_owned(),
            host: host.to_owned(),
            pid: std::process::id(),
            since: crate::proto::envelope::format_time(chrono::Utc::now()),
            token: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The exact string stored in Redis (compared byte for byte by the
    /// scripts).
    pub fn value(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a lock value; `None` when it is not one of ours.
    pub fn parse(raw: &str) -> Option<Self> {
        serde_json::from_str(raw).ok()
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Tries to take the lock with `value`. `Ok(None)`: taken, we lead.
/// `Ok(Some(current))`: someone holds it (its raw value, when it still
/// existed a moment later).
pub(crate) async fn try_acquire(
    lane: &mut Lane,
    keys: &Keys,
    value: &str,
    ttl: Duration,
) -> Result<Option<Option<String>>, BrokerError> {
    let key = keys.beat_lock();
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg(&key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms(ttl))
        .cmd("GET")
        .arg(&key);
    let (set, current): (Option<String>, Option<String>) =
        on_lane!(&mut *lane, "take beat lock", |c| p.query_async(c))?;
    Ok(if set.is_some() { None } else { Some(current) })
}

/// Extends the lock to `ttl` if it still holds `value`. False: lost.
pub(crate) async fn renew(
    lane: &mut Lane,
    keys: &Keys,
    value: &str,
    ttl: Duration,
) -> Result<bool, BrokerError> {
    let mut inv = RENEW.prepare_invoke();
    inv.key(keys.beat_lock()).arg(value).arg(ttl_ms(ttl));
    let renewed: i64 = on_lane!(&mut *lane, "renew beat lock", |c| inv.invoke_async(c))?;
    Ok(renewed == 1)
}

/// Deletes the lock if it still holds `value`. False: it was not ours.
pub(crate) async fn release(
    lane: &mut Lane,
    keys: &Keys,
    value: &str,
) -> Result<bool, BrokerError> {
    let mut inv = RELEASE.prepare_invoke();
    inv.key(keys.beat_lock()).arg(value);
    let released: i64 = on_lane!(&mut *lane, "release beat lock", |c| inv.invoke_async(c))?;
    Ok(released == 1)
}

/// Who leads now, if anyone (for health checks and operators).
pub async fn holder(lane: &mut Lane, keys: &Keys) -> Result<Option<LockHolder>, BrokerError> {
    let raw: Option<String> = on_lane!(&mut *lane, "read beat lock", |c| redis::cmd("GET")
        .arg(keys.beat_lock())
        .query_async(c))?;
    Ok(raw.as_deref().and_then(LockHolder::parse))
}
