//! Sequential round trips: single echo tasks and plain Redis `PING`s.

use crate::ECHO;
use crate::stats::{Latency, percentiles};
use anyhow::{Result, ensure};
use serde_json::json;
use std::time::{Duration, Instant};
use taskstack::proto::TaskState;
use taskstack::{Producer, TaskRequest};

/// How a round trip's producer asks for the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Api {
    /// `Producer::send_and_wait`: the result's subscription is made while
    /// the task is sent.
    SendAndWait,
    /// `Producer::send_task`, then `Producer::wait`: the subscription is
    /// made once the send has answered.
    SendThenWait,
}

/// Sends one echo task at a time and waits for its result; `warmup` round
/// trips first, then `samples` measured ones (in ms).
pub(crate) async fn measure_latency(
    producer: &Producer,
    warmup: usize,
    samples: usize,
    api: Api,
) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    let wait = Duration::from_secs(10);
    for i in 0..warmup + samples {
        let t = Instant::now();
        let result = match api {
            Api::SendAndWait => {
                let req = TaskRequest::new(ECHO, vec![json!(i)]);
                producer.send_and_wait(&req, wait).await?
            }
            Api::SendThenWait => {
                let id = producer.send_task(ECHO, vec![json!(i)]).await?;
                producer.wait(&id, wait).await?
            }
        };
        let elapsed = t.elapsed();
        ensure!(
            result.status == TaskState::Success,
            "latency task {} ended {:?}",
            result.task_id,
            result.status
        );
        if i >= warmup {
            times.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    Ok(percentiles(times))
}

/// Sequential PINGs on the bench's own connection: the unit a round trip
/// costs on this machine.
pub(crate) async fn ping_round_trips(
    con: &mut redis::aio::MultiplexedConnection,
    n: usize,
) -> Result<Latency> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(con).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(percentiles(times))
}
