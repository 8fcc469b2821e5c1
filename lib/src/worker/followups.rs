//! What Celery's canvas asks of a worker once a task has finished, done as
//! Celery 5.7's worker does it (`app/trace.py`, `backends/base.py`,
//! `backends/redis.py`):
//!
//! - success: `link` callbacks get the result (several go out as one
//!   group), then the chain's next step (the embed's LAST element) gets it,
//!   carrying the rest of the chain; the stored result lists them in
//!   `children`;
//! - failure: the rest of the chain is failed with the same exception, and
//!   the `link_error` errbacks are sent as Celery sends an errback task it
//!   cannot call in-process: a group, each with the failed task's id as
//!   first argument;
//! - a chord header task (embed `chord`, header `group`): its outcome goes
//!   into Celery's chord counters with Celery's own script; whoever
//!   completes the chord sends the body with the ordered results, or
//!   stores a `ChordError` on the body when a header task failed.
//!
//! Every follow-up is pushed with a send-once marker keyed by its task id
//! (ids not frozen by the client are derived from the parent's), before
//! the task's message is acknowledged: a task redelivered after a crash
//! sends nothing twice and loses nothing.

use super::shared::{Shared, persist};
use crate::backend::{Outgoing, Use};
use crate::canvas::redis::{self as chord, PartOutcome};
use crate::canvas::store::CanvasStore;
use crate::canvas::{
    self, CanvasError, Dispatch, FollowUp, Lineage, Signature, child, derived_id, group_child,
};
use crate::proto::envelope::TaskMessage;
use crate::proto::{ExceptionInfo, Provenance, TaskResult, TaskState};
use serde_json::Value;

/// Runs the canvas follow-ups of a finished task and completes `result`
/// (`children`, `group_id`). False when the worker gave up on Redis: the
/// message must then not be acknowledged (the lease hands it back).
pub(crate) async fn run(sh: &Shared, msg: &TaskMessage, result: &mut TaskResult) -> bool {
    let embed = msg.embed();
    let has = |k: &str| {
        embed
            .get(k)
            .is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]))
    };
    if msg.group.is_some() {
        result.group_id.clone_from(&msg.group);
    }
    if !(has("callbacks") || has("errbacks") || has("chain") || has("chord")) {
        return true;
    }
    if sh.backend.redis().is_none() && sh.backend.canvas().is_none() {
        tracing::error!("this task carries a Celery canvas, which this backend cannot send");
        let exc = ExceptionInfo::builtin(
            "NotImplementedError",
            "Celery canvas (chain, link, link_error, chord) needs a store for its records: \
             a Redis broker, or a RabbitMQ broker with Redis or PostgreSQL results",
        );
        *result = TaskResult::failure(&msg.id, TaskState::Failure, &exc, from(sh, msg));
        return true;
    }
    // The canvas path is boxed: every task's `finish` holds this future's
    // state inline, and most tasks carry no follow-ups.
    let canvas = Box::pin(send_followups(sh, msg, result, has("chord")));
    canvas.await
}

/// The follow-ups of a task whose message carries a canvas.
async fn send_followups(
    sh: &Shared,
    msg: &TaskMessage,
    result: &mut TaskResult,
    in_chord: bool,
) -> bool {
    let mut work = Work::new(sh, msg);
    match result.status {
        TaskState::Success => work.on_success(&result.result),
        TaskState::Failure => work.on_failure(&result.result),
        _ => {}
    }
    result.children = std::mem::take(&mut work.children);
    if result.status == TaskState::Failure && !work.sends.is_empty() && !msg.ignore_result {
        // Errbacks read the failed task's result: store it first, as Celery does.
        work.failures.push(result.clone());
    }
    if !work.send().await {
        return false;
    }
    if result.status.is_ready() && in_chord {
        return work.chord_part(result).await;
    }
    true
}

fn from<'a>(sh: &'a Shared, msg: &'a TaskMessage) -> Provenance<'a> {
    Provenance {
        name: &msg.task,
        worker: &sh.id,
        retries: msg.retries,
        queue: "",
        parent_id: msg.parent_id.as_deref(),
    }
}

/// The follow-ups of one finished task, collected then sent in one step.
struct Work<'a> {
    sh: &'a Shared,
    msg: &'a TaskMessage,
    root_id: &'a str,
    now: chrono::DateTime<chrono::Utc>,
    sends: Vec<FollowUp>,
    /// Results to store before sending (failed chain steps, refusals).
    failures: Vec<TaskResult>,
    children: Vec<Value>,
}

impl<'a> Work<'a> {
    fn new(sh: &'a Shared, msg: &'a TaskMessage) -> Self {
        Self {
            sh,
            msg,
            root_id: msg.root_id.as_deref().unwrap_or(&msg.id),
            now: sh.now(),
            sends: Vec::new(),
            failures: Vec::new(),
            children: Vec::new(),
        }
    }

