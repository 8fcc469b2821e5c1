//! The pidbox loop on Redis: listens for remote-control commands on the
//! `celery.pidbox` fanout channel and replies to the client's reply queue;
//! [`answer`], shared with RabbitMQ's loop (`control::amqp`), runs them.

use super::kombu::{self, Message};
use super::{PIDBOX_EXCHANGE, RemoteControl, commands, pidbox_queue};
use crate::broker::{Broker, on_lane};
use crate::worker::shared::{Shared, jitter};
use futures_util::StreamExt as _;
use redis::Script;
use serde_json::{Value, json};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) static REVOKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../scripts/control_revoke.lua")));

/// The remote-control and events loops of a worker.
#[derive(Debug)]
pub(crate) struct Service {
    stop: CancellationToken,
    pidbox: Option<tokio::task::JoinHandle<()>>,
    events: Option<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Starts the loops on the broker's wire: Redis (kombu's Redis
    /// transport) or RabbitMQ (with the mailbox `claimed` holding the node
    /// name); elsewhere nothing.
    pub fn spawn(sh: &Arc<Shared>, claimed: super::Claimed) -> Self {
        let stop = CancellationToken::new();
        #[cfg(feature = "amqp")]
        if let Some(amqp) = sh.backend.amqp() {
            let answer_commands = sh.settings.remote_control != RemoteControl::Off;
            let pidbox = tokio::spawn(super::amqp::listen(
                Arc::clone(sh),
                claimed.mailbox,
                answer_commands,
                stop.clone(),
            ));
            let m = Arc::clone(&sh.monitor);
            let events_stop = stop.clone();
            let mut sink = crate::events::AmqpSink::new(amqp.clone());
            let events = tokio::spawn(async move {
                Arc::clone(&m.events)
                    .run(&mut sink, events_stop, move || {
                        (m.active_count(), m.totals().0)
                    })
                    .await;
                sink.close().await;
            });
            return Self {
                stop,
                pidbox: Some(pidbox),
                events: Some(events),
            };
        }
        let _ = claimed;
        let Some(broker) = sh.backend.redis() else {
            return Self {
                stop,
                pidbox: None,
                events: None,
            };
        };
        let db = broker.broker_pool().target().db();
        let pidbox = (sh.settings.remote_control != RemoteControl::Off)
            .then(|| tokio::spawn(listen(Arc::clone(sh), broker.clone(), db, stop.clone())));
        let m = Arc::clone(&sh.monitor);
        let lane = broker.broker_pool().lane();
        let events_stop = stop.clone();
        let events = tokio::spawn(async move {
            let mut sink = crate::events::RedisSink { lane, db };
            Arc::clone(&m.events)
                .run(&mut sink, events_stop, move || {
                    (m.active_count(), m.totals().0)
                })
                .await;
        });
        Self {
            stop,
            pidbox,
            events: Some(events),
        }
    }

    /// Stops listening, unbinds the pidbox queue and sends `worker-offline`.
    pub async fn stop(self, sh: &Shared) {
        self.stop.cancel();
        if let Some(p) = self.pidbox {
            let _ = p.await;
        }
        if let Some(broker) = sh.backend.redis() {
            unbind(broker, &sh.monitor.nodename).await;
        }
        if let Some(e) = self.events {
            let _ = e.await;
        }
    }
}

async fn unbind(broker: &Broker, nodename: &str) {
    let mut lane = broker.broker_pool().shared_lane();
    let queue = pidbox_queue(nodename);
    let r: Result<(), crate::broker::BrokerError> = async {
        on_lane!(&mut lane, "unbind pidbox", |c| redis::pipe()
            .cmd("SREM")
            .arg(kombu::binding_key(PIDBOX_EXCHANGE))
            .arg(kombu::binding_member("", &queue))
            .ignore()
            .cmd("DEL")
            .arg(&queue)
            .ignore()
            .query_async::<()>(c))
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot unbind the pidbox queue");
    }
}

