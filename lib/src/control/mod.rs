//! Celery's remote control (`celery inspect`, `celery control`, Flower's
//! buttons, `AsyncResult.revoke()`) for taskstack workers, over kombu's
//! pidbox: the worker binds `<nodename>.celery.pidbox` to the
//! `celery.pidbox` fanout exchange (on Redis it listens on
//! `/<db>.celery.pidbox`; on RabbitMQ it consumes that queue, `amqp`), and
//! answers to the client's reply queue with the ticket, as a Celery worker
//! does. The commands are in `commands`; `Monitor` is what they see of
//! the worker (reserved and running requests, revoked ids, counters) and
//! sends the task events of [`crate::events`].
//!
//! Whoever can write to the broker can send these commands.
//! `worker_remote_control` limits them: see [`RemoteControl`].

#[cfg(feature = "amqp")]
mod amqp;
pub(crate) mod commands;
pub mod kombu;
mod monitor;
pub(crate) mod pidbox;
mod runtime;

pub(crate) use monitor::{Monitor, Tracked};

pub use crate::config::RemoteControl;

/// The exchange remote-control commands are broadcast on.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";

/// The pidbox queue of `nodename`.
pub fn pidbox_queue(nodename: &str) -> String {
    format!("{nodename}.{PIDBOX_EXCHANGE}")
}

/// The default node name: `taskstack@<hostname>`.
pub fn default_nodename() -> String {
    format!("taskstack@{}", crate::worker::hostname())
}

/// What holds a claimed node name beyond the claim itself: on RabbitMQ
/// the connection whose exclusive pidbox queue holds it.
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    #[cfg(feature = "amqp")]
    pub(crate) mailbox: Option<crate::backend::amqp::mailbox::Mailbox>,
}

/// The node name a worker goes by, claimed in the pidbox bindings on Redis
/// or by declaring its pidbox queue exclusively on RabbitMQ: the configured
/// one (a clash is only warned about, as kombu does), or
/// `taskstack@<hostname>`, or `taskstack-<pid>@<hostname>` when another
/// worker on this host holds that or the broker cannot be asked (so
/// several workers on one host get distinct names, even when they start
/// while the broker is down).
pub(crate) async fn claim_nodename(
    backend: &dyn crate::backend::Backend,
    configured: Option<&str>,
) -> (String, Claimed) {
    #[cfg(feature = "amqp")]
    if let Some(amqp) = backend.amqp() {
        return amqp::claim(amqp, configured).await;
    }
    (
        claim_on_redis(backend.redis(), configured).await,
        Claimed::default(),
    )
}

fn fallback_nodename() -> String {
    format!(
        "taskstack-{}@{}",
        std::process::id(),
        crate::worker::hostname()
    )
}

async fn claim_on_redis(
    broker: Option<&crate::broker::Broker>,
    configured: Option<&str>,
) -> String {
    let wanted = configured.map_or_else(default_nodename, str::to_owned);
    let Some(broker) = broker else {
        return wanted;
    };
    let claim = |name: String| async move {
        let mut lane = broker.broker_pool().shared_lane();
        let added: Result<i64, crate::broker::BrokerError> = async {
            crate::broker::on_lane!(&mut lane, "claim worker node name", |c| redis::cmd("SADD")
                .arg(kombu::binding_key(PIDBOX_EXCHANGE))
                .arg(kombu::binding_member("", &pidbox_queue(&name)))
                .query_async::<i64>(c))
        }
        .await;
        (name, added)
    };
    match claim(wanted).await {
        (name, Ok(1)) => name,
        (name, Ok(_)) if configured.is_some() => {
            tracing::warn!(
                nodename = %name,
                "another worker is bound as this node name (or one stopped without unbinding): \
                 remote-control replies may come from both; give each worker its own \
                 worker_nodename"
            );
            name
        }
        (name, Ok(_)) => {
            let (other, _) = claim(fallback_nodename()).await;
            tracing::info!(taken = %name, nodename = %other, "node name taken on this host; using another");
            other
        }
        (name, Err(e)) if configured.is_some() => {
            tracing::warn!(error = %e, nodename = %name, "cannot claim the node name; using it unchecked");
            name
        }
        // Unchecked, the default name could be another worker's on this
        // host: the name with this process's id cannot be.
        (name, Err(e)) => {
            let other = fallback_nodename();
            tracing::warn!(error = %e, wanted = %name, nodename = %other, "cannot claim the node name; using this host's unique one");
            other
        }
    }
}
