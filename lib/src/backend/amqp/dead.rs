//! Dead letters with a RabbitMQ broker: the records live in the result
//! backend, on Redis in the Redis backend's layout or in PostgreSQL's
//! `taskstack_dead_letters` (so the web API lists, requeues and discards
//! them through the same routes); requeueing publishes the original
//! message back to its RabbitMQ queue with a confirm.
//!
//! Requeue order: the chosen messages are first published (every one
//! confirmed by RabbitMQ), then their records removed (each at most once,
//! atomically). Nothing is lost: a failed publish leaves every record in
//! place, and a process killed between the confirm and the removal leaves
//! records whose messages are already back in their queue, so requeueing
//! them again sends a second copy. Two requests requeueing the same record
//! at the same moment both publish it and only one removes it (the other
//! logs it); the copy that arrives after the first one's task finished is
//! acknowledged without running. At least once, as everywhere on RabbitMQ.

use super::AmqpSession;
use crate::backend::traits::{BackendError, DeadLetters};
use crate::broker::{
    BrokerError, DeadLetter, DeadLetterAction, DeadSelection, Lane, PickedDeadLetter, on_lane,
};
use crate::proto::Keys;
use async_trait::async_trait;

/// Appends `record` to its queue's dead letters (newest first).
pub(super) async fn store(
    lane: &mut Lane,
    keys: &Keys,
    record: &DeadLetter,
) -> Result<(), BrokerError> {
    let json = serde_json::to_string(record).map_err(|e| BrokerError::Reply {
        op: "dead-letter",
        detail: e.to_string(),
    })?;
    let key = keys.dead_letters(&record.queue);
    on_lane!(&mut *lane, "dead-letter", |c| redis::cmd("LPUSH")
        .arg(&key)
        .arg(&json)
        .query_async::<()>(c))
}

#[async_trait]
impl DeadLetters for AmqpSession {
    async fn page(
        &mut self,
        queue: &str,
        count: usize,
    ) -> Result<(Vec<DeadLetter>, u64), BackendError> {
        self.side.dead_page(self.usage, queue, count).await
    }

    async fn pick(
        &mut self,
        queue: &str,
        selection: &DeadSelection,
    ) -> Result<Vec<PickedDeadLetter>, BackendError> {
        self.side.dead_pick(self.usage, queue, selection).await
    }

    async fn apply(
        &mut self,
        queue: &str,
        action: DeadLetterAction,
        picked: &[PickedDeadLetter],
    ) -> Result<Vec<DeadLetter>, BackendError> {
        if action == DeadLetterAction::Discard {
            return self.side.dead_claim(self.usage, queue, picked).await;
        }
        // Only text messages can run again (as on Redis, the others stay).
        let requeueable: Vec<PickedDeadLetter> = picked
            .iter()
            .filter(|p| p.record.payload_base64.is_none() && !p.record.payload.is_empty())
            .cloned()
            .collect();
        let msgs: Vec<(&str, &[u8], Option<i64>)> = requeueable
            .iter()
            .map(|p| {
                (
                    p.record.queue_key.as_str(),
                    p.record.payload.as_bytes(),
                    None,
                )
            })
            .collect();
        self.b.publish(&msgs).await?;
        let claimed = self
            .side
            .dead_claim(self.usage, queue, &requeueable)
            .await?;
        if claimed.len() < requeueable.len() {
            tracing::warn!(
                queue,
                published = requeueable.len(),
                removed = claimed.len(),
                "dead letters requeued by another request at the same time: their messages were sent twice"
            );
        }
        Ok(claimed)
    }
}
