//! The beat's leader lock, instance records and slot ledger in PostgreSQL,
//! for a broker that is not Redis (RabbitMQ): the same contract as the
//! Redis lock (`beat/lock.rs`) and `beat_publish.lua`.
//!
//! Lock times are PostgreSQL's `clock_timestamp()`, one clock for every
//! beat instance. A slot is published as a transactional outbox: one
//! transaction locks the leader lock's row, checks that it holds our value
//! and outlives the margin, checks and advances the entry's ledger row and
//! adds the message to `taskstack_beat_outbox`; the caller then publishes
//! the outbox to the broker with confirms and deletes what was confirmed.
//! So a recorded slot's message always reaches the broker (one left in the
//! outbox goes out at the next publication, by this leader or the next),
//! and a slot is recorded once.

use super::connect::PgError;
use super::records::PgRecords;
use super::store::{client, millis, timed};
use crate::backend::traits::{Acquired, BackendError, LockLease, SlotOutcome, SlotPublish};
use std::time::Duration;

/// `clock_timestamp()` + `$n` ms.
fn until(n: u8) -> String {
    format!("clock_timestamp() + ${n}::bigint * interval '1 millisecond'")
}

impl PgRecords {
    /// Takes the lock when nobody holds it (or the holder's expired).
    pub(crate) async fn lock_acquire(
        &self,
        value: &str,
        ttl: Duration,
    ) -> Result<Acquired, PgError> {
        let op = "take beat lock";
        let sql = format!(
            "INSERT INTO taskstack_beat_lock AS l (namespace, value, expires_at)
             VALUES ($1, $2, {})
             ON CONFLICT (namespace) DO UPDATE SET value = EXCLUDED.value,
                 expires_at = EXCLUDED.expires_at
             WHERE l.expires_at <= clock_timestamp()
             RETURNING value",
            until(3)
        );
        let taken = self
            .execute(op, &sql, &[&self.namespace, &value, &millis(ttl)])
            .await?;
        if taken == 1 {
            return Ok(Acquired::Yes);
        }
        Ok(Acquired::HeldBy(self.lock_lease().await?.map(|l| l.value)))
    }

    /// Extends the lock to `ttl` from now while it holds `value`.
    pub(crate) async fn lock_renew(&self, value: &str, ttl: Duration) -> Result<bool, PgError> {
        let sql = format!(
            "UPDATE taskstack_beat_lock SET expires_at = {}
             WHERE namespace = $1 AND value = $2 AND expires_at > clock_timestamp()",
            until(3)
        );
        let n = self
            .execute(
                "renew beat lock",
                &sql,
                &[&self.namespace, &value, &millis(ttl)],
            )
            .await?;
        Ok(n == 1)
    }

    /// Deletes the lock while it holds `value`.
    pub(crate) async fn lock_release(&self, value: &str) -> Result<bool, PgError> {
        let n = self
            .execute(
                "release beat lock",
                "DELETE FROM taskstack_beat_lock
                 WHERE namespace = $1 AND value = $2 AND expires_at > clock_timestamp()",
                &[&self.namespace, &value],
            )
            .await?;
        Ok(n == 1)
    }

