//! Acknowledgements of one consuming channel, coalesced: a settled batch
//! whose delivery tags close a gap is acknowledged with one `basic.ack`
//! `multiple=true` up to its highest such tag, instead of one frame per
//! message (RabbitMQ and the client each handle one frame, not 64).
//!
//! `multiple=true` acknowledges *every* outstanding delivery up to its tag,
//! so it is sent only where every tag at or below it is known settled:
//! RabbitMQ numbers a channel's deliveries 1, 2, 3, … without gaps, and
//! the [`Window`] tracks which of them this process has seen (a delivery
//! still on its way, e.g. behind another queue's consumer, is a gap) and
//! which it has not settled yet. Tags above the first unsettled or unseen
//! one are acknowledged one by one, as before. Frames of one channel are
//! sent by one batch at a time ([`ChannelAcks`]), so a `multiple` never
//! overtakes a single acknowledgement or requeue of a tag it covers (which
//! RabbitMQ would refuse with `PRECONDITION_FAILED`, closing the channel).

use futures_util::future::join_all;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;

/// Seen tags beyond a gap that make the window give up coalescing on its
/// channel (a delivery that never arrives, e.g. one a cancelled consumer
/// dropped, would otherwise keep them forever): from then on each
/// acknowledgement is a frame of its own, as without coalescing.
const MAX_AHEAD: usize = 65_536;

/// What to send for a settled batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// One `basic.ack` with `multiple=true` up to this tag.
    pub(super) multiple: Option<u64>,
    /// One `basic.ack` each.
    pub(super) singles: Vec<u64>,
}

/// Which delivery tags of one channel are seen and which are settled.
#[derive(Debug, Default)]
pub(super) struct Window {
    /// Every tag up to this one has been seen.
    seen_to: u64,
    /// Tags seen beyond `seen_to + 1` (a gap before them).
    seen_ahead: BTreeSet<u64>,
    /// Seen and not settled.
    outstanding: BTreeSet<u64>,
    /// Coalescing given up (see [`MAX_AHEAD`]).
    off: bool,
}

impl Window {
    /// A delivery with `tag` was received.
    pub(super) fn seen(&mut self, tag: u64) {
        if self.off || tag <= self.seen_to {
            return;
        }
        self.outstanding.insert(tag);
        if tag == self.seen_to + 1 {
            self.seen_to = tag;
            while self.seen_ahead.remove(&(self.seen_to + 1)) {
                self.seen_to += 1;
            }
        } else {
            self.seen_ahead.insert(tag);
            if self.seen_ahead.len() > MAX_AHEAD {
                tracing::warn!(
                    "a RabbitMQ delivery tag never arrived; acknowledging one message a frame on this channel"
                );
                *self = Self {
                    off: true,
                    ..Self::default()
                };
            }
        }
    }

    /// Every tag at or below this one is seen and settled.
    fn floor(&self) -> u64 {
        self.outstanding.first().map_or(self.seen_to, |first| {
            self.seen_to.min(first.saturating_sub(1))
        })
    }

    /// Marks `tag` settled by a requeue (its frame sent already).
    pub(super) fn requeued(&mut self, tag: u64) {
        self.outstanding.remove(&tag);
    }

    /// Marks `tags` acknowledged and says how: one `multiple` up to the
    /// highest of them that no unsettled or unseen tag precedes, single
    /// acknowledgements for the rest.
    pub(super) fn acknowledge(&mut self, tags: &[u64]) -> Plan {
        if self.off {
            return Plan {
                multiple: None,
                singles: tags.to_vec(),
            };
        }
        for t in tags {
            self.outstanding.remove(t);
        }
        let floor = self.floor();
        // One multiple for a single tag is no fewer frames: sent singly.
        let covered = tags.iter().filter(|&&t| t <= floor).count();
        let mut plan = Plan::default();
        for &t in tags {
            if t <= floor && covered > 1 {
                plan.multiple = plan.multiple.max(Some(t));
            } else {
                plan.singles.push(t);
            }
        }
        plan
    }
}

/// One consuming channel and its acknowledgement window.
#[derive(Debug)]
pub(super) struct ChannelAcks {
    pub(super) channel: Channel,
    window: std::sync::Mutex<Window>,
    /// Held while a batch's frames are planned and sent.
    sending: tokio::sync::Mutex<()>,
}

