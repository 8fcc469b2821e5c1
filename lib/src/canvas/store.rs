//! Where the canvas keeps its records when the broker is not the store
//! that sends follow-ups atomically (RabbitMQ): the follow-ups' sent
//! markers and the chord counters. On Redis with Celery's own scripts
//! ([`super::redis`], so Python Celery workers count into the same chords);
//! in PostgreSQL with the same contract (`backend/postgres/canvas.rs`).

use super::FollowUp;
use super::redis::{self as chord, Part, PartOutcome};
use crate::backend::BackendError;
use crate::broker::{Broker, Lane};
use async_trait::async_trait;
use serde_json::Value;
use std::time::Duration;

/// The canvas's records: sent markers, chord sizes, parts and claims.
#[async_trait]
pub trait CanvasStore: Send {
    /// The follow-ups of `batch` not marked sent yet.
    async fn unsent(&mut self, batch: &[FollowUp]) -> Result<Vec<FollowUp>, BackendError>;
    /// Marks `batch` sent, the markers kept `ttl`.
    async fn mark_sent(&mut self, batch: &[FollowUp], ttl: Duration) -> Result<(), BackendError>;
    /// Records a chord's size before its header is sent.
    async fn set_size(
        &mut self,
        group_id: &str,
        size: usize,
        expires: Duration,
    ) -> Result<(), BackendError>;
    /// Records one header task's outcome (once per task id and index) and,
    /// when the chord is complete, takes the claim to send its body in the
    /// same step.
    async fn part_return(
        &mut self,
        group_id: &str,
        task_id: &str,
        group_index: Option<i64>,
        state: &str,
        result: &Value,
        expires: Duration,
    ) -> Result<PartOutcome, BackendError>;
    /// The header's outcomes, in `group_index` order.
    async fn parts(&mut self, group_id: &str) -> Result<Vec<Part>, BackendError>;
    /// Extends this worker's claim for publishing the body; false when it
    /// was lost.
    async fn extend_claim(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError>;
    /// Drops the chord's records and marks it done; false when the claim
    /// was lost meanwhile.
    async fn cleanup(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError>;
    /// Forgets a failed chord's size, so a late header copy does not fail
    /// it again.
    async fn drop_size(&mut self, group_id: &str) -> Result<(), BackendError>;
}

/// The canvas's records on a Redis (the result backend's pool).
#[derive(Debug)]
pub struct RedisCanvas {
    lane: Lane,
    namespace: String,
}

impl RedisCanvas {
    pub fn new(broker: &Broker) -> Self {
        Self {
            lane: broker.backend_pool().lane(),
            namespace: broker.keys().namespace().to_owned(),
        }
    }
}

#[async_trait]
impl CanvasStore for RedisCanvas {
    async fn unsent(&mut self, batch: &[FollowUp]) -> Result<Vec<FollowUp>, BackendError> {
        chord::unsent(&mut self.lane, &self.namespace, batch).await
    }
    async fn mark_sent(&mut self, batch: &[FollowUp], ttl: Duration) -> Result<(), BackendError> {
        chord::mark_sent(&mut self.lane, &self.namespace, batch, ttl).await
    }
    async fn set_size(
        &mut self,
        group_id: &str,
        size: usize,
        expires: Duration,
    ) -> Result<(), BackendError> {
        chord::set_size(&mut self.lane, group_id, size, expires).await
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
        chord::part_return(
            &mut self.lane,
            group_id,
            task_id,
            group_index,
            state,
            result,
            expires,
        )
        .await
    }
    async fn parts(&mut self, group_id: &str) -> Result<Vec<Part>, BackendError> {
        chord::parts(&mut self.lane, group_id).await
    }
    async fn extend_claim(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError> {
        chord::extend_claim(&mut self.lane, group_id, token).await
    }
    async fn cleanup(&mut self, group_id: &str, token: &str) -> Result<bool, BackendError> {
        chord::cleanup(&mut self.lane, group_id, token).await
    }
    async fn drop_size(&mut self, group_id: &str) -> Result<(), BackendError> {
        chord::drop_size(&mut self.lane, group_id).await
    }
}
