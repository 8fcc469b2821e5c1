//! Consuming: one `basic.consume` per served queue on one channel of its
//! own connection, `basic.qos` = the worker's prefetch, manual
//! acknowledgements. Deliveries wait in a buffer until the worker takes
//! them; every delivery taken is a *hold* (hold sequence number → channel
//! and delivery tag) that any session of the backend can settle, since the
//! worker takes, settles and parks from different sessions.

use super::AmqpError;
use super::acks::ChannelAcks;
use super::link::Link;
use super::topology;
use super::wire;
use crate::broker::Delivery;
use crate::proto::keys::queue_of_key;
use futures_util::StreamExt as _;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

type Item = (String, lapin::Result<AmqpDelivery>);

/// A delivery the worker took and has not settled.
#[derive(Debug)]
pub(crate) struct Hold {
    acks: Arc<ChannelAcks>,
    tag: u64,
    pub queue: String,
    /// The message itself when it was too large to hand to the worker
    /// (only a dead letter may settle it, and it keeps these bytes).
    pub oversized: Option<Vec<u8>>,
}

/// The consuming side of one backend (one worker process).
#[derive(Debug)]
pub(crate) struct Consumer {
    link: Arc<Link>,
    state: tokio::sync::Mutex<Option<Consuming>>,
    holds: std::sync::Mutex<HashMap<u64, Hold>>,
    last_seq: AtomicU64,
    /// `basic.qos`: deliveries RabbitMQ sends ahead of acknowledgements.
    prefetch: u16,
}

#[derive(Debug)]
struct Consuming {
    conn: Connection,
    channel: Channel,
    /// The channel's acknowledgements; every delivery received is seen
    /// by it.
    acks: Arc<ChannelAcks>,
    /// The queues consumed, in the order served.
    queues: Vec<String>,
    tx: mpsc::UnboundedSender<Item>,
    rx: mpsc::UnboundedReceiver<Item>,
    forwarders: JoinSet<()>,
    pending: VecDeque<(String, AmqpDelivery)>,
}

fn consumer_tag(queue: &str) -> ShortString {
    ShortString::from(format!("taskstack.{queue}"))
}

impl Consumer {
    pub(crate) fn new(link: Arc<Link>, prefetch: usize) -> Self {
        Self {
            prefetch: u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            link,
            state: tokio::sync::Mutex::new(None),
            holds: std::sync::Mutex::new(HashMap::new()),
            last_seq: AtomicU64::new(0),
        }
    }

