//! The queue lists a worker process holds messages from, each with a slot
//! that its hold numbers carry (see [`crate::proto::keys::HOLD_SLOT_UNIT`]),
//! so a hold is the message alone and still names its queue.

use super::BrokerError;
use crate::proto::keys::{HOLD_SLOT_UNIT, HOLD_SLOTS};

/// Append-only: a list keeps its slot for the life of the process, so a
/// hold taken before remote control changed the queues still names its
/// queue. `json` is what `fetch.lua` writes to the worker's
/// [`crate::proto::Keys::hold_queues`].
#[derive(Debug, Clone, Default)]
pub struct HoldQueues {
    keys: Vec<String>,
    json: String,
}

impl HoldQueues {
    /// The slot of each of `queue_keys`, giving a slot to a list seen for
    /// the first time. Fails when the process would hold messages from
    /// more than [`HOLD_SLOTS`] lists.
    pub fn slots(&mut self, queue_keys: &[String]) -> Result<Vec<u64>, BrokerError> {
        let mut grew = false;
        let mut out = Vec::with_capacity(queue_keys.len());
        for k in queue_keys {
            let slot = match self.keys.iter().position(|known| known == k) {
                Some(i) => i,
                None => {
                    if self.keys.len() as u64 >= HOLD_SLOTS {
                        return Err(BrokerError::Reply {
                            op: "fetch",
                            detail: format!(
                                "this worker process has held messages from {HOLD_SLOTS} queue \
                                 lists (a queue has one per priority bucket), the most one \
                                 process can: restart it to serve {k:?}"
                            ),
                        });
                    }
                    self.keys.push(k.clone());
                    grew = true;
                    self.keys.len() - 1
                }
            };
            out.push(slot as u64);
        }
        if grew || self.json.is_empty() {
            self.json = serde_json::to_string(&self.keys).unwrap_or_default();
        }
        Ok(out)
    }

    /// Every list given a slot, slot 0 first.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The JSON array of every list given a slot, slot 0 first.
    pub fn json(&self) -> &str {
        &self.json
    }
}

/// The hold number of the `n`-th message a process takes, from the list
/// in `slot`.
pub fn hold_number(slot: u64, n: u64) -> u64 {
    slot * HOLD_SLOT_UNIT + n
}

/// The take counter of a hold number.
#[cfg(test)]
pub fn take_counter(hold: u64) -> u64 {
    hold % HOLD_SLOT_UNIT
}

/// The largest take counter: hold numbers stay below 2^53 (Lua's numbers
/// are exact up to there).
pub const MAX_TAKE_COUNTER: u64 = HOLD_SLOT_UNIT - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::keys::hold_slot;

    #[test]
    fn a_list_keeps_its_slot_and_new_lists_are_appended() {
        let mut q = HoldQueues::default();
        let a = ["a".to_owned(), "b".to_owned()];
        assert_eq!(q.slots(&a).expect("slots"), [0, 1]);
        assert_eq!(q.json(), r#"["a","b"]"#);
        let b = ["c".to_owned(), "a".to_owned()];
        assert_eq!(q.slots(&b).expect("slots"), [2, 0]);
        assert_eq!(q.json(), r#"["a","b","c"]"#);
        // Control characters (Celery's priority separator) are escaped, so
        // the JSON never holds a newline.
        let p = ["a\x06\x163".to_owned()];
        assert_eq!(q.slots(&p).expect("slots"), [3]);
        assert!(q.json().contains(r"a\u0006\u00163"));
        assert!(!q.json().contains('\n'));
    }

    #[test]
    fn the_slot_limit_is_an_error_naming_the_list() {
        let mut q = HoldQueues::default();
        let many: Vec<String> = (0..HOLD_SLOTS).map(|i| format!("q{i}")).collect();
        q.slots(&many).expect("slots up to the limit");
        let err = q.slots(&["late".to_owned()]).expect_err("one too many");
        assert!(err.to_string().contains("\"late\""), "{err}");
        // The lists already given slots still resolve.
        assert_eq!(q.slots(&many[..1]).expect("known"), [0]);
    }

    #[test]
    fn hold_numbers_round_trip_and_stay_exact_in_lua() {
        let top = hold_number(HOLD_SLOTS - 1, MAX_TAKE_COUNTER);
        assert!(top < 1 << 53, "{top}");
        assert_eq!(hold_slot(top), HOLD_SLOTS - 1);
        assert_eq!(take_counter(top), MAX_TAKE_COUNTER);
        assert_eq!(hold_number(0, 7), 7);
        assert_eq!(hold_slot(hold_number(3, 7)), 3);
    }
}
