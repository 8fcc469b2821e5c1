//! `task-sent`: the event a producer publishes for each task it sends when
//! Celery's `task_send_sent_event` is on, so Flower and `celery events`
//! see tasks from the moment they are queued.

use super::{Events, Publisher};
use crate::TaskRequest;
use crate::broker::Broker;
use crate::control::kombu::{py_repr, py_tuple};
use crate::proto::envelope::format_time;
use serde_json::{Map, Value, json};

/// Publishes `task-sent` events for a producer.
#[derive(Debug)]
pub struct SentEvents {
    events: Events,
    to: Target,
}

/// The broker the events go to.
#[derive(Debug)]
enum Target {
    Redis {
        broker: Box<Broker>,
        db: i64,
    },
    /// One connection, opened at the first event and kept.
    #[cfg(feature = "amqp")]
    Amqp(Box<tokio::sync::Mutex<super::AmqpSink>>),
}

impl SentEvents {
    /// Events sent as `hostname` (the producer's origin, e.g.
    /// `gen<pid>@<host>`) to the broker's Redis.
    pub fn new(hostname: &str, broker: Broker) -> Self {
        let db = broker.broker_pool().target().db();
        Self {
            events: Events::new(hostname, true, Default::default()),
            to: Target::Redis {
                broker: Box::new(broker),
                db,
            },
        }
    }

    /// Events sent as `hostname` to RabbitMQ's `celeryev` exchange.
    #[cfg(feature = "amqp")]
    pub fn on_amqp(hostname: &str, backend: crate::backend::AmqpBackend) -> Self {
        Self {
            events: Events::new(hostname, true, Default::default()),
            to: Target::Amqp(Box::new(tokio::sync::Mutex::new(super::AmqpSink::new(
                backend,
            )))),
        }
    }

    /// The `task-sent` event of `req`, sent under `id` (root of its own
    /// tree: a producer's task has no parent).
    pub fn event(&self, id: &str, req: &TaskRequest) -> Value {
        let o = &req.options;
        let queue = o.queue.as_deref().unwrap_or(crate::canvas::DEFAULT_QUEUE);
        let eta = o.eta.or_else(|| {
            o.countdown
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| chrono::Utc::now() + d)
        });
        let mut f = Map::new();
        f.insert("uuid".into(), json!(id));
        f.insert("root_id".into(), json!(id));
        f.insert("parent_id".into(), Value::Null);
        f.insert("name".into(), json!(req.name));
        f.insert("args".into(), json!(py_tuple(&req.args)));
        f.insert("kwargs".into(), json!(py_repr(&json!(req.kwargs))));
        f.insert("retries".into(), json!(0));
        f.insert("eta".into(), json!(eta.map(format_time)));
        f.insert("expires".into(), json!(o.expires.map(format_time)));
        f.insert("queue".into(), json!(queue));
        f.insert("exchange".into(), json!(""));
        f.insert("routing_key".into(), json!(queue));
        self.events.event("task-sent", f)
    }

    /// Publishes the events of tasks just sent (one alone, several as one
    /// `task.multi`); returns how many were lost because Redis refused
    /// them. Monitoring never fails a send: the caller only counts losses.
    pub async fn publish(&self, events: Vec<Value>) -> u64 {
        if events.is_empty() {
            return 0;
        }
        match &self.to {
            Target::Redis { broker, db } => {
                let mut sink = super::RedisSink {
                    lane: broker.broker_pool().lane(),
                    db: *db,
                };
                self.send(&mut sink, events).await
            }
            #[cfg(feature = "amqp")]
            Target::Amqp(sink) => {
                let mut sink = sink.lock().await;
                self.send(&mut *sink, events).await
            }
        }
    }

    async fn send(&self, sink: &mut dyn super::Sink, events: Vec<Value>) -> u64 {
        let mut out = Publisher {
            sink,
            hostname: self.events.hostname(),
            warned: true,
        };
        out.send_batch(events).await
    }
}
