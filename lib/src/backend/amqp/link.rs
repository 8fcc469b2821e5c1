//! The connection to RabbitMQ: opened lazily, opened again (and the
//! topology declared again) after it broke; the callers' loops retry with
//! backoff. Publishing goes through one confirm channel: a publish returns
//! only once RabbitMQ confirmed every message (persisted to disk for
//! durable queues), and fails when one was refused or unroutable.

use super::AmqpError;
use super::topology::{self, QueueOptions};
use super::wire::AmqpMessage;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::time::Duration;

/// Where a message goes now or later.
#[derive(Debug, Clone)]
pub(crate) struct Publish {
    pub queue: String,
    /// Seconds to wait in the delay levels first (0: straight to `queue`).
    pub delay_s: u64,
    pub message: AmqpMessage,
}

/// One connection and its publishing channel, shared by a process's
/// sessions.
#[derive(Debug)]
pub(crate) struct Link {
    url: String,
    options: QueueOptions,
    timeout: Duration,
    live: tokio::sync::Mutex<Option<Live>>,
}

#[derive(Debug)]
struct Live {
    conn: Connection,
    channel: Channel,
    /// Work queues declared on this connection.
    declared: HashSet<String>,
}

impl Link {
    pub(crate) fn new(url: String, options: QueueOptions, timeout: Duration) -> Self {
        Self {
            url,
            options,
            timeout,
            live: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn options(&self) -> QueueOptions {
        self.options
    }

    /// Runs `fut` within the configured deadline.
    pub(crate) async fn within<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, AmqpError>>,
    ) -> Result<T, AmqpError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AmqpError::timeout(op, self.timeout))?
    }

    /// Opens a connection to the configured URL (amqp:// or amqps://).
    pub(crate) async fn connect(&self) -> Result<Connection, AmqpError> {
        let props = ConnectionProperties::default().with_connection_name("taskstack".into());
        self.within("connect to RabbitMQ", async {
            Connection::connect(&self.url, props)
                .await
                .map_err(|e| AmqpError::of("connect to RabbitMQ", &e))
        })
        .await
    }

    /// A connected publisher, opening it (and declaring the delay levels)
    /// when there is none or it broke.
    async fn live<'a>(&self, slot: &'a mut Option<Live>) -> Result<&'a mut Live, AmqpError> {
        if slot
            .as_ref()
            .is_some_and(|l| !l.conn.status().connected() || !l.channel.status().connected())
        {
            tracing::warn!("RabbitMQ connection lost; reconnecting");
            *slot = None;
        }
        if slot.is_none() {
            let conn = self.connect().await?;
            let channel = self
                .within("open a channel", async {
                    let ch = conn
                        .create_channel()
                        .await
                        .map_err(|e| AmqpError::of("open a channel", &e))?;
                    ch.confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(|e| AmqpError::of("select publisher confirms", &e))?;
                    topology::declare_delays(&ch, self.options).await?;
                    Ok(ch)
                })
                .await?;
            *slot = Some(Live {
                conn,
                channel,
                declared: HashSet::new(),
            });
        }
        slot.as_mut()
            .ok_or_else(|| AmqpError::other("connect", "no connection"))
    }

    /// Declares `queues` (once per connection) and returns the publishing
    /// channel.
    pub(crate) async fn channel_for(&self, queues: &[&str]) -> Result<Channel, AmqpError> {
        let mut slot = self.live.lock().await;
        let result = async {
            let live = self.live(&mut slot).await?;
            for q in queues {
                if !live.declared.contains(*q) {
                    self.within(
                        "declare queue",
                        topology::declare_queue(&live.channel, q, self.options),
                    )
                    .await?;
                    live.declared.insert((*q).to_owned());
                }
            }
            Ok(live.channel.clone())
        }
        .await;
        if result.is_err() {
            // A refused declaration closes the channel: start afresh.
            *slot = None;
        }
        result
    }

    /// Publishes every message and waits for RabbitMQ to confirm them all.
    pub(crate) async fn publish(&self, batch: &[Publish]) -> Result<(), AmqpError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut queues: Vec<&str> = batch.iter().map(|p| p.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        let channel = self.channel_for(&queues).await?;
        let result = self.publish_on(&channel, batch).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    async fn publish_on(&self, channel: &Channel, batch: &[Publish]) -> Result<(), AmqpError> {
        let op = "publish";
        let entry = topology::delay_entry(self.options);
        let mut confirms = Vec::with_capacity(batch.len());
        for p in batch {
            // As Celery: the default exchange, routing key = queue name.
            let (exchange, key) = if p.delay_s == 0 {
                (String::new(), p.queue.clone())
            } else {
                (
                    entry.clone(),
                    topology::delay_routing_key(p.delay_s, &p.queue),
                )
            };
            let confirm = self
                .within(op, async {
                    channel
                        .basic_publish(
                            ShortString::from(exchange),
                            ShortString::from(key),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &p.message.body,
                            p.message.properties.clone(),
                        )
                        .await
                        .map_err(|e| AmqpError::of(op, &e))
                })
                .await?;
            confirms.push((p, confirm));
        }
        for (p, confirm) in confirms {
            let c = self
                .within("wait for publisher confirm", async {
                    confirm
                        .await
                        .map_err(|e| AmqpError::of("wait for publisher confirm", &e))
                })
                .await?;
            match c {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(AmqpError::other(
                        op,
                        &format!(
                            "RabbitMQ could not route the message to queue {:?}",
                            p.queue
                        ),
                    ));
                }
                _ => {
                    return Err(AmqpError::other(
                        op,
                        &format!("RabbitMQ refused the message for queue {:?}", p.queue),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Forgets the connection (it is opened again at the next use).
    pub(crate) async fn reset(&self) {
        let old = self.live.lock().await.take();
        if let Some(l) = old {
            let _ = l.conn.close(200, ShortString::from("reset")).await;
        }
    }

    /// The messages waiting in each named queue and its consumers (0 and 0
    /// for one that does not exist), on a channel of their own (a passive declaration of a
    /// missing queue closes its channel).
    pub(crate) async fn message_counts(
        &self,
        queues: &[String],
    ) -> Result<Vec<(u64, u64)>, AmqpError> {
        let op = "count messages";
        let mut slot = self.live.lock().await;
        let live = self.live(&mut slot).await?;
        let mut counts = Vec::with_capacity(queues.len());
        let mut channel: Option<Channel> = None;
        for q in queues {
            let ch = match &channel {
                Some(c) if c.status().connected() => c.clone(),
                _ => {
                    let c = self
                        .within(op, async {
                            live.conn
                                .create_channel()
                                .await
                                .map_err(|e| AmqpError::of(op, &e))
                        })
                        .await?;
                    channel = Some(c.clone());
                    c
                }
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let got = self
                .within(op, async {
                    Ok(ch
                        .queue_declare(
                            ShortString::from(q.as_str()),
                            passive,
                            FieldTable::default(),
                        )
                        .await)
                })
                .await?;
            counts.push(match got {
                Ok(queue) => (
                    u64::from(queue.message_count()),
                    u64::from(queue.consumer_count()),
                ),
                Err(e) if AmqpError::is_not_found(&e) => (0, 0),
                Err(e) => return Err(AmqpError::of(op, &e)),
            });
        }
        if let Some(c) = channel.filter(|c| c.status().connected()) {
            let _ = c.close(200, ShortString::from("done")).await;
        }
        Ok(counts)
    }
}
