//! Dead letters with a RabbitMQ broker: the records live in the result
//! backend, on Redis in the Redis backend's layout or in PostgreSQL's
//! `taskstack_dead_letters` (so the web API lists, requeues and discards
//! them through the same routes); requeueing publishes the original
//! message back to its RabbitMQ queue with a confirm.
//!
//! Requeue order: the records are first removed from their list (atomically,
//! so two operators never requeue one twice), then published; a publish
//! that fails puts the records back. A process killed between the removal
//! and the confirm loses those records' requeue (the records are gone and
//! the messages were not confirmed); the window is one publish round trip.

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
        let claimed = self
            .side
            .dead_claim(self.usage, queue, &requeueable)
            .await?;
        let msgs: Vec<(&str, &[u8], Option<i64>)> = claimed
            .iter()
            .map(|r| (r.queue_key.as_str(), r.payload.as_bytes(), None))
            .collect();
        if let Err(e) = self.b.publish(&msgs).await {
            for r in claimed.iter().rev() {
                if let Err(back) = self.side.store_dead(r).await {
                    tracing::error!(queue, task_id = ?r.task_id, error = %back, "cannot restore a dead letter whose requeue failed");
                }
            }
            return Err(e);
        }
        Ok(claimed)
    }
}