/// How long kombu keeps a binding without renewal (its
/// `_kombu.binding_deadlines`); renewed every third of it.
const BINDING_TTL: Duration = Duration::from_secs(3600);

/// Binds the pidbox queue to the exchange and pushes the exchange's
/// binding deadline forward (`ZADD GT`, as kombu does), so kombu's cleanup
/// of stale bindings leaves it while this worker lives.
async fn bind(broker: &Broker, member: &str) -> Result<(), crate::broker::BrokerError> {
    let deadline =
        crate::broker::now_ms() + i64::try_from(BINDING_TTL.as_millis()).unwrap_or(i64::MAX);
    let mut lane = broker.broker_pool().shared_lane();
    on_lane!(&mut lane, "bind pidbox", |c| redis::cmd("SADD")
        .arg(kombu::binding_key(PIDBOX_EXCHANGE))
        .arg(member)
        .query_async::<i64>(c))?;
    // Best effort: `GT` needs Redis 6.2, and a kombu without binding
    // deadlines never reads the set.
    let r: Result<i64, crate::broker::BrokerError> = async {
        on_lane!(&mut lane, "renew pidbox binding deadline", |c| redis::cmd(
            "ZADD"
        )
        .arg("_kombu.binding_deadlines")
        .arg("GT")
        .arg(deadline)
        .arg(PIDBOX_EXCHANGE)
        .query_async::<i64>(c))
    }
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "cannot push the pidbox binding deadline forward");
    }
    Ok(())
}

/// Subscribes (again after a connection loss) and handles commands until
/// `stop`.
async fn listen(sh: Arc<Shared>, broker: Broker, db: i64, stop: CancellationToken) {
    let channel = kombu::fanout_channel(db, PIDBOX_EXCHANGE, "");
    let member = kombu::binding_member("", &pidbox_queue(&sh.monitor.nodename));
    let mut backoff = Duration::from_millis(100);
    let mut replies = broker.broker_pool().lane();
    while !stop.is_cancelled() {
        let subscribed = async {
            // Re-bound on every (re)connection, as kombu declares its queue.
            bind(&broker, &member).await?;
            let mut ps = broker.broker_pool().pubsub().await?;
            ps.psubscribe(&channel)
                .await
                .map_err(|e| crate::broker::BrokerError::Redis {
                    op: "subscribe to the pidbox",
                    source: e,
                })?;
            Ok::<_, crate::broker::BrokerError>(ps)
        }
        .await;
        let mut ps = match subscribed {
            Ok(ps) => ps,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for remote-control commands");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        tracing::debug!(nodename = %sh.monitor.nodename, channel = %channel, "listening for remote-control commands");
        backoff = Duration::from_millis(100);
        let mut stream = ps.on_message();
        let mut rebind = tokio::time::interval(BINDING_TTL / 3);
        rebind.tick().await;
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                _ = rebind.tick() => {
                    if let Err(e) = bind(&broker, &member).await {
                        tracing::warn!(error = %e, "cannot renew the pidbox binding");
                    }
                    continue;
                }
                m = stream.next() => m,
            };
            let Some(msg) = msg else {
                tracing::warn!("the remote-control subscription ended; subscribing again");
                break;
            };
            match kombu::decode(msg.get_payload_bytes()) {
                Ok(m) => handle(&sh, &mut replies, m).await,
                Err(e) => {
                    tracing::warn!(reason = %e, "ignoring an unreadable remote-control message")
                }
            }
        }
    }
}

/// Whether a command addressed as `body` says is for `nodename` (kombu's
/// `Node.handle_message`: `destination` list, or a glob `pattern`).
fn for_me(body: &Value, nodename: &str) -> bool {
    match body.get("destination") {
        Some(Value::Array(d)) if !d.is_empty() => d.iter().any(|n| n == nodename),
        Some(Value::String(d)) if !d.is_empty() => d == nodename,
        _ => match (body["pattern"].as_str(), body["matcher"].as_str()) {
            (Some(p), Some("glob")) => glob(p, nodename),
            (Some(_), Some(_)) => false,
            _ => true,
        },
    }
}

