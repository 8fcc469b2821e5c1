//! Celery's remote control and monitoring events on RabbitMQ, as kombu's
//! pyamqp transport lays them out (captured from Celery 5.7 on RabbitMQ
//! 3.10; ARCHITECTURE.md, "Celery remote control and events"):
//!
//! - commands arrive through the `celery.pidbox` fanout exchange (not
//!   durable) in the node's queue `<nodename>.celery.pidbox`: exclusive,
//!   auto-delete, not durable, `x-expires` 10 s, `x-message-ttl` 300 s,
//!   bound with an empty key and consumed without acknowledgements;
//! - replies go to the direct exchange named by the command's `reply_to`
//!   (`reply.celery.pidbox`, not durable, declared before publishing) with
//!   the client's routing key, `delivery_mode` 1 and `ticket` / `clock`
//!   headers;
//! - events go to the durable `celeryev` topic exchange, routing key the
//!   event type with dots (`task.succeeded`), `delivery_mode` 1, header
//!   `hostname`.
//!
//! Bodies are raw JSON (`content_type` `application/json`, `utf-8`). These
//! connections are the worker's own, apart from the task traffic's: an
//! exclusive queue lives as long as the connection that declared it, which
//! is what holds a node name.

use super::AmqpError;
use super::link::Link;
use super::wire::{json_of, table_of};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// The fanout exchange commands are broadcast on.
const PIDBOX: &str = "celery.pidbox";
/// The exchange events are published on.
const EVENTS: &str = "celeryev";
/// kombu's `queue_expires` / `queue_ttl` for node queues, as Celery sets
/// them (`control_queue_expires` 10 s, `control_queue_ttl` 300 s).
const QUEUE_EXPIRES_MS: i32 = 10_000;
const QUEUE_TTL_MS: i32 = 300_000;
/// Transient, as kombu publishes replies and events.
const TRANSIENT: u8 = 1;
/// The longest a closing connection is waited for (a dead one never
/// answers).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A command as received: its JSON body and headers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Received {
    pub body: Value,
    pub headers: Value,
}

/// Why a mailbox could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Another connection holds the node's exclusive queue: that node name
    /// is taken.
    Taken,
    Amqp(AmqpError),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Taken => f.write_str("another worker holds this node name's pidbox queue"),
            Self::Amqp(e) => e.fmt(f),
        }
    }
}

/// One node's pidbox on its own connection.
#[derive(Debug)]
pub(crate) struct Mailbox {
    conn: Connection,
    incoming: Option<lapin::Consumer>,
    commands: Channel,
    replies: Option<Channel>,
    /// Reply exchanges declared on this connection.
    declared: HashSet<String>,
    queue: String,
}

fn props(headers: &Map<String, Value>) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(TRANSIENT)
        .with_priority(0)
        .with_headers(table_of(headers))
}

fn transient_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: false,
        ..ExchangeDeclareOptions::default()
    }
}

impl Mailbox {
    /// Connects and declares `nodename`'s queue, exclusively: when another
    /// connection holds it, the name is [`OpenError::Taken`].
    pub(crate) async fn open(link: &Link, nodename: &str) -> Result<Self, OpenError> {
        let conn = link.connect().await.map_err(OpenError::Amqp)?;
        match Self::declare(link, &conn, nodename).await {
            Ok((commands, queue)) => Ok(Self {
                conn,
                incoming: None,
                commands,
                replies: None,
                declared: HashSet::new(),
                queue,
            }),
            Err(e) => {
                // Nothing may keep a half-opened connection (or the name).
                let _ = conn.close(0, "pidbox not opened".into()).await;
                Err(e)
            }
        }
    }

    /// Declares the pidbox exchange and `nodename`'s queue on `conn` and
    /// binds them; the channel and the queue's name.
    async fn declare(
        link: &Link,
        conn: &Connection,
        nodename: &str,
    ) -> Result<(Channel, String), OpenError> {
        let queue = format!("{nodename}.{PIDBOX}");
        let op = "declare the pidbox queue";
        let opened = link
            .within(op, async {
                let ch = conn
                    .create_channel()
                    .await
                    .map_err(|e| AmqpError::of("open a channel", &e))?;
                ch.exchange_declare(
                    ShortString::from(PIDBOX),
                    ExchangeKind::Fanout,
                    transient_exchange(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| AmqpError::declare(op, "exchange", PIDBOX, &e))?;
                let mut args = FieldTable::default();
                args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
                args.insert("x-message-ttl".into(), AMQPValue::LongInt(QUEUE_TTL_MS));
                let declared = ch
                    .queue_declare(
                        ShortString::from(queue.as_str()),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            durable: false,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await;
                Ok((ch, declared))
            })
            .await
            .map_err(OpenError::Amqp)?;
        let (commands, declared) = opened;
        if let Err(e) = declared {
            let text = e.to_string();
            if text.contains("RESOURCE_LOCKED") || text.contains("RESOURCELOCKED") {
                return Err(OpenError::Taken);
            }
            return Err(OpenError::Amqp(AmqpError::declare(op, "queue", &queue, &e)));
        }
        link.within(op, async {
            commands
                .queue_bind(
                    ShortString::from(queue.as_str()),
                    ShortString::from(PIDBOX),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| AmqpError::of("bind the pidbox queue", &e))
        })
        .await
        .map_err(OpenError::Amqp)?;
        Ok((commands, queue))
    }

    /// Whether the connection (and the name it holds) is still up.
    pub(crate) fn connected(&self) -> bool {
        self.conn.status().connected() && self.commands.status().connected()
    }

    /// The next command; `None` when the connection ended (open the mailbox
    /// again). Starts consuming on first use.
    pub(crate) async fn next(&mut self) -> Option<Result<Received, String>> {
        if self.incoming.is_none() {
            let consumer = self
                .commands
                .basic_consume(
                    ShortString::from(self.queue.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match consumer {
                Ok(c) => self.incoming = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume the pidbox queue");
                    return None;
                }
            }
        }
        let delivery = self.incoming.as_mut()?.next().await?;
        let d = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "the pidbox consumer failed");
                return None;
            }
        };
        let headers = d.properties.headers().as_ref().map_or_else(
            || Value::Object(Map::new()),
            |t| json_of(&AMQPValue::FieldTable(t.clone())),
        );
        Some(
            serde_json::from_slice::<Value>(&d.data)
                .map(|body| Received { body, headers })
                .map_err(|e| format!("not JSON: {e}")),
        )
    }

