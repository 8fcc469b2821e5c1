//! The canvas's records in PostgreSQL (RabbitMQ with PostgreSQL results):
//! the follow-ups' sent markers and the chord counters, with the contract
//! of Celery's Redis scripts (`canvas/redis.rs`) that the worker's
//! follow-up code relies on:
//!
//! - a header task's outcome counts once per task id and header index;
//! - the step that records the last one takes the claim to send the body
//!   (a token, `CLAIM_EXPIRES_SECS`), so one worker sends it; a claim that
//!   expired (its worker died) is taken again by a redelivered header task
//!   or the claimant's own extension;
//! - clean-up drops the parts and marks the chord done for
//!   `DONE_EXPIRES_SECS`, so a late duplicate finds it done.
//!
//! Each step is one transaction holding the chord's row lock
//! (`taskstack_chords ... FOR UPDATE`), which is what Redis's single
//! script execution gives. A chord whose row expired (no part for
//! `result_expires`) starts over, as its Redis keys would have expired.

use super::connect::PgError;
use super::records::PgRecords;
use super::store::{client, millis, timed};
use crate::backend::BackendError;
use crate::canvas::FollowUp;
use crate::canvas::redis::{
    CLAIM_EXPIRES_SECS, DONE_EXPIRES_SECS, PUBLISH_CLAIM_SECS, Part, PartOutcome, encode_part,
    parse_parts,
};
use crate::canvas::store::CanvasStore;
use async_trait::async_trait;
use serde_json::Value;
use std::time::Duration;

/// The chord's row, locked, as of now: `(size, claim, claim live)`; a
/// row that expired is reset first (its parts deleted).
const LOCK_CHORD: &str = "SELECT size, claim, COALESCE(claim_expires > clock_timestamp(), false),
        expires_at > clock_timestamp()
    FROM taskstack_chords WHERE namespace = $1 AND group_id = $2 FOR UPDATE";

/// The canvas's records on the records' pool.
#[derive(Debug)]
pub(crate) struct PgCanvas(pub(crate) PgRecords);

struct Chord {
    size: Option<i32>,
    claim: Option<String>,
    claim_live: bool,
}

impl Chord {
    fn live_claim(&self) -> Option<&str> {
        self.claim.as_deref().filter(|_| self.claim_live)
    }
}

fn secs(n: u64) -> f64 {
    n as f64
}

/// Locks the chord's row (created when missing) and reads it; an expired
/// row is reset first.
async fn lock_chord(
    tx: &tokio_postgres::Transaction<'_>,
    ns: &str,
    group_id: &str,
    expires: Duration,
) -> Result<Chord, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO taskstack_chords (namespace, group_id, expires_at)
         VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond')
         ON CONFLICT (namespace, group_id) DO NOTHING",
        &[&ns, &group_id, &millis(expires)],
    )
    .await?;
    let row = tx.query_one(LOCK_CHORD, &[&ns, &group_id]).await?;
    let live: bool = row.get(3);
    if !live {
        tx.execute(
            "DELETE FROM taskstack_chord_parts WHERE namespace = $1 AND group_id = $2",
            &[&ns, &group_id],
        )
        .await?;
        tx.execute(
            "UPDATE taskstack_chords SET size = NULL, claim = NULL, claim_expires = NULL,
                 expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
             WHERE namespace = $1 AND group_id = $2",
            &[&ns, &group_id, &millis(expires)],
        )
        .await?;
        return Ok(Chord {
            size: None,
            claim: None,
            claim_live: false,
        });
    }
    Ok(Chord {
        size: row.get(0),
        claim: row.get(1),
        claim_live: row.get(2),
    })
}

/// Sets the claim to `value` for `secs` seconds.
async fn set_claim(
    tx: &tokio_postgres::Transaction<'_>,
    ns: &str,
    group_id: &str,
    value: &str,
    secs: f64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE taskstack_chords SET claim = $3,
             claim_expires = clock_timestamp() + $4::float8 * interval '1 second'
         WHERE namespace = $1 AND group_id = $2",
        &[&ns, &group_id, &value, &secs],
    )
    .await
    .map(drop)
}

