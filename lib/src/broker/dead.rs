//! Dead letters: messages that cannot or must not run again, kept with the
//! reason and the original payload for inspection and requeueing.

use super::pool::on_lane;
use super::{BrokerError, DEAD_LETTER, Lane};
use crate::proto::Keys;
use serde::{Deserialize, Serialize};

/// One dead-letter record (stored as JSON, newest first, per queue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Why the message was dead-lettered, for humans.
    pub reason: String,
    /// The queue it was taken from.
    pub queue: String,
    /// The exact list key (queue and priority bucket), to requeue it.
    pub queue_key: String,
    pub task_id: Option<String>,
    pub task: Option<String>,
    /// The original message, byte for byte.
    pub payload: String,
    pub worker: String,
    /// When it was dead-lettered (RFC 3339).
    pub at: String,
}

/// Appends `record` to its queue's dead-letter list and settles the hold.
pub(crate) async fn dead_letter(
    lane: &mut Lane,
    keys: &Keys,
    worker_id: &str,
    seq: u64,
    record: &DeadLetter,
) -> Result<(), BrokerError> {
    let json = serde_json::to_string(record).map_err(|e| BrokerError::Reply {
        op: "dead-letter",
        detail: e.to_string(),
    })?;
    let mut inv = DEAD_LETTER.prepare_invoke();
    inv.key(keys.dead_letters(&record.queue))
        .key(keys.inflight(worker_id))
        .arg(json)
        .arg(seq);
    on_lane!(&mut *lane, "dead-letter", |c| inv.invoke_async::<()>(c))
}

/// Reads up to `count` dead letters of `queue`, newest first.
pub async fn dead_letters(
    lane: &mut Lane,
    keys: &Keys,
    queue: &str,
    count: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let key = keys.dead_letters(queue);
    let stop = isize::try_from(count).unwrap_or(isize::MAX) - 1;
    let raw: Vec<String> = on_lane!(&mut *lane, "read dead letters", |c| redis::cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(stop)
        .query_async(c))?;
    raw.iter()
        .map(|s| {
            serde_json::from_str(s).map_err(|e| BrokerError::Reply {
                op: "read dead letters",
                detail: e.to_string(),
            })
        })
        .collect()
}