impl ChannelAcks {
    pub(super) fn new(channel: Channel) -> Self {
        Self {
            channel,
            window: std::sync::Mutex::new(Window::default()),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn seen(&self, tag: u64) {
        if let Ok(mut w) = self.window.lock() {
            w.seen(tag);
        }
    }

    /// Acknowledges `tags` (each taken from this channel and settled once).
    /// A channel that closed since has given them back to RabbitMQ, which
    /// redelivers them (`redelivered` set): logged, not an error.
    pub(super) async fn ack(&self, tags: &[u64]) {
        let _sending = self.sending.lock().await;
        let plan = match self.window.lock() {
            Ok(mut w) => w.acknowledge(tags),
            Err(_) => Plan {
                multiple: None,
                singles: tags.to_vec(),
            },
        };
        let frames = plan
            .multiple
            .map(|t| (t, true))
            .into_iter()
            .chain(plan.singles.iter().map(|&t| (t, false)))
            .map(|(tag, multiple)| self.channel.basic_ack(tag, BasicAckOptions { multiple }));
        let failed = join_all(frames).await.into_iter().find_map(Result::err);
        if let Some(e) = failed {
            tracing::warn!(error = %e, messages = tags.len(), "cannot acknowledge; RabbitMQ will redeliver the messages");
        }
    }

    /// Gives `tag` back to its queue (`basic.nack` with requeue). It counts
    /// as settled only once the frame is out, so no later `multiple`
    /// acknowledgement can reach RabbitMQ before it.
    pub(super) async fn requeue(&self, tag: u64) {
        let _sending = self.sending.lock().await;
        let opts = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(e) = self.channel.basic_nack(tag, opts).await {
            tracing::warn!(error = %e, "cannot hand back; RabbitMQ requeues it with its channel");
        }
        if let Ok(mut w) = self.window.lock() {
            w.requeued(tag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_AHEAD, Plan, Window};

    fn window(seen: impl IntoIterator<Item = u64>) -> Window {
        let mut w = Window::default();
        for t in seen {
            w.seen(t);
        }
        w
    }

    fn plan(multiple: Option<u64>, singles: &[u64]) -> Plan {
        Plan {
            multiple,
            singles: singles.to_vec(),
        }
    }

    #[test]
    fn a_batch_settled_in_order_is_one_multiple_acknowledgement() {
        let mut w = window(1..=10);
        assert_eq!(w.acknowledge(&[1, 2, 3, 4]), plan(Some(4), &[]));
        assert_eq!(w.acknowledge(&[6, 5]), plan(Some(6), &[]));
    }

    #[test]
    fn tags_after_an_unsettled_one_are_acknowledged_singly() {
        let mut w = window(1..=10);
        // 3 is still running.
        assert_eq!(w.acknowledge(&[1, 2, 4, 5]), plan(Some(2), &[4, 5]));
        // 3 settles: everything up to 6 is settled, so one multiple up to
        // the batch's 6 covers 3 and 6 (4 and 5 are acknowledged already).
        assert_eq!(w.acknowledge(&[3, 6]), plan(Some(6), &[]));
        // 8 is still running.
        assert_eq!(w.acknowledge(&[7, 9]), plan(None, &[7, 9]));
    }

    #[test]
    fn a_multiple_never_covers_a_tag_not_yet_seen() {
        // 3 is on its way (behind another queue's consumer).
        let mut w = window([1, 2, 4, 5]);
        assert_eq!(w.acknowledge(&[1, 2, 4, 5]), plan(Some(2), &[4, 5]));
        w.seen(3);
        assert_eq!(w.acknowledge(&[3]), plan(None, &[3]));
        w.seen(6);
        w.seen(7);
        assert_eq!(w.acknowledge(&[6, 7]), plan(Some(7), &[]));
    }

    #[test]
    fn a_multiple_never_covers_a_tag_being_requeued_or_held() {
        let mut w = window(1..=4);
        // 2 is being handed back: outstanding until its frame is out.
        assert_eq!(w.acknowledge(&[1, 3]), plan(None, &[1, 3]));
        w.requeued(2);
        assert_eq!(w.acknowledge(&[4]), plan(None, &[4]));
        w.seen(5);
        w.seen(6);
        assert_eq!(w.acknowledge(&[5, 6]), plan(Some(6), &[]));
    }

    #[test]
    fn a_tag_that_never_arrives_turns_coalescing_off_rather_than_growing() {
        let mut w = window([1]);
        // 2 never arrives.
        for t in 3..(3 + MAX_AHEAD as u64 + 1) {
            w.seen(t);
        }
        assert!(w.off);
        assert!(w.seen_ahead.is_empty() && w.outstanding.is_empty());
        assert_eq!(w.acknowledge(&[1, 3, 4]), plan(None, &[1, 3, 4]));
    }
}
