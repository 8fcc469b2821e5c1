//! The remote control of a worker whose broker is RabbitMQ:
//! the node name held by an exclusive pidbox queue and the command loop
//! (`backend::amqp::mailbox` has the wire; events go through
//! `events::AmqpSink`).

use super::pidbox::{Reply, answer};
use super::{Claimed, default_nodename, fallback_nodename};
use crate::backend::AmqpBackend;
use crate::backend::amqp::mailbox::{Mailbox, OpenError};
use crate::worker::shared::{Shared, jitter};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Claims the node name by declaring its pidbox queue exclusively: the
/// configured name (taken: warned, and the listener keeps trying), else
/// `taskstack@<hostname>`, else (taken, or RabbitMQ unreachable)
/// `taskstack-<pid>@<hostname>`.
pub(super) async fn claim(amqp: &AmqpBackend, configured: Option<&str>) -> (String, Claimed) {
    let wanted = configured.map_or_else(default_nodename, str::to_owned);
    let open = |name: String| async move {
        let got = Mailbox::open(amqp.link(), &name).await;
        (name, got)
    };
    let (mut name, got) = match open(wanted).await {
        (name, Err(OpenError::Taken)) if configured.is_none() => {
            let other = fallback_nodename();
            tracing::info!(taken = %name, nodename = %other, "node name taken on this host; using another");
            open(other).await
        }
        other => other,
    };
    let mailbox = match got {
        Ok(m) => Some(m),
        Err(OpenError::Taken) => {
            tracing::warn!(
                nodename = %name,
                "another worker holds this node name's pidbox queue on RabbitMQ: this worker \
                 answers no remote-control command until it is free; give each worker its own \
                 worker_nodename"
            );
            None
        }
        Err(OpenError::Amqp(e)) if configured.is_some() => {
            tracing::warn!(error = %e, nodename = %name, "cannot claim the node name on RabbitMQ; using it unchecked");
            None
        }
        // Unchecked, the default name could be another worker's on this
        // host (the listener would then wait for it forever): the name
        // with this process's id cannot be.
        Err(OpenError::Amqp(e)) => {
            let other = fallback_nodename();
            tracing::warn!(error = %e, wanted = %name, nodename = %other, "cannot claim the node name on RabbitMQ; using this host's unique one");
            name = other;
            None
        }
    };
    (name, Claimed { mailbox })
}

/// Answers commands until `stop`, opening the mailbox again (with
/// backoff, reset by the next command received) whenever its connection
/// ended. With remote control off the
/// mailbox only holds the name: commands are taken and dropped.
pub(super) async fn listen(
    sh: Arc<Shared>,
    mut mailbox: Option<Mailbox>,
    answer_commands: bool,
    stop: CancellationToken,
) {
    let Some(amqp) = sh.backend.amqp() else {
        return;
    };
    let link = amqp.link();
    let nodename = sh.monitor.nodename.clone();
    let mut backoff = Duration::from_millis(100);
    let mut taken_warned = mailbox.is_none();
    while !stop.is_cancelled() {
        let mut m = match mailbox.take().filter(Mailbox::connected) {
            Some(m) => m,
            None => match Mailbox::open(link, &nodename).await {
                Ok(m) => m,
                Err(e) => {
                    // A held name is tried again every 30 s, warned once.
                    let wait = if matches!(e, OpenError::Taken) {
                        if !taken_warned {
                            tracing::warn!(%nodename, "another worker holds this node name's pidbox queue; trying again every 30 s");
                            taken_warned = true;
                        }
                        Duration::from_secs(30)
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for remote-control commands");
                        let b = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        b
                    };
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(jitter(wait)) => {}
                    }
                    continue;
                }
            },
        };
        tracing::debug!(%nodename, answer_commands, "consuming the pidbox queue on RabbitMQ");
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => {
                    m.close().await;
                    return;
                }
                n = m.next() => n,
            };
            let Some(got) = next else {
                tracing::warn!(retry_in = ?backoff, "the remote-control connection to RabbitMQ ended; opening it again");
                m.close().await;
                // Paced: a connection that opens but cannot consume
                // (permissions) must not be reopened in a tight loop.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                break;
            };
            backoff = Duration::from_millis(100);
            if !answer_commands {
                // Remote control is off: the queue only holds the name.
                // Commands are taken and dropped (a Celery worker with
                // remote control off has no pidbox queue, so they would go
                // nowhere), and the consumer notices a broken connection.
                continue;
            }
            let msg = match got {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(reason = %e, "ignoring an unreadable remote-control message");
                    continue;
                }
            };
            let Some(Reply {
                exchange,
                routing_key,
                body,
                headers,
                method,
            }) = answer(&sh, msg.body, &msg.headers).await
            else {
                continue;
            };
            if let Err(e) = m
                .reply(link, &exchange, &routing_key, &body, &headers)
                .await
            {
                tracing::warn!(error = %e, command = %method, "cannot send a remote-control reply");
            }
        }
    }
}