impl PgCanvas {
    /// Runs `f` in one transaction on a pooled connection.
    async fn in_tx<T, F>(&self, op: &'static str, f: F) -> Result<T, BackendError>
    where
        F: for<'t> FnOnce(
                &'t tokio_postgres::Transaction<'t>,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 't>,
            > + Send,
        T: Send,
    {
        let pg = &self.0.pg;
        let e = |e: tokio_postgres::Error| PgError::op(op, &e);
        Ok(timed(pg, op, async {
            let mut client = client(pg, op).await?;
            let tx = client.transaction().await.map_err(e)?;
            let out = f(&tx).await.map_err(e)?;
            tx.commit().await.map_err(e)?;
            Ok(out)
        })
        .await?)
    }
}

#[async_trait]
impl CanvasStore for PgCanvas {
    async fn unsent(&mut self, batch: &[FollowUp]) -> Result<Vec<FollowUp>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = batch.iter().map(|f| f.task_id.as_str()).collect();
        let rows = self
            .0
            .query(
                "read canvas sent markers",
                "SELECT task_id FROM taskstack_canvas_sent
                 WHERE namespace = $1 AND task_id = ANY($2) AND expires_at > clock_timestamp()",
                &[&self.0.namespace, &ids],
            )
            .await?;
        let sent: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(batch
            .iter()
            .filter(|f| !sent.contains(&f.task_id))
            .cloned()
            .collect())
    }

    async fn mark_sent(&mut self, batch: &[FollowUp], ttl: Duration) -> Result<(), BackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = batch.iter().map(|f| f.task_id.as_str()).collect();
        self.0
            .execute(
                "mark canvas follow-ups sent",
                "INSERT INTO taskstack_canvas_sent (namespace, task_id, expires_at)
                 SELECT $1, id, clock_timestamp() + $3::bigint * interval '1 millisecond'
                 FROM unnest($2::text[]) AS id
                 ON CONFLICT (namespace, task_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                &[&self.0.namespace, &ids, &millis(ttl)],
            )
            .await?;
        Ok(())
    }

    async fn set_size(
        &mut self,
        group_id: &str,
        size: usize,
        expires: Duration,
    ) -> Result<(), BackendError> {
        let size = i32::try_from(size).map_err(|_| BackendError::Invalid {
            op: "record chord size",
            detail: format!("{size} header tasks is more than a chord can count"),
        })?;
        let ns = self.0.namespace.clone();
        let group_id = group_id.to_owned();
        self.in_tx("record chord size", move |tx| {
            Box::pin(async move {
                lock_chord(tx, &ns, &group_id, expires).await?;
                tx.execute(
                    "UPDATE taskstack_chords SET size = $3,
                         expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
                     WHERE namespace = $1 AND group_id = $2",
                    &[&ns, &group_id, &size, &millis(expires)],
                )
                .await
                .map(drop)
            })
        })
        .await
    }

