//! Sending a canvas from Rust: chains, chords and links built as Celery's
//! client builds them (`celery/canvas.py`), so taskstack workers and
//! Python Celery workers run them alike.
//!
//! Every step's task id is chosen before anything is sent (Celery's
//! `freeze`), so the caller can follow each step, and a chain's or chord's
//! final result lives under an id known up front.

use crate::backend::Use;
use crate::producer::{Embedded, Producer, ProducerError, TaskRequest};
use crate::proto::TaskResult;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// How long a chord's size record lives when [`ChordOptions`] says nothing:
/// Celery's default `result_expires`, one day.
pub const DEFAULT_CHORD_EXPIRES: Duration = Duration::from_secs(24 * 3600);

/// What [`Producer::send_chain`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSent {
    /// Each step's task id, in the order they run.
    pub task_ids: Vec<String>,
}

impl ChainSent {
    /// The id whose result is the chain's result (the last step's).
    pub fn result_id(&self) -> &str {
        self.task_ids.last().map_or("", String::as_str)
    }
}

/// What [`Producer::send_chord`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChordSent {
    /// The header group's id (Celery's `GroupResult.id`).
    pub group_id: String,
    /// The header tasks' ids, in `group_index` order.
    pub header_ids: Vec<String>,
    /// The body's id: its result is the chord's result.
    pub body_id: String,
}

/// Options of a chord as a whole.
#[derive(Debug, Clone, Default)]
pub struct ChordOptions {
    /// The group id (default: a fresh UUID v4).
    pub group_id: Option<String>,
    /// How long the chord's counters live (default
    /// [`DEFAULT_CHORD_EXPIRES`]; set it to the workers' `result_expires`).
    pub expires: Option<Duration>,
}

fn refuse(option: &'static str, reason: impl Into<String>) -> ProducerError {
    ProducerError::Option {
        option,
        reason: reason.into(),
    }
}

fn secs(d: Duration) -> Value {
    json!(d.as_secs_f64())
}

/// `req` as the signature dict Celery puts in an embed, frozen under `id`.
/// `what` names the place (`link`, `chain step 2`, ...) in errors.
fn signature(what: &str, req: &TaskRequest, id: &str) -> Result<Value, ProducerError> {
    let o = &req.options;
    let unsupported = |option: &'static str| {
        refuse(
            option,
            format!(
                "{what} ({}): a follow-up's message is built by the worker that \
                 sends it, which does not carry `{option}`; send the task on its own instead",
                req.name
            ),
        )
    };
    if o.max_retries.is_some() {
        return Err(unsupported("max_retries"));
    }
    if o.headers.is_some() {
        return Err(unsupported("headers"));
    }
    if req.name.is_empty() {
        return Err(refuse("name", format!("{what}: a task name is required")));
    }
    let mut options = Map::new();
    options.insert("task_id".into(), json!(id));
    if let Some(q) = &o.queue {
        options.insert("queue".into(), json!(q));
    }
    if let Some(p) = o.priority {
        if p > 9 {
            return Err(refuse("priority", format!("{what}: {p} is outside 0..=9")));
        }
        options.insert("priority".into(), json!(p));
    }
    match (o.eta, o.countdown) {
        (Some(eta), _) => {
            options.insert(
                "eta".into(),
                json!(crate::proto::envelope::format_time(eta)),
            );
        }
        (None, Some(d)) => {
            options.insert("countdown".into(), secs(d));
        }
        (None, None) => {}
    }
    if let Some(exp) = o.expires {
        options.insert(
            "expires".into(),
            json!(crate::proto::envelope::format_time(exp)),
        );
    }
    if let Some(t) = o.time_limit {
        options.insert("time_limit".into(), secs(t));
    }
    if let Some(t) = o.soft_time_limit {
        options.insert("soft_time_limit".into(), secs(t));
    }
    let link = signatures("link", &o.link)?;
    if !link.is_empty() {
        options.insert("link".into(), Value::Array(link));
    }
    let link_error = signatures("link_error", &o.link_error)?;
    if !link_error.is_empty() {
        options.insert("link_error".into(), Value::Array(link_error));
    }
    Ok(json!({
        "task": req.name,
        "args": req.args,
        "kwargs": req.kwargs,
        "options": options,
        "subtask_type": null,
        "immutable": o.immutable,
    }))
}

/// `reqs` as the signature dicts of an embed's `callbacks` or `errbacks`.
/// A callback's id is its `task_id` option when given; otherwise the
/// worker derives one from the parent's id when it sends it.
pub(crate) fn signatures(what: &str, reqs: &[TaskRequest]) -> Result<Vec<Value>, ProducerError> {
    reqs.iter()
        .map(|r| {
            let mut sig = signature(what, r, r.options.task_id.as_deref().unwrap_or(""))?;
            if r.options.task_id.is_none()
                && let Some(o) = sig.get_mut("options").and_then(Value::as_object_mut)
            {
                o.remove("task_id");
            }
            Ok(sig)
        })
        .collect()
}