    /// Opens the consuming channel (prefetch `prefetch`) or brings the
    /// queues it consumes in line with `queues`.
    async fn ensure<'a>(
        &self,
        slot: &'a mut Option<Consuming>,
        queues: &[String],
    ) -> Result<&'a mut Consuming, AmqpError> {
        if slot
            .as_ref()
            .is_some_and(|c| !c.conn.status().connected() || !c.channel.status().connected())
        {
            tracing::warn!("RabbitMQ consuming connection lost; reconnecting");
            close(slot.take()).await;
        }
        if slot.is_none() {
            let conn = self.link.connect().await?;
            let channel = self
                .link
                .within("open the consuming channel", async {
                    let ch = conn
                        .create_channel()
                        .await
                        .map_err(|e| AmqpError::of("open the consuming channel", &e))?;
                    ch.basic_qos(self.prefetch, BasicQosOptions::default())
                        .await
                        .map_err(|e| AmqpError::of("set the prefetch (basic.qos)", &e))?;
                    topology::declare_delays(&ch, self.link.options()).await?;
                    Ok(ch)
                })
                .await?;
            let (tx, rx) = mpsc::unbounded_channel();
            *slot = Some(Consuming {
                conn,
                acks: Arc::new(ChannelAcks::new(channel.clone())),
                channel,
                queues: Vec::new(),
                tx,
                rx,
                forwarders: JoinSet::new(),
                pending: VecDeque::new(),
            });
        }
        let c = slot
            .as_mut()
            .ok_or_else(|| AmqpError::other("consume", "no channel"))?;
        if c.queues != queues {
            for gone in c.queues.iter().filter(|q| !queues.contains(q)) {
                c.channel
                    .basic_cancel(consumer_tag(gone), BasicCancelOptions::default())
                    .await
                    .map_err(|e| AmqpError::of("cancel a consumer", &e))?;
            }
            for q in queues.iter().filter(|q| !c.queues.contains(q)) {
                let op = "consume a queue";
                let channel = c.channel.clone();
                let mut stream = self
                    .link
                    .within(op, async {
                        topology::declare_queue(&channel, q, self.link.options()).await?;
                        channel
                            .basic_consume(
                                ShortString::from(q.as_str()),
                                consumer_tag(q),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            )
                            .await
                            .map_err(|e| AmqpError::of(op, &e))
                    })
                    .await?;
                let tx = c.tx.clone();
                let queue = q.clone();
                c.forwarders.spawn(async move {
                    while let Some(d) = stream.next().await {
                        let end = d.is_err();
                        if tx.send((queue.clone(), d)).is_err() || end {
                            break;
                        }
                    }
                });
            }
            c.queues = queues.to_vec();
        }
        Ok(c)
    }

    /// Takes up to `max` buffered deliveries of `queue_keys`' queues.
    pub(crate) async fn take(
        &self,
        queue_keys: &[String],
        max: usize,
        max_size: usize,
    ) -> Result<Vec<Delivery>, AmqpError> {
        let queues = queue_names(queue_keys);
        let mut slot = self.state.lock().await;
        let result = async {
            let c = self.ensure(&mut slot, &queues).await?;
            let mut got = Vec::new();
            while got.len() < max {
                if let Some(d) = c.pending.pop_front() {
                    got.push(d);
                    continue;
                }
                match c.rx.try_recv() {
                    Ok((q, Ok(d))) => {
                        c.acks.seen(d.delivery_tag);
                        got.push((q, d));
                    }
                    Ok((_, Err(e))) => return Err(AmqpError::of("receive messages", &e)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Err(AmqpError::other("receive messages", "the consumers ended"));
                    }
                }
            }
            Ok((Arc::clone(&c.acks), got))
        }
        .await;
        let (acks, got) = match result {
            Ok(r) => r,
            Err(e) => {
                // Deliveries of a broken channel are RabbitMQ's again.
                close(slot.take()).await;
                return Err(e);
            }
        };
        drop(slot);
        Ok(got
            .into_iter()
            .map(|(q, d)| self.hold(&acks, q, d, max_size))
            .collect())
    }

    fn hold(
        &self,
        acks: &Arc<ChannelAcks>,
        queue: String,
        d: AmqpDelivery,
        max_size: usize,
    ) -> Delivery {
        let seq = self.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        if d.redelivered {
            tracing::info!(queue = %queue, redelivered = true, "RabbitMQ redelivered a message");
        }
        let payload = wire::to_envelope(
            &d.data,
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
        );
        let (payload, oversized, kept) = if payload.len() > max_size {
            let size = payload.len() as u64;
            (Vec::new(), Some(size), Some(payload))
        } else {
            (payload, None, None)
        };
        let hold = Hold {
            acks: Arc::clone(acks),
            tag: d.delivery_tag,
            queue: queue.clone(),
            oversized: kept,
        };
        if let Ok(mut holds) = self.holds.lock() {
            holds.insert(seq, hold);
        }
        Delivery {
            seq,
            queue_key: queue,
            payload,
            oversized,
        }
    }

    /// Waits up to `wait` for a delivery of `queue_keys`' queues.
    pub(crate) async fn wait(
        &self,
        queue_keys: &[String],
        wait: Duration,
    ) -> Result<bool, AmqpError> {
        let queues = queue_names(queue_keys);
        let mut slot = self.state.lock().await;
        let result = async {
            let c = self.ensure(&mut slot, &queues).await?;
            if !c.pending.is_empty() {
                return Ok(true);
            }
            match tokio::time::timeout(wait, c.rx.recv()).await {
                Err(_) => Ok(false),
                Ok(Some((q, Ok(d)))) => {
                    c.acks.seen(d.delivery_tag);
                    c.pending.push_back((q, d));
                    Ok(true)
                }
                Ok(Some((_, Err(e)))) => Err(AmqpError::of("wait for messages", &e)),
                Ok(None) => Err(AmqpError::other("wait for messages", "the consumers ended")),
            }
        }
        .await;
        if result.is_err() {
            close(slot.take()).await;
        }
        result
    }

    /// Ends the consuming connection now (a worker that died).
    #[cfg(test)]
    pub(crate) async fn close_now(&self) {
        close(self.state.lock().await.take()).await;
    }

    /// Removes and returns hold `seq`; `None` when it is gone already.
    pub(crate) fn release(&self, seq: u64) -> Option<Hold> {
        self.holds.lock().ok()?.remove(&seq)
    }

    /// Deliveries taken and not yet settled, counted by queue.
    pub(crate) fn held_by_queue(&self) -> Vec<(String, u64)> {
        let mut by_queue: HashMap<String, u64> = HashMap::new();
        if let Ok(holds) = self.holds.lock() {
            for h in holds.values() {
                *by_queue.entry(h.queue.clone()).or_default() += 1;
            }
        }
        by_queue.into_iter().collect()
    }

    /// Whether hold `seq` is still live (and its queue).
    pub(crate) fn held_queue(&self, seq: u64) -> Option<String> {
        self.holds.lock().ok()?.get(&seq).map(|h| h.queue.clone())
    }

    /// The bytes of an oversized hold.
    pub(crate) fn oversized_bytes(&self, seq: u64) -> Option<Vec<u8>> {
        self.holds
            .lock()
            .ok()?
            .get(&seq)
            .and_then(|h| h.oversized.clone())
    }
}

/// Acknowledges holds: the tags of each channel in one batch (see
/// `acks`). A channel that closed since has given its messages back to
/// RabbitMQ, which redelivers them (`redelivered` set): logged, not an
/// error, as settling a hold already gone is a no-op.
pub(crate) async fn ack(holds: Vec<Hold>) {
    let mut by_channel: Vec<(Arc<ChannelAcks>, Vec<u64>)> = Vec::new();
    for h in holds {
        match by_channel
            .iter_mut()
            .find(|(acks, _)| Arc::ptr_eq(acks, &h.acks))
        {
            Some((_, tags)) => tags.push(h.tag),
            None => by_channel.push((h.acks, vec![h.tag])),
        }
    }
    for (acks, tags) in by_channel {
        acks.ack(&tags).await;
    }
}

/// Gives a hold back to its queue (`basic.nack` with requeue).
pub(crate) async fn nack(hold: Hold) {
    hold.acks.requeue(hold.tag).await;
}

async fn close(c: Option<Consuming>) {
    if let Some(mut c) = c {
        c.forwarders.abort_all();
        let _ = c.conn.close(200, ShortString::from("reconnecting")).await;
    }
}

/// The queue names of `queue_keys` (priority buckets are one queue on
/// RabbitMQ), first appearance first.
fn queue_names(queue_keys: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in queue_keys {
        let q = queue_of_key(k);
        if !out.iter().any(|o| o == q) {
            out.push(q.to_owned());
        }
    }
    out
}