/// `*` and `?` wildcards, as `fnmatch` matches node names.
fn glob(p: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (p.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A reply to send: `body` to `exchange` with `routing_key`, with kombu's
/// `ticket` and `clock` headers.
pub(crate) struct Reply {
    pub exchange: String,
    pub routing_key: String,
    pub body: Value,
    pub headers: serde_json::Map<String, Value>,
    /// The command answered (for logs).
    pub method: String,
}

/// Runs a command received as `body` with `headers` when it is for this
/// node and not expired; the reply to send, if the client wants one.
pub(crate) async fn answer(sh: &Arc<Shared>, body: Value, headers: &Value) -> Option<Reply> {
    let clock = &sh.monitor.events.clock;
    match headers["clock"].as_u64() {
        Some(c) => {
            clock.adjust(c);
        }
        None => {
            clock.forward();
        }
    }
    if !for_me(&body, &sh.monitor.nodename) {
        return None;
    }
    let expires = headers["expires"].as_f64().unwrap_or(0.0);
    if expires > 0.0 && expires < crate::events::timestamp() {
        tracing::debug!("ignoring an expired remote-control command");
        return None;
    }
    let Some(method) = body["method"].as_str() else {
        tracing::warn!("ignoring a remote-control message without a method");
        return None;
    };
    let args = body["arguments"].as_object().cloned().unwrap_or_default();
    tracing::debug!(command = method, "remote-control command");
    let reply = commands::dispatch(sh, method, &args).await?;
    let (Some(exchange), Some(rk)) = (
        body["reply_to"]["exchange"].as_str(),
        body["reply_to"]["routing_key"].as_str(),
    ) else {
        return None; // a cast: no reply wanted
    };
    let mut headers = serde_json::Map::new();
    headers.insert("ticket".into(), body["ticket"].clone());
    headers.insert("clock".into(), json!(clock.forward()));
    Some(Reply {
        exchange: exchange.to_owned(),
        routing_key: rk.to_owned(),
        body: json!({ sh.monitor.nodename.clone(): reply }),
        headers,
        method: method.to_owned(),
    })
}

async fn handle(sh: &Arc<Shared>, replies: &mut crate::broker::Lane, msg: Message) {
    let Message { body, headers } = msg;
    let Some(r) = answer(sh, body, &headers).await else {
        return;
    };
    let envelope = kombu::envelope(
        &r.body,
        Value::Object(r.headers),
        &r.exchange,
        &r.routing_key,
        1,
    );
    if let Err(e) = reply_to(replies, &r.exchange, &r.routing_key, &envelope).await {
        tracing::warn!(error = %e, command = %r.method, "cannot send a remote-control reply");
    }
}

/// Delivers to the queues bound to `exchange` with routing key `rk`, as
/// kombu's direct exchange does (none bound: the client left; dropped).
async fn reply_to(
    lane: &mut crate::broker::Lane,
    exchange: &str,
    rk: &str,
    envelope: &str,
) -> Result<(), crate::broker::BrokerError> {
    let members: Vec<String> =
        on_lane!(&mut *lane, "find reply queue", |c| redis::cmd("SMEMBERS")
            .arg(kombu::binding_key(exchange))
            .query_async::<Vec<String>>(c))?;
    for m in members {
        let mut parts = m.split(kombu::SEP);
        let (Some(key), Some(_), Some(queue)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if key == rk {
            on_lane!(&mut *lane, "send reply", |c| redis::cmd("LPUSH")
                .arg(queue)
                .arg(envelope)
                .query_async::<i64>(c))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_and_patterns_pick_nodes_as_kombu_does() {
        let n = "taskstack@h";
        assert!(for_me(&json!({"destination": null}), n));
        assert!(for_me(&json!({"destination": ["a@h", n]}), n));
        assert!(!for_me(&json!({"destination": ["a@h"]}), n));
        assert!(for_me(&json!({"pattern": "task*@*", "matcher": "glob"}), n));
        assert!(!for_me(
            &json!({"pattern": "celery@*", "matcher": "glob"}),
            n
        ));
    }
}