fn frozen_id(req: &TaskRequest) -> String {
    req.options
        .task_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

impl Producer {
    /// With [`Producer::record_pending`]: PENDING records for follow-ups
    /// (chain steps, a chord body), stored BEFORE the first message is
    /// sent so a fast worker's outcome is never overwritten by them.
    async fn record_follow_ups(&self, steps: &[(&TaskRequest, &str)]) -> Result<(), ProducerError> {
        let Some(ttl) = self.pending_ttl() else {
            return Ok(());
        };
        let records: Vec<TaskResult> = steps
            .iter()
            .map(|(req, id)| {
                let queue = req.options.queue.as_deref().unwrap_or(super::DEFAULT_QUEUE);
                TaskResult::pending(id, &req.name, queue)
            })
            .collect();
        if !records.is_empty() {
            self.backend()
                .results(Use::Request)
                .write(&records, ttl)
                .await?;
        }
        Ok(())
    }

    /// Sends `steps` as a Celery chain: the first now, each next one by the
    /// worker that finishes the one before, with that result prepended to
    /// its args (unless [`crate::SendOptions::immutable`]). A failing step stops
    /// the chain (its `link_error` tasks run). Nothing is sent when any
    /// step is invalid.
    pub async fn send_chain(&self, steps: &[TaskRequest]) -> Result<ChainSent, ProducerError> {
        let Some((first, rest)) = steps.split_first() else {
            return Err(refuse("chain", "a chain needs at least one task"));
        };
        let ids: Vec<String> = steps.iter().map(frozen_id).collect();
        let mut chain = Vec::with_capacity(rest.len());
        // Celery pops the next step off the END of the embedded chain.
        for (n, (step, id)) in rest.iter().zip(&ids[1..]).enumerate().rev() {
            // Each step must be sendable on its own too (queue, eta, ...).
            self.prepare_embedded(step, Some(id), Embedded::default())
                .map_err(|e| step_error(n + 2, e))?;
            chain.push(signature(&format!("chain step {}", n + 2), step, id)?);
        }
        let extra = Embedded {
            chain: (!chain.is_empty()).then_some(Value::Array(chain)),
            ..Embedded::default()
        };
        let prepared = self
            .prepare_embedded(first, Some(&ids[0]), extra)
            .map_err(|e| step_error(1, e))?;
        let follow_ups: Vec<(&TaskRequest, &str)> = rest
            .iter()
            .zip(ids[1..].iter().map(String::as_str))
            .collect();
        self.record_follow_ups(&follow_ups).await?;
        self.send_prepared(vec![prepared]).await?;
        Ok(ChainSent { task_ids: ids })
    }

    /// Sends a Celery chord: the `header` tasks now, as one group; when all
    /// of them succeeded, the worker that finishes the last one sends
    /// `body` with the list of their results (in header order) prepended to
    /// its args. A failing header task fails the body with Celery's
    /// `ChordError`. The chord's size is recorded on the result store
    /// before any header task is sent, so no worker can finish the chord
    /// early. Needs Redis: a Redis broker, or Redis results under RabbitMQ
    /// (Celery's chord counters live there).
    pub async fn send_chord(
        &self,
        header: &[TaskRequest],
        body: &TaskRequest,
        options: &ChordOptions,
    ) -> Result<ChordSent, ProducerError> {
        if header.is_empty() {
            return Err(refuse(
                "chord",
                "a chord needs at least one header task (Celery would run the body at once)",
            ));
        }
        let Some(mut store) = self.backend().canvas() else {
            return Err(refuse(
                "chord",
                "chords need a store for Celery's chord counters: a Redis broker, or a \
                 RabbitMQ broker with Redis or PostgreSQL results",
            ));
        };
        let group_id = options
            .group_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let body_id = frozen_id(body);
        self.prepare_embedded(body, Some(&body_id), Embedded::default())
            .map_err(|e| refuse("chord", format!("the body: {e}")))?;
        let mut body_sig = signature("chord body", body, &body_id)?;
        if let Some(o) = body_sig.get_mut("options").and_then(Value::as_object_mut) {
            o.insert("group_id".into(), json!(group_id));
        }
        let mut prepared = Vec::with_capacity(header.len());
        for (i, task) in header.iter().enumerate() {
            let extra = Embedded {
                chord: Some(body_sig.clone()),
                group: Some((group_id.clone(), i)),
                ..Embedded::default()
            };
            let p = self
                .prepare_embedded(task, None, extra)
                .map_err(|e| refuse("chord", format!("header task {}: {e}", i + 1)))?;
            prepared.push(p);
        }
        let expires = options.expires.unwrap_or(DEFAULT_CHORD_EXPIRES);
        store.set_size(&group_id, header.len(), expires).await?;
        self.record_follow_ups(&[(body, &body_id)]).await?;
        let header_ids = self.send_prepared(prepared).await?;
        Ok(ChordSent {
            group_id,
            header_ids,
            body_id,
        })
    }
}

fn step_error(n: usize, e: ProducerError) -> ProducerError {
    match e {
        ProducerError::Option { option, reason } => ProducerError::Option {
            option,
            reason: format!("chain step {n}: {reason}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, MemoryBackend};
    use crate::proto::TaskMessage;
    use std::sync::Arc;

    fn task(name: &str, args: Vec<Value>) -> TaskRequest {
        TaskRequest::new(name, args)
    }

    /// Every message queued on `celery`, taken off the queue.
    async fn queued(b: &MemoryBackend) -> Vec<crate::broker::Delivery> {
        let mut c = b.consume("t");
        c.take(
            &["celery".to_owned()],
            10,
            Duration::from_secs(60),
            usize::MAX,
        )
        .await
        .expect("take")
    }

    async fn one_message(b: &MemoryBackend) -> TaskMessage {
        let got = queued(b).await;
        assert_eq!(got.len(), 1, "one message sent");
        crate::proto::envelope::decode(got[0].text().expect("utf-8")).expect("decodes")
    }

    #[tokio::test]
    async fn a_chain_carries_its_steps_next_one_last_with_frozen_ids() {
        let mem = MemoryBackend::new();
        let p = Producer::on_backend(Arc::new(mem.clone()) as Arc<dyn Backend>, "test")
            .record_pending(Duration::from_secs(60));
        let mut second = task("taskstack.add", vec![json!(4)]);
        second.options.queue = Some("other".into());
        let mut third = task("taskstack.echo", vec![json!("done")]);
        third.options.immutable = true;
        let sent = p
            .send_chain(&[
                task("taskstack.add", vec![json!(2), json!(2)]),
                second,
                third,
            ])
            .await
            .expect("sent");
        assert_eq!(sent.task_ids.len(), 3);
        let msg = one_message(&mem).await;
        assert_eq!(msg.id, sent.task_ids[0]);
        let chain = msg.embed()["chain"].as_array().expect("chain").clone();
        assert_eq!(chain.len(), 2);
        // The next step is the LAST element, as Celery pops it.
        assert_eq!(chain[1]["task"], "taskstack.add");
        assert_eq!(chain[1]["options"]["task_id"], json!(sent.task_ids[1]));
        assert_eq!(chain[1]["options"]["queue"], "other");
        assert_eq!(chain[0]["options"]["task_id"], json!(sent.task_ids[2]));
        assert_eq!(chain[0]["immutable"], true);
        assert_eq!(sent.result_id(), sent.task_ids[2]);
        // Every step is known (PENDING) from the start.
        for id in &sent.task_ids {
            let r = p.result(id).await.expect("read").expect("recorded");
            assert_eq!(r.status, crate::proto::TaskState::Pending, "{id}");
        }
    }

    #[tokio::test]
    async fn a_bad_step_names_itself_and_nothing_is_sent() {
        let mem = MemoryBackend::new();
        let p = Producer::on_backend(Arc::new(mem.clone()) as Arc<dyn Backend>, "test");
        let mut bad = task("taskstack.add", vec![]);
        bad.options.priority = Some(12);
        let e = p
            .send_chain(&[task("taskstack.add", vec![]), bad])
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("chain step 2"), "{e}");
        let mut retried = task("taskstack.add", vec![]);
        retried.options.max_retries = Some(3);
        let e = p
            .send_chain(&[task("taskstack.add", vec![]), retried])
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("max_retries"), "{e}");
        let e = p.send_chain(&[]).await.expect_err("empty");
        assert!(e.to_string().contains("at least one"), "{e}");
        let e = p
            .send_chord(
                &[task("a", vec![])],
                &task("b", vec![]),
                &ChordOptions::default(),
            )
            .await
            .expect_err("no redis");
        assert!(e.to_string().contains("Redis broker"), "{e}");
        let left = queued(&mem).await;
        assert!(left.is_empty(), "nothing sent: {left:?}");
    }

    #[tokio::test]
    async fn links_travel_as_callbacks_and_errbacks() {
        let mem = MemoryBackend::new();
        let p = Producer::on_backend(Arc::new(mem.clone()) as Arc<dyn Backend>, "test");
        let mut t = task("taskstack.add", vec![json!(1), json!(1)]);
        t.options.link = vec![task("taskstack.add", vec![json!(10)])];
        t.options.link_error = vec![task("taskstack.echo", vec![])];
        p.send(&t).await.expect("sent");
        let msg = one_message(&mem).await;
        let embed = msg.embed();
        assert_eq!(embed["callbacks"][0]["task"], "taskstack.add");
        assert_eq!(embed["callbacks"][0]["args"], json!([10]));
        assert!(embed["callbacks"][0]["options"].get("task_id").is_none());
        assert_eq!(embed["errbacks"][0]["task"], "taskstack.echo");
        assert_eq!(embed["chain"], Value::Null);
    }
}
