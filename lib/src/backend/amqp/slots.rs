//! The beat's slot ledger with a RabbitMQ broker: a transactional outbox,
//! on the result backend's Redis or in PostgreSQL (`PgSlots`).
//!
//! On Redis, `beat_publish.lua` checks the lock and the ledger and, in the same
//! atomic step, records the slot and pushes the message, here to an outbox
//! list on the result Redis instead of a queue. The outbox is then
//! published to RabbitMQ with confirms and trimmed: so a recorded slot's
//! message always reaches RabbitMQ (a failed publish is retried from the
//! outbox at the next publication, by this or the next leader), and a slot
//! is recorded once. A beat killed between RabbitMQ's confirm and the trim
//! publishes those messages again at its next publication (a duplicate
//! message with the same task id); that window is one round trip.

use super::AmqpBackend;
use super::records::Records;
use crate::backend::postgres::PgRecords;
use crate::backend::traits::{BackendError, SlotLedger, SlotOutcome, SlotPublish, Use};
use crate::beat::publish;
use crate::broker::{Lane, on_lane};
use crate::proto::Keys;
use async_trait::async_trait;
use serde_json::Value;

/// The ledger and outbox on the result backend's Redis.
pub(super) struct AmqpSlots {
    b: AmqpBackend,
    lane: Lane,
    keys: Keys,
}

/// A ledger: on Redis, or in PostgreSQL.
pub(super) fn ledger(b: &AmqpBackend, usage: Use) -> Box<dyn SlotLedger> {
    match &b.records {
        Records::Redis(redis) => {
            let pool = redis.broker().backend_pool();
            let lane = match usage {
                Use::Loop => pool.lane(),
                Use::Request => pool.shared_lane(),
            };
            Box::new(AmqpSlots {
                keys: redis.broker().keys().clone(),
                b: b.clone(),
                lane,
            })
        }
        Records::Pg(pg) => Box::new(PgSlots {
            b: b.clone(),
            pg: pg.clone(),
        }),
    }
}

impl AmqpSlots {
    fn outbox(&self) -> String {
        format!("{}:amqp:beat-outbox", self.keys.namespace())
    }

    /// Publishes what the outbox holds, oldest first, then trims it.
    async fn drain(&mut self) -> Result<(), BackendError> {
        let key = self.outbox();
        let mut range = redis::cmd("LRANGE");
        range.arg(&key).arg(0).arg(-1);
        let mut held: Vec<String> =
            on_lane!(&mut self.lane, "read beat outbox", |c| range.query_async(c))?;
        if held.is_empty() {
            return Ok(());
        }
        // LPUSH: the oldest is last.
        held.reverse();
        let queues: Vec<String> = held
            .iter()
            .map(|m| target_queue(m))
            .collect::<Result<_, _>>()?;
        let msgs: Vec<(&str, &[u8], Option<i64>)> = held
            .iter()
            .zip(&queues)
            .map(|(m, q)| (q.as_str(), m.as_bytes(), None))
            .collect();
        self.b.publish(&msgs).await?;
        // New messages are pushed at the head: drop the published tail.
        let keep = -i64::try_from(held.len()).unwrap_or(i64::MAX) - 1;
        on_lane!(&mut self.lane, "trim beat outbox", |c| redis::cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(keep)
            .query_async::<()>(c))?;
        Ok(())
    }
}

/// The queue a beat message is routed to (its `delivery_info`).
fn target_queue(message: &str) -> Result<String, BackendError> {
    let v: Value = serde_json::from_str(message).map_err(|e| BackendError::Invalid {
        op: "publish beat slot",
        detail: format!("the outbox holds a message that is not JSON: {e}"),
    })?;
    v.pointer("/properties/delivery_info/routing_key")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| BackendError::Invalid {
            op: "publish beat slot",
            detail: "the outbox holds a message without a routing key".into(),
        })
}

#[async_trait]
impl SlotLedger for AmqpSlots {
    async fn publish(&mut self, slot: SlotPublish<'_>) -> Result<SlotOutcome, BackendError> {
        let outbox = self.outbox();
        let outcome = publish::publish_slot(
            &mut self.lane,
            &self.keys,
            SlotPublish {
                queue: &outbox,
                ..slot
            },
        )
        .await?;
        // Also after a refusal: a former leader's unpublished messages go out.
        self.drain().await?;
        Ok(outcome)
    }

    async fn last_slots(&mut self, entries: &[&str]) -> Result<Vec<Option<i64>>, BackendError> {
        Ok(publish::last_slots(&mut self.lane, &self.keys, entries).await?)
    }
}

/// The ledger and outbox in PostgreSQL (`postgres/beat.rs`): the slot is
/// recorded and its message put in the outbox in one transaction; the
/// outbox is then published with confirms and the confirmed rows deleted.
struct PgSlots {
    b: AmqpBackend,
    pg: PgRecords,
}

impl PgSlots {
    /// Publishes what the outbox holds, oldest first, then deletes it
    /// (see [`PgRecords::drain_outbox`]).
    async fn drain(&self) -> Result<(), BackendError> {
        let b = self.b.clone();
        self.pg
            .drain_outbox(move |held| async move {
                let msgs: Vec<(&str, &[u8], Option<i64>)> = held
                    .iter()
                    .map(|(q, m)| (q.as_str(), m.as_bytes(), None))
                    .collect();
                b.publish(&msgs).await
            })
            .await
    }
}

#[async_trait]
impl SlotLedger for PgSlots {
    async fn publish(&mut self, slot: SlotPublish<'_>) -> Result<SlotOutcome, BackendError> {
        let outcome = self.pg.publish_slot(slot).await?;
        // Also after a refusal: a former leader's unpublished messages go out.
        self.drain().await?;
        Ok(outcome)
    }

    async fn last_slots(&mut self, entries: &[&str]) -> Result<Vec<Option<i64>>, BackendError> {
        Ok(self.pg.last_slots(entries).await?)
    }
}
