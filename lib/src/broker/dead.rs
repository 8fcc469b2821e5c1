//! Dead letters: messages that cannot or must not run again, kept with the
//! reason and the original payload for inspection and requeueing.

use super::pool::on_lane;
use super::{BrokerError, DEAD_LETTER, DEAD_MOVE, Lane};
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
    /// The original message, byte for byte, when it is UTF-8 text (every
    /// Celery message is) and was sent to the worker; empty otherwise (see
    /// `payload_base64` and `payload_key`).
    pub payload: String,
    /// The original message in base64, only when it is not UTF-8 text. Such
    /// a record can be discarded but not requeued (`dead_move.lua` leaves
    /// it listed): it could never run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// A message over `max_message_size` is never sent to the worker: it
    /// is kept apart, byte for byte, in this STRING key (requeueing reads
    /// it back; requeue and discard delete it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_key: Option<String>,
    /// The size of the message kept at `payload_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<u64>,
    pub worker: String,
    /// When it was dead-lettered (RFC 3339).
    pub at: String,
}

impl DeadLetter {
    /// [`DeadLetter::set_payload`] without copying `raw` when it is text.
    pub fn set_payload_owned(&mut self, raw: Vec<u8>) {
        match String::from_utf8(raw) {
            Ok(text) => {
                self.payload = text;
                self.payload_base64 = None;
            }
            Err(e) => self.set_payload(e.as_bytes()),
        }
    }

    /// Stores `raw` as [`DeadLetter::payload`] when it is UTF-8 text, else
    /// as [`DeadLetter::payload_base64`], so no byte is lost either way.
    pub fn set_payload(&mut self, raw: &[u8]) {
        match std::str::from_utf8(raw) {
            Ok(text) => {
                text.clone_into(&mut self.payload);
                self.payload_base64 = None;
            }
            Err(_) => {
                use base64::Engine as _;
                self.payload.clear();
                self.payload_base64 = Some(base64::engine::general_purpose::STANDARD.encode(raw));
            }
        }
    }
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
        .key(keys.held_counts(worker_id))
        .key(keys.running(worker_id))
        .key(keys.held_seqs(worker_id))
        .key(keys.hold_queues(worker_id))
        .arg(&json)
        .arg(seq)
        .arg(record.payload_key.as_deref().unwrap_or(""))
        .arg(record.task_id.as_deref().unwrap_or(""))
        .arg(crate::proto::keys::HOLD_SLOT_UNIT);
    on_lane!(&mut *lane, "dead-letter", |c| inv.invoke_async::<()>(c))?;
    lane.recycle_after(json.len());
    Ok(())
}

/// Reads up to `count` dead letters of `queue`, newest first, and how many
/// the queue has in all, in one round trip.
pub async fn dead_letters(
    lane: &mut Lane,
    keys: &Keys,
    queue: &str,
    count: usize,
) -> Result<(Vec<DeadLetter>, u64), BrokerError> {
    let key = keys.dead_letters(queue);
    let stop = isize::try_from(count).unwrap_or(isize::MAX) - 1;
    let mut p = redis::pipe();
    p.cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(stop)
        .cmd("LLEN")
        .arg(&key);
    let (raw, total): (Vec<String>, u64) =
        on_lane!(&mut *lane, "read dead letters", |c| p.query_async(c))?;
    let items = raw
        .iter()
        .map(|s| {
            serde_json::from_str(s).map_err(|e| BrokerError::Reply {
                op: "read dead letters",
                detail: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((items, total))
}

/// Which dead letters of a queue an operator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadSelection {
    /// The oldest `limit` (all of them when there are fewer).
    Oldest { limit: usize },
    /// Those of these task ids (a task dead-lettered twice matches twice).
    TaskIds(Vec<String>),
}

/// What to do with chosen dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Push the original message back to the queue (and priority bucket) it
    /// was taken from, as it was.
    Requeue,
    /// Delete it for good.
    Discard,
}

/// A dead letter as stored (the exact text, which identifies it for
/// [`move_dead_letters`]) and decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PickedDeadLetter {
    pub raw: String,
    pub record: DeadLetter,
}

/// Reads the dead letters of `queue` that `selection` names, oldest first.
/// Records that are not valid JSON are only ever chosen by
/// [`DeadSelection::Oldest`] (they carry no task id).
pub async fn pick_dead_letters(
    lane: &mut Lane,
    keys: &Keys,
    queue: &str,
    selection: &DeadSelection,
) -> Result<Vec<PickedDeadLetter>, BrokerError> {
    let key = keys.dead_letters(queue);
    let start = match selection {
        DeadSelection::Oldest { limit } => -isize::try_from(*limit).unwrap_or(isize::MAX),
        DeadSelection::TaskIds(_) => 0,
    };
    let mut raw: Vec<String> = on_lane!(&mut *lane, "read dead letters", |c| redis::cmd("LRANGE")
        .arg(&key)
        .arg(start)
        .arg(-1)
        .query_async(c))?;
    raw.reverse(); // the list is newest first
    let wanted = |r: &DeadLetter| match selection {
        DeadSelection::Oldest { .. } => true,
        DeadSelection::TaskIds(ids) => r.task_id.as_ref().is_some_and(|id| ids.contains(id)),
    };
    Ok(raw
        .into_iter()
        .filter_map(|raw| {
            let record = serde_json::from_str::<DeadLetter>(&raw).ok()?;
            wanted(&record).then_some(PickedDeadLetter { raw, record })
        })
        .collect())
}

/// Requeues or discards the given dead letters of `queue`, each atomically;
/// returns those acted on (a record another operator moved meanwhile is
/// skipped, never requeued twice).
pub async fn move_dead_letters(
    lane: &mut Lane,
    keys: &Keys,
    queue: &str,
    action: DeadLetterAction,
    picked: &[PickedDeadLetter],
) -> Result<Vec<DeadLetter>, BrokerError> {
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = DEAD_MOVE.prepare_invoke();
    inv.key(keys.dead_letters(queue)).arg(match action {
        DeadLetterAction::Requeue => "requeue",
        DeadLetterAction::Discard => "discard",
    });
    for p in picked {
        inv.arg(&p.raw);
    }
    let moved: Vec<String> = on_lane!(&mut *lane, "move dead letters", |c| inv.invoke_async(c))?;
    // A multiset: two identical records are two dead letters.
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for m in &moved {
        *left.entry(m.as_str()).or_default() += 1;
    }
    Ok(picked
        .iter()
        .filter(|p| match left.get_mut(p.raw.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .map(|p| p.record.clone())
        .collect())
}