    fn lineage(&self) -> Lineage<'_> {
        Lineage {
            parent_id: &self.msg.id,
            root_id: self.root_id,
            origin: &self.sh.id,
            now: self.now,
        }
    }

    fn sigs(&mut self, key: &str) -> Vec<Signature> {
        match canvas::signatures(self.msg.embed().get(key)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, embed = key, "cannot read the task's canvas");
                Vec::new()
            }
        }
    }

    /// Records a FAILURE for a follow-up taskstack cannot send (and for
    /// every task id frozen inside it: a nested group's or chord's tasks),
    /// so whoever waits for any of them learns why instead of waiting for
    /// ever.
    fn refuse(&mut self, sig: &Signature, err: &CanvasError) {
        tracing::error!(error = %err, task = %sig.task, "canvas follow-up not sent");
        let mut ids: Vec<String> = sig.task_id().map(str::to_owned).into_iter().collect();
        for v in sig.kwargs.values() {
            canvas::frozen_ids(v, &mut ids);
        }
        let exc = ExceptionInfo::builtin("NotImplementedError", err.to_string());
        for id in ids {
            self.failures.push(TaskResult::failure(
                &id,
                TaskState::Failure,
                &exc,
                Provenance {
                    name: &sig.task,
                    worker: &self.sh.id,
                    retries: 0,
                    queue: "",
                    parent_id: Some(&self.msg.id),
                },
            ));
        }
    }

    /// Sends `sigs` as Celery's `group(sigs).apply_async((arg,))` (one
    /// signature: as itself), adding the result to `children` if `trail`.
    fn group(&mut self, sigs: &[Signature], arg: &Value, what: &str, trail: bool) {
        let plain: Vec<&Signature> = sigs
            .iter()
            .filter(|s| match s.check_plain() {
                Ok(()) => true,
                Err(e) => {
                    self.refuse(s, &e);
                    false
                }
            })
            .collect();
        let gid = derived_id(&self.msg.id, &format!("{what}-group"));
        let grouped = plain.len() > 1 || what == "errback";
        let mut ids = Vec::new();
        for (i, sig) in plain.into_iter().enumerate() {
            let send = Dispatch {
                prepend: Some(arg.clone()),
                chain: None,
                fallback_id: derived_id(&self.msg.id, &format!("{what}/{i}")),
                group: grouped.then_some((gid.as_str(), i)),
            };
            let f = canvas::build(sig, &send, &self.lineage());
            ids.push(f.task_id.clone());
            self.sends.push(f);
        }
        if trail && !ids.is_empty() {
            self.children.push(if grouped {
                group_child(&gid, &ids)
            } else {
                child(&ids[0])
            });
        }
    }

    fn on_success(&mut self, retval: &Value) {
        let callbacks = self.sigs("callbacks");
        if !callbacks.is_empty() {
            self.group(&callbacks, retval, "link", true);
        }
        let chain = match self.msg.embed().get("chain") {
            Some(Value::Array(a)) if !a.is_empty() => a.clone(),
            _ => return,
        };
        let (next, rest) = chain
            .split_last()
            .map(|(n, r)| (n.clone(), r.to_vec()))
            .unwrap_or_default();
        let sig = match Signature::parse(&next) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "chain step is not a signature; the chain stops here");
                return;
            }
        };
        if sig.subtask_type.as_deref() == Some("group") && rest.is_empty() {
            // A group as the last step: Celery's group.apply_async((retval,)).
            match canvas::signatures(sig.kwargs.get("tasks")) {
                Ok(members) if members.iter().all(|m| m.check_plain().is_ok()) => {
                    let gid = sig
                        .task_id()
                        .map_or_else(|| derived_id(&self.msg.id, "chain-group"), str::to_owned);
                    let mut ids = Vec::with_capacity(members.len());
                    for (i, m) in members.iter().enumerate() {
                        let send = Dispatch {
                            prepend: Some(retval.clone()),
                            chain: None,
                            fallback_id: derived_id(&self.msg.id, &format!("chain/{i}")),
                            group: Some((gid.as_str(), i)),
                        };
                        let f = canvas::build(m, &send, &self.lineage());
                        ids.push(f.task_id.clone());
                        self.sends.push(f);
                    }
                    self.children.push(group_child(&gid, &ids));
                    return;
                }
                Ok(_) => {
                    let e = CanvasError::Nested {
                        kind: "group of canvases".into(),
                        task: sig.task.clone(),
                    };
                    self.refuse(&sig, &e);
                    return;
                }
                Err(e) => {
                    self.refuse(&sig, &e);
                    return;
                }
            }
        }
        if let Err(e) = sig.check_plain() {
            // The step and every later one would wait for ever: fail them all.
            self.refuse(&sig, &e);
            let exc = ExceptionInfo::builtin("NotImplementedError", e.to_string());
            self.fail_chain(&rest, &exc.to_value());
            return;
        }
        let send = Dispatch {
            prepend: Some(retval.clone()),
            chain: Some(&rest),
            fallback_id: derived_id(&self.msg.id, "chain"),
            group: None,
        };
        let f = canvas::build(&sig, &send, &self.lineage());
        self.children.push(child(&f.task_id));
        self.sends.push(f);
    }

    fn on_failure(&mut self, exc: &Value) {
        if let Some(Value::Array(chain)) = self.msg.embed().get("chain") {
            let chain = chain.clone();
            self.fail_chain(&chain, exc);
        }
        let errbacks = self.sigs("errbacks");
        if !errbacks.is_empty() {
            let id = Value::String(self.msg.id.clone());
            self.group(&errbacks, &id, "errback", false);
        }
    }

    /// Celery's `_fail_chain`: every later step with an id gets the same
    /// FAILURE, so a client waiting on the chain's last result learns it.
    fn fail_chain(&mut self, chain: &[Value], exc: &Value) {
        for step in chain {
            let Ok(sig) = Signature::parse(step) else {
                continue;
            };
            if let Some(id) = sig.task_id() {
                let mut r = TaskResult::new(
                    id,
                    TaskState::Failure,
                    exc.clone(),
                    Provenance {
                        name: &sig.task,
                        worker: &self.sh.id,
                        retries: 0,
                        queue: "",
                        parent_id: Some(&self.msg.id),
                    },
                );
                r.traceback = Some(format!("chain stopped: task {} failed", self.msg.id));
                self.failures.push(r);
            }
        }
    }

    async fn store_failures(&mut self) -> bool {
        if self.failures.is_empty() {
            return true;
        }
        let ttl = self.sh.settings.result_expires;
        let failures = std::mem::take(&mut self.failures);
        let mut results = self.sh.backend.results(Use::Loop);
        persist!(
            self.sh,
            "store canvas failures",
            results.write(&failures, ttl).await
        )
        .is_some()
    }

    async fn send(&mut self) -> bool {
        if !self.store_failures().await {
            return false;
        }
        if self.sends.is_empty() {
            return true;
        }
        let sends = std::mem::take(&mut self.sends);
        let ttl = self.sh.settings.result_expires;
        if let Some(broker) = self.sh.backend.redis() {
            let ns = broker.keys().namespace().to_owned();
            let mut lane = broker.broker_pool().lane();
            let sent = persist!(
                self.sh,
                "send canvas follow-ups",
                chord::send_once(&mut lane, &ns, &sends, ttl).await
            );
            return match sent {
                Some(n) => {
                    tracing::debug!(sent = n, of = sends.len(), "canvas follow-ups sent");
                    true
                }
                None => false,
            };
        }
        self.publish(&sends, ttl).await
    }

    /// Sends follow-ups through a broker that is not the markers' Redis
    /// (RabbitMQ): the ones not marked sent are published (with the
    /// broker's confirms), then marked. A crash between the confirm and the
    /// marks sends them again when this task is redelivered: the copies
    /// carry the same task ids, and a worker acknowledges a copy whose
    /// task already has its final result without running it.
    async fn publish(&self, sends: &[FollowUp], ttl: std::time::Duration) -> bool {
        let Some(mut store) = self.sh.backend.canvas() else {
            return true;
        };
        let Some(unsent) = persist!(
            self.sh,
            "read canvas sent markers",
            store.unsent(sends).await
        ) else {
            return false;
        };
        if unsent.is_empty() {
            tracing::debug!(of = sends.len(), "canvas follow-ups were sent before");
            return true;
        }
        let batch: Vec<Outgoing> = unsent
            .iter()
            .map(|f| Outgoing {
                queue_key: f.queue_key.clone(),
                payload: f.payload.clone(),
                due_ms: None,
                pending: None,
            })
            .collect();
        // The shared session: nothing here blocks, and a finished task
        // need not hold a pooled connection for its follow-ups.
        let mut out = self.sh.backend.enqueue(Use::Request);
        if persist!(
            self.sh,
            "publish canvas follow-ups",
            out.enqueue(&batch).await
        )
        .is_none()
        {
            return false;
        }
        let marked = persist!(
            self.sh,
            "mark canvas follow-ups sent",
            store.mark_sent(&unsent, ttl).await
        );
        tracing::debug!(
            sent = unsent.len(),
            of = sends.len(),
            "canvas follow-ups published"
        );
        marked.is_some()
    }

    /// Celery's `on_chord_part_return` for the Redis backend (and the same
    /// steps on PostgreSQL, see [`crate::canvas::store`]).
    async fn chord_part(&mut self, result: &TaskResult) -> bool {
        let Some(mut store) = self.sh.backend.canvas() else {
            return true;
        };
        let Some(gid) = self.msg.group.clone() else {
            tracing::error!("chord header task has no group header; its chord cannot complete");
            return true;
        };
        let body = match Signature::parse(&self.msg.embed()["chord"]) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "chord body is not a signature");
                return true;
            }
        };
        let index = self.msg.header("group_index").and_then(Value::as_i64);
        let state = serde_json::to_value(result.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let expires = self.sh.settings.result_expires;
        let Some(outcome) = persist!(
            self.sh,
            "record chord part",
            store
                .part_return(&gid, &self.msg.id, index, &state, &result.result, expires)
                .await
        ) else {
            return false;
        };
        let PartOutcome::Claimed { token, .. } = outcome else {
            return true;
        };
        let Some(parts) = persist!(self.sh, "read chord parts", store.parts(&gid).await) else {
            return false;
        };
        let body_id = body
            .task_id()
            .map_or_else(|| derived_id(&gid, "body"), str::to_owned);
        if let Some(bad) = parts
            .iter()
            .find(|p| p.state == "FAILURE" || p.state == "REVOKED")
        {
            let why = format!(
                "Dependency {} raised {}",
                bad.task_id,
                canvas::exception_repr(&bad.result)
            );
            tracing::warn!(chord = %gid, reason = %why, "chord failed");
            return self
                .chord_error(&gid, &body, &body_id, &why, &mut *store)
                .await;
        }
        if let Err(e) = body.check_plain() {
            return self
                .chord_error(&gid, &body, &body_id, &e.to_string(), &mut *store)
                .await;
        }
        let Some(extended) = persist!(
            self.sh,
            "extend chord claim",
            store.extend_claim(&gid, &token).await
        ) else {
            return false;
        };
        if !extended {
            tracing::warn!(chord = %gid, "chord body not sent: the claim is no longer this worker's");
            return true;
        }
        let results: Vec<Value> = parts.into_iter().map(|p| p.result).collect();
        let send = Dispatch {
            prepend: Some(Value::Array(results)),
            chain: None,
            fallback_id: body_id,
            group: None,
        };
        let f = canvas::build(&body, &send, &self.lineage());
        tracing::debug!(chord = %gid, body = %f.task_id, "chord complete; sending its body");
        self.sends.push(f);
        if !self.send().await {
            return false;
        }
        match persist!(self.sh, "clean up chord", store.cleanup(&gid, &token).await) {
            Some(true) => true,
            Some(false) => {
                tracing::warn!(chord = %gid, "chord claim lost before clean-up; its data is left to expire");
                true
            }
            None => false,
        }
    }

    /// Celery's `chord_error_from_stack`: `ChordError` on the body's result,
    /// the body's errbacks (with the body's id), the body's chain failed;
    /// then the chord size is dropped so a late header copy does not fail
    /// it again.
    async fn chord_error(
        &mut self,
        gid: &str,
        body: &Signature,
        body_id: &str,
        why: &str,
        store: &mut dyn CanvasStore,
    ) -> bool {
        let exc = ExceptionInfo::celery("ChordError", why);
        let mut r = TaskResult::failure(
            body_id,
            TaskState::Failure,
            &exc,
            Provenance {
                name: &body.task,
                worker: &self.sh.id,
                retries: 0,
                queue: "",
                parent_id: None,
            },
        );
        r.traceback = Some(format!("celery.exceptions.ChordError: {why}"));
        self.failures.push(r);
        if let Some(Value::Array(chain)) = body.options.get("chain") {
            let chain = chain.clone();
            self.fail_chain(&chain, &exc.to_value());
        }
        let errbacks = canvas::signatures(body.options.get("link_error")).unwrap_or_default();
        if !errbacks.is_empty() {
            // Sent as from the body: parent and root are the body's id.
            let lineage = Lineage {
                parent_id: body_id,
                root_id: body_id,
                origin: &self.sh.id,
                now: self.now,
            };
            let gid_eb = derived_id(body_id, "errback-group");
            for (i, sig) in errbacks.iter().enumerate() {
                if let Err(e) = sig.check_plain() {
                    self.refuse(sig, &e);
                    continue;
                }
                let send = Dispatch {
                    prepend: Some(Value::String(body_id.to_owned())),
                    chain: None,
                    fallback_id: derived_id(body_id, &format!("errback/{i}")),
                    group: Some((gid_eb.as_str(), i)),
                };
                self.sends.push(canvas::build(sig, &send, &lineage));
            }
        }
        if !self.send().await {
            return false;
        }
        persist!(self.sh, "drop chord size", store.drop_size(gid).await).is_some()
    }
}
