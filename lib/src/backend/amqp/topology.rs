//! What taskstack declares on RabbitMQ: Celery's own topology for work
//! queues, plus the delay levels that hold ETA, countdown and retry-backoff
//! messages inside RabbitMQ until they are due.
//!
//! Work queue `q` (as kombu declares `Queue(q)` for Celery): a durable
//! `direct` exchange named `q`, a durable queue `q` (no arguments, or
//! `x-queue-type = quorum`, or `x-max-priority` when asked), bound with
//! routing key `q`.
//! Messages are published as Celery publishes them, to the default
//! exchange `""` with routing key `q`. A queue that
//! already exists with other arguments makes RabbitMQ refuse the
//! declaration (PRECONDITION_FAILED): taskstack reports it and never
//! changes the queue.
//!
//! Delays (binary levels, as NServiceBus and kombu 5.5's native delayed
//! delivery do it): level `L` (0..=27) is a `topic` exchange and a queue
//! `taskstack.delay.L` whose messages live exactly 2^L seconds
//! (`x-message-ttl`) and are then dead-lettered to level `L-1`'s exchange
//! (level 0 to `taskstack.delay.deliver`). With quorum queues the levels
//! are kombu's own, `celery_delayed_L` and `celery_delayed_delivery`, with
//! kombu's arguments (quorum, `x-overflow = reject-publish`,
//! `x-dead-letter-strategy = at-least-once`), so Celery workers on quorum
//! queues and taskstack share them. The
//! routing key spells the delay in seconds as 28 words, one bit each,
//! highest first, then the target queue's name: level `L`'s exchange sends
//! a message whose bit `L` is 1 to its queue and one whose bit is 0 on to
//! level `L-1` at once, so a message waits the sum of its set bits. The
//! deliver exchange routes it by the name words to the work queue. Every
//! queue of a level holds messages of one TTL, so the one at the head
//! always expires first, and nothing waits in a worker's memory.

use super::AmqpError;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Delay levels: delays up to 2^28 − 1 s (8.5 years) in whole seconds.
pub(crate) const LEVELS: u32 = 28;
/// The longest delay the levels can hold, in seconds.
pub(crate) const MAX_DELAY_S: u64 = (1 << LEVELS) - 1;
/// Where level 0 sends due messages, routed by queue name.
pub(crate) fn deliver(options: QueueOptions) -> &'static str {
    if options.quorum {
        "celery_delayed_delivery"
    } else {
        "taskstack.delay.deliver"
    }
}

/// The exchange and queue of delay level `level`.
pub(crate) fn level_name(options: QueueOptions, level: u32) -> String {
    if options.quorum {
        format!("celery_delayed_{level}")
    } else {
        format!("taskstack.delay.{level}")
    }
}

/// The exchange a delayed message is published to (the highest level).
pub(crate) fn delay_entry(options: QueueOptions) -> String {
    level_name(options, LEVELS - 1)
}

/// The routing key of a message for `queue` delayed `delay_s` seconds.
pub(crate) fn delay_routing_key(delay_s: u64, queue: &str) -> String {
    let d = delay_s.min(MAX_DELAY_S);
    let mut key = String::with_capacity(LEVELS as usize * 2 + queue.len());
    for bit in (0..LEVELS).rev() {
        key.push(if d >> bit & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// The topic pattern matching bit `level` = `value` of a delay key.
fn bit_pattern(level: u32, value: char) -> String {
    let mut p = "*.".repeat((LEVELS - 1 - level) as usize);
    p.push(value);
    p.push_str(".#");
    p
}

/// The deliver exchange's pattern for `queue`: any delay, exactly its name.
fn deliver_pattern(queue: &str) -> String {
    format!("{}{queue}", "*.".repeat(LEVELS as usize))
}

/// How work and delay queues are declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueOptions {
    /// Declare queues as quorum queues (replicated; RabbitMQ 3.8+). Delay
    /// levels then dead-letter with `at-least-once` (RabbitMQ 3.10+).
    pub quorum: bool,
    /// Work queues get `x-max-priority` = this (classic queues; as kombu's
    /// `Queue(max_priority=...)`), so RabbitMQ serves higher priorities first.
    pub max_priority: Option<u8>,
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn exchange_options() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn queue_arguments(options: QueueOptions) -> FieldTable {
    let mut args = FieldTable::default();
    if options.quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    args
}

/// Declares work queue `queue` as Celery does and binds it to the deliver
/// exchange (declared by [`declare_delays`] first). A PRECONDITION_FAILED
/// reply (the queue exists with other arguments) closes `channel`.
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    options: QueueOptions,
) -> Result<(), AmqpError> {
    let op = "declare queue";
    channel
        .exchange_declare(
            ShortString::from(queue),
            ExchangeKind::Direct,
            exchange_options(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::declare(op, "exchange", queue, &e))?;
    let mut args = queue_arguments(options);
    if let Some(p) = options.max_priority {
        // A signed 32-bit integer, as py-amqp encodes kombu's int.
        args.insert("x-max-priority".into(), AMQPValue::LongInt(i32::from(p)));
    }
    channel
        .queue_declare(ShortString::from(queue), durable(), args)
        .await
        .map_err(|e| AmqpError::declare(op, "queue", queue, &e))?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(queue),
            ShortString::from(queue),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::of(op, &e))?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(deliver(options)),
            ShortString::from(deliver_pattern(queue)),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::of(op, &e))
}

/// Declares the delay levels and the deliver exchange (idempotent).
pub(crate) async fn declare_delays(
    channel: &Channel,
    options: QueueOptions,
) -> Result<(), AmqpError> {
    let op = "declare delay levels";
    let topic = |name: String| async move {
        channel
            .exchange_declare(
                ShortString::from(name.as_str()),
                ExchangeKind::Topic,
                exchange_options(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::declare(op, "exchange", &name, &e))
    };
    topic(deliver(options).to_owned()).await?;
    for level in 0..LEVELS {
        let name = level_name(options, level);
        let next = if level == 0 {
            deliver(options).to_owned()
        } else {
            level_name(options, level - 1)
        };
        topic(name.clone()).await?;
        let mut args = queue_arguments(options);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(1000 << level),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(next.as_str())),
        );
        if options.quorum {
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        channel
            .queue_declare(ShortString::from(name.as_str()), durable(), args)
            .await
            .map_err(|e| AmqpError::declare(op, "queue", &name, &e))?;
        channel
            .queue_bind(
                ShortString::from(name.as_str()),
                ShortString::from(name.as_str()),
                ShortString::from(bit_pattern(level, '1')),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::of(op, &e))?;
        channel
            .exchange_bind(
                ShortString::from(next.as_str()),
                ShortString::from(name.as_str()),
                ShortString::from(bit_pattern(level, '0')),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::of(op, &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_keys_spell_the_seconds_in_binary_then_the_queue() {
        let k = delay_routing_key(5, "celery");
        assert_eq!(k, format!("{}1.0.1.celery", "0.".repeat(25)));
        assert_eq!(
            delay_routing_key(u64::MAX, "a.b"),
            format!("{}a.b", "1.".repeat(28))
        );
        assert_eq!(bit_pattern(0, '1'), format!("{}1.#", "*.".repeat(27)));
        assert_eq!(bit_pattern(27, '0'), "0.#");
        assert_eq!(deliver_pattern("q"), format!("{}q", "*.".repeat(28)));
    }
}