    /// Publishes a reply to `exchange` (a direct exchange, declared first as
    /// kombu declares it) with routing key `rk`.
    pub(crate) async fn reply(
        &mut self,
        link: &Link,
        exchange: &str,
        rk: &str,
        body: &Value,
        headers: &Map<String, Value>,
    ) -> Result<(), AmqpError> {
        let op = "send a remote-control reply";
        if self
            .replies
            .as_ref()
            .is_none_or(|c| !c.status().connected())
        {
            let ch = link
                .within(op, async {
                    self.conn
                        .create_channel()
                        .await
                        .map_err(|e| AmqpError::of("open a channel", &e))
                })
                .await?;
            self.replies = Some(ch);
            self.declared.clear();
        }
        let Some(ch) = self.replies.clone() else {
            return Err(AmqpError::other(op, "no channel"));
        };
        let declare = !self.declared.contains(exchange);
        let result = link
            .within(op, async {
                if declare {
                    ch.exchange_declare(
                        ShortString::from(exchange),
                        ExchangeKind::Direct,
                        transient_exchange(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| AmqpError::declare(op, "exchange", exchange, &e))?;
                }
                let raw = serde_json::to_vec(body).unwrap_or_default();
                ch.basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(rk),
                    BasicPublishOptions::default(),
                    &raw,
                    props(headers),
                )
                .await
                .map_err(|e| AmqpError::of(op, &e))?;
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                self.declared.insert(exchange.to_owned());
                Ok(())
            }
            Err(e) => {
                // A refused declaration closes the channel.
                self.replies = None;
                Err(e)
            }
        }
    }

    /// Closes the connection (waiting at most `CLOSE_WAIT`): the queue
    /// goes with it (exclusive).
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.conn.close(200, "closing".into())).await;
    }
}

/// Publishes events on `celeryev`, on a connection of its own opened on
/// first use and again after it broke.
#[derive(Debug)]
pub(crate) struct EventPublisher {
    live: Option<(Connection, Channel)>,
}

impl EventPublisher {
    pub(crate) fn new() -> Self {
        Self { live: None }
    }

    /// Publishes `body` with `routing_key`, header `hostname`.
    pub(crate) async fn publish(
        &mut self,
        link: &Link,
        routing_key: &str,
        body: &Value,
        hostname: &str,
    ) -> Result<(), AmqpError> {
        let op = "publish an event";
        if self
            .live
            .as_ref()
            .is_some_and(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            self.drop_connection(link).await;
        }
        if self.live.is_none() {
            let conn = link.connect().await?;
            let opened = link
                .within(op, async {
                    let ch = conn
                        .create_channel()
                        .await
                        .map_err(|e| AmqpError::of("open a channel", &e))?;
                    ch.exchange_declare(
                        ShortString::from(EVENTS),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| AmqpError::declare(op, "exchange", EVENTS, &e))?;
                    Ok(ch)
                })
                .await;
            match opened {
                Ok(ch) => self.live = Some((conn, ch)),
                Err(e) => {
                    let _ = link
                        .within("close a connection", async {
                            conn.close(0, "events not opened".into())
                                .await
                                .map_err(|e| AmqpError::of("close a connection", &e))
                        })
                        .await;
                    return Err(e);
                }
            }
        }
        let Some((_, ch)) = &self.live else {
            return Err(AmqpError::other(op, "no channel"));
        };
        let mut headers = Map::new();
        headers.insert("hostname".into(), Value::from(hostname));
        let raw = serde_json::to_vec(body).unwrap_or_default();
        let sent = link
            .within(op, async {
                ch.basic_publish(
                    ShortString::from(EVENTS),
                    ShortString::from(routing_key),
                    BasicPublishOptions::default(),
                    &raw,
                    props(&headers),
                )
                .await
                .map_err(|e| AmqpError::of(op, &e))
                .map(drop)
            })
            .await;
        if sent.is_err() {
            self.drop_connection(link).await;
        }
        sent
    }

    /// Closes the connection in use (if any), bounded by the timeout, so a
    /// connection whose channel failed is not left open.
    async fn drop_connection(&mut self, link: &Link) {
        if let Some((conn, _)) = self.live.take() {
            let _ = link
                .within("close a connection", async {
                    conn.close(0, "reopening".into())
                        .await
                        .map_err(|e| AmqpError::of("close a connection", &e))
                })
                .await;
        }
    }

    /// Closes the connection (after `worker-offline`), waiting at most
    /// `CLOSE_WAIT`.
    pub(crate) async fn close(self) {
        if let Some((conn, _)) = self.live {
            let _ = tokio::time::timeout(CLOSE_WAIT, conn.close(200, "closing".into())).await;
        }
    }
}