    async fn part_return(
        &mut self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        state: &str,
        result: &Value,
        expires: Duration,
    ) -> Result<PartOutcome, BackendError> {
        let ns = self.0.namespace.clone();
        let group_id = group_id.to_owned();
        let part = encode_part(task_id, state, result);
        // No index sorts last, as Redis's `+inf` score.
        let idx = group_index;
        let member = format!(
            "{task_id}:{}",
            group_index.map_or_else(|| "+inf".to_owned(), |i| i.to_string())
        );
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.in_tx("record chord part", move |tx| {
            Box::pin(async move {
                let chord = lock_chord(tx, &ns, &group_id, expires).await?;
                if chord.live_claim() == Some("done") {
                    return Ok(PartOutcome::AlreadyDone);
                }
                tx.execute(
                    "INSERT INTO taskstack_chord_parts (namespace, group_id, member, idx, part)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (namespace, group_id, member) DO NOTHING",
                    &[&ns, &group_id, &member, &idx, &part],
                )
                .await?;
                let ready: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM taskstack_chord_parts
                         WHERE namespace = $1 AND group_id = $2",
                        &[&ns, &group_id],
                    )
                    .await?
                    .get(0);
                tx.execute(
                    "UPDATE taskstack_chords
                     SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                     WHERE namespace = $1 AND group_id = $2",
                    &[&ns, &group_id, &millis(expires)],
                )
                .await?;
                let total = chord.size.map(i64::from);
                if total == Some(ready) && chord.live_claim().is_none() {
                    set_claim(tx, &ns, &group_id, &token, secs(CLAIM_EXPIRES_SECS)).await?;
                    return Ok(PartOutcome::Claimed {
                        token,
                        total: ready,
                    });
                }
                Ok(PartOutcome::Pending { ready, total })
            })
        })
        .await
    }

    async fn parts(&mut self, group_id: &str) -> Result<Vec<Part>, BackendError> {
        let rows = self
            .0
            .query(
                "read chord parts",
                "SELECT part FROM taskstack_chord_parts
                 WHERE namespace = $1 AND group_id = $2 ORDER BY idx NULLS LAST, part",
                &[&self.0.namespace, &group_id],
            )
            .await?;
        let raw: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        parse_parts(&raw)
    }

    async fn extend_claim(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError> {
        let ns = self.0.namespace.clone();
        let (group_id, token) = (group_id.to_owned(), token.to_owned());
        self.in_tx("extend chord claim", move |tx| {
            Box::pin(async move {
                let chord = lock_chord(tx, &ns, &group_id, Duration::ZERO).await?;
                let ours = chord.live_claim() == Some(token.as_str());
                let free = chord.live_claim().is_none() && chord.size.is_some();
                if ours || free {
                    set_claim(tx, &ns, &group_id, &token, secs(PUBLISH_CLAIM_SECS)).await?;
                }
                Ok(ours || free)
            })
        })
        .await
    }

    async fn cleanup(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError> {
        let ns = self.0.namespace.clone();
        let (group_id, token) = (group_id.to_owned(), token.to_owned());
        self.in_tx("clean up chord", move |tx| {
            Box::pin(async move {
                let chord = lock_chord(tx, &ns, &group_id, Duration::ZERO).await?;
                if chord.live_claim() != Some(token.as_str()) {
                    return Ok(false);
                }
                tx.execute(
                    "DELETE FROM taskstack_chord_parts WHERE namespace = $1 AND group_id = $2",
                    &[&ns, &group_id],
                )
                .await?;
                let done = secs(DONE_EXPIRES_SECS);
                tx.execute(
                    "UPDATE taskstack_chords SET size = NULL, claim = 'done',
                         claim_expires = clock_timestamp() + $3::float8 * interval '1 second',
                         expires_at = clock_timestamp() + $3::float8 * interval '1 second'
                     WHERE namespace = $1 AND group_id = $2",
                    &[&ns, &group_id, &done],
                )
                .await?;
                Ok(true)
            })
        })
        .await
    }

    async fn drop_size(&mut self, group_id: &str) -> Result<(), BackendError> {
        self.0
            .execute(
                "drop chord size",
                "UPDATE taskstack_chords SET size = NULL WHERE namespace = $1 AND group_id = $2",
                &[&self.0.namespace, &group_id],
            )
            .await?;
        Ok(())
    }
}

impl PgRecords {
    /// Deletes up to `max` expired canvas markers and chords (with their
    /// parts); how many rows went.
    pub(crate) async fn sweep_canvas(&self, max: usize) -> Result<u64, PgError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let markers = self
            .execute(
                "delete expired canvas markers",
                "DELETE FROM taskstack_canvas_sent WHERE ctid IN (
                     SELECT ctid FROM taskstack_canvas_sent
                     WHERE expires_at <= clock_timestamp() LIMIT $1)",
                &[&max],
            )
            .await?;
        let chords = self
            .execute(
                "delete expired chords",
                "WITH gone AS (
                     DELETE FROM taskstack_chords WHERE ctid IN (
                         SELECT ctid FROM taskstack_chords
                         WHERE expires_at <= clock_timestamp() LIMIT $1 FOR UPDATE SKIP LOCKED)
                     RETURNING namespace, group_id)
                 DELETE FROM taskstack_chord_parts p USING gone
                 WHERE p.namespace = gone.namespace AND p.group_id = gone.group_id",
                &[&max],
            )
            .await?;
        Ok(markers + chords)
    }
}