    /// The lock's value and the milliseconds it has left, while it is held.
    pub(crate) async fn lock_lease(&self) -> Result<Option<LockLease>, PgError> {
        let rows = self
            .query(
                "read beat lock",
                "SELECT value,
                        (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint
                 FROM taskstack_beat_lock
                 WHERE namespace = $1 AND expires_at > clock_timestamp()",
                &[&self.namespace],
            )
            .await?;
        Ok(rows.first().map(|r| LockLease {
            value: r.get(0),
            remaining_ms: Some(r.get(1)),
        }))
    }

    /// Stores a beat instance's heartbeat record for `ttl` (expired ones
    /// of the namespace are deleted on the way).
    pub(crate) async fn announce(
        &self,
        instance_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<(), PgError> {
        let sql = format!(
            "WITH gone AS (DELETE FROM taskstack_beat_instances
                 WHERE namespace = $1 AND expires_at <= clock_timestamp() AND instance_id <> $2)
             INSERT INTO taskstack_beat_instances (namespace, instance_id, record, expires_at)
             VALUES ($1, $2, $3, {})
             ON CONFLICT (namespace, instance_id) DO UPDATE SET
                 record = EXCLUDED.record, expires_at = EXCLUDED.expires_at",
            until(4)
        );
        self.execute(
            "beat heartbeat",
            &sql,
            &[&self.namespace, &instance_id, &record, &millis(ttl)],
        )
        .await
        .map(drop)
    }

    /// Deletes a beat instance's heartbeat record.
    pub(crate) async fn forget_instance(&self, instance_id: &str) -> Result<(), PgError> {
        self.execute(
            "delete beat heartbeat",
            "DELETE FROM taskstack_beat_instances WHERE namespace = $1 AND instance_id = $2",
            &[&self.namespace, &instance_id],
        )
        .await
        .map(drop)
    }

    /// A live beat instance's heartbeat record.
    pub(crate) async fn instance(&self, instance_id: &str) -> Result<Option<String>, PgError> {
        let rows = self
            .query(
                "read beat heartbeat",
                "SELECT record FROM taskstack_beat_instances
                 WHERE namespace = $1 AND instance_id = $2 AND expires_at > clock_timestamp()",
                &[&self.namespace, &instance_id],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    /// Checks the lock and the ledger and, in the same transaction, records
    /// the slot and adds the message to the outbox for `slot.queue`.
    pub(crate) async fn publish_slot(&self, slot: SlotPublish<'_>) -> Result<SlotOutcome, PgError> {
        let op = "publish beat slot";
        let e = |e: tokio_postgres::Error| PgError::op(op, &e);
        timed(&self.pg, op, async {
            let mut client = client(&self.pg, op).await?;
            let tx = client.transaction().await.map_err(e)?;
            // The lock's row is locked: a renewal, a release or a takeover
            // waits for this transaction, so the check holds until commit.
            let lock = tx
                .query_opt(
                    "SELECT value,
                        (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint
                     FROM taskstack_beat_lock
                     WHERE namespace = $1 AND expires_at > clock_timestamp() FOR UPDATE",
                    &[&self.namespace],
                )
                .await
                .map_err(e)?;
            let Some(lock) = lock.filter(|r| r.get::<_, &str>(0) == slot.lock_value) else {
                return Ok(SlotOutcome::NotLeader);
            };
            let pttl_ms: i64 = lock.get(1);
            if pttl_ms <= millis(slot.margin) {
                return Ok(SlotOutcome::LeaseTooShort { pttl_ms });
            }
            let last = tx
                .query_opt(
                    "SELECT slot_ms FROM taskstack_beat_slots
                     WHERE namespace = $1 AND entry = $2 FOR UPDATE",
                    &[&self.namespace, &slot.entry],
                )
                .await
                .map_err(e)?
                .map(|r| r.get::<_, i64>(0));
            if let Some(last_ms) = last.filter(|l| *l >= slot.slot_ms) {
                return Ok(SlotOutcome::AlreadyPublished { last_ms });
            }
            tx.execute(
                "INSERT INTO taskstack_beat_slots (namespace, entry, slot_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (namespace, entry) DO UPDATE SET slot_ms = EXCLUDED.slot_ms",
                &[&self.namespace, &slot.entry, &slot.slot_ms],
            )
            .await
            .map_err(e)?;
            tx.execute(
                "INSERT INTO taskstack_beat_outbox (namespace, queue, message) VALUES ($1, $2, $3)",
                &[&self.namespace, &slot.queue, &slot.payload],
            )
            .await
            .map_err(e)?;
            tx.commit().await.map_err(e)?;
            Ok(SlotOutcome::Published)
        })
        .await
    }

    /// Publishes the outbox, oldest first, with `publish` and deletes what
    /// it confirmed (`(queue, message)` pairs), in one transaction that holds the rows
    /// (`FOR UPDATE SKIP LOCKED`): two drains at once (a former leader
    /// waking up beside the new one) never both publish a row. A failed
    /// publish rolls back and leaves the rows for the next drain.
    pub(crate) async fn drain_outbox<F, Fut>(&self, publish: F) -> Result<(), BackendError>
    where
        F: FnOnce(Vec<(String, String)>) -> Fut + Send,
        Fut: Future<Output = Result<(), BackendError>> + Send,
    {
        let op = "publish beat outbox";
        let e = |e: tokio_postgres::Error| BackendError::from(PgError::op(op, &e));
        let mut client = client(&self.pg, op).await?;
        let tx = client.transaction().await.map_err(e)?;
        let rows = tx
            .query(
                "SELECT id, queue, message FROM taskstack_beat_outbox
                 WHERE namespace = $1 ORDER BY id FOR UPDATE SKIP LOCKED",
                &[&self.namespace],
            )
            .await
            .map_err(e)?;
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        publish(rows.iter().map(|r| (r.get(1), r.get(2))).collect()).await?;
        tx.execute(
            "DELETE FROM taskstack_beat_outbox WHERE namespace = $1 AND id = ANY($2)",
            &[&self.namespace, &ids],
        )
        .await
        .map_err(e)?;
        tx.commit().await.map_err(e)
    }

    /// The last published slot of each named entry.
    pub(crate) async fn last_slots(&self, entries: &[&str]) -> Result<Vec<Option<i64>>, PgError> {
        let names: Vec<&str> = entries.to_vec();
        let rows = self
            .query(
                "read beat slots",
                "SELECT s.slot_ms FROM unnest($2::text[]) WITH ORDINALITY AS e(entry, o)
                 LEFT JOIN taskstack_beat_slots s
                   ON s.namespace = $1 AND s.entry = e.entry
                 ORDER BY e.o",
                &[&self.namespace, &names],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
