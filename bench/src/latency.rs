//! Sequential round trips: single echo tasks and plain Redis `PING`s.

use crate::ECHO;
use crate::stats::{Latency, percentiles};
use anyhow::{Result, ensure};
use serde_json::json;
use std::time::{Duration, Instant};
use taskstack::Producer;
use taskstack::proto::TaskState;

/// Sends one echo task at a time and waits for its result; `warmup` round
/// trips first, then `samples` measured ones (in ms).
pub(crate) async fn measure_latency(
    producer: &Producer,
    warmup: usize,
    samples: usize,
) -> Result<Latency> {
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t = Instant::now();
        let id = producer.send_task(ECHO, vec![json!(i)]).await?;
        let result = producer.wait(&id, Duration::from_secs(10)).await?;
        let elapsed = t.elapsed();
        ensure!(
            result.status == TaskState::Success,
            "latency task {id} ended {:?}",
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
