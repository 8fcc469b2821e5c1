//! The beat engine on the in-memory backend, on paused time: schedules,
//! leader handover and outages play out in simulated minutes, each test in
//! milliseconds of real time.

use super::tests::tick;
use super::{Beat, BeatSettings, BeatSummary, publish};
use crate::backend::{Backend, MemoryBackend, Use};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn settings() -> BeatSettings {
    BeatSettings {
        entries: vec![tick("10s")],
        lock_ttl: Duration::from_secs(6),
        missed_grace: Duration::from_secs(300),
        state_file: None,
        standby_interval: Duration::from_secs(1),
    }
}

struct Running {
    id: String,
    stop: CancellationToken,
    run: JoinHandle<Result<BeatSummary, super::BeatError>>,
}

impl Running {
    fn start(b: &Arc<dyn Backend>) -> Self {
        let beat = Beat::on_backend(Arc::clone(b), settings());
        let id = beat.id().to_owned();
        let stop = CancellationToken::new();
        let run = tokio::spawn(beat.run(None, stop.clone().cancelled_owned()));
        Self { id, stop, run }
    }

    async fn stop(self) -> BeatSummary {
        self.stop.cancel();
        self.run.await.expect("join").expect("beat run")
    }
}

/// Every slot published so far (ms), in publishing order, taken off the queue.
async fn published(b: &dyn Backend, into: &mut Vec<i64>) {
    let mut c = b.consume("reader");
    let q = ["q".to_owned()];
    loop {
        let got = c.take(&q, 100, Duration::from_secs(60), usize::MAX).await;
        let got = got.expect("take");
        if got.is_empty() {
            return;
        }
        let seqs: Vec<_> = got.iter().map(|d| d.seq).collect();
        for d in &got {
            let text = d.text().expect("utf-8");
            let (entry, slot) = publish::beat_headers(text).expect("beat headers");
            assert_eq!(entry, "tick");
            into.push(slot.timestamp_millis());
        }
        let acks: Vec<_> = seqs
            .into_iter()
            .map(|seq| crate::broker::Settle {
                seq,
                result: None,
                started: None,
            })
            .collect();
        c.settle(&acks, Duration::from_secs(1)).await.expect("ack");
    }
}

/// Asserts `slots` are distinct, 10 s apart, with no gap.
fn assert_each_slot_once(slots: &[i64]) {
    let distinct: BTreeSet<_> = slots.iter().collect();
    assert_eq!(
        distinct.len(),
        slots.len(),
        "a slot published twice: {slots:?}"
    );
    let sorted: Vec<_> = distinct.into_iter().copied().collect();
    for pair in sorted.windows(2) {
        assert_eq!(pair[1] - pair[0], 10_000, "a slot missing: {sorted:?}");
    }
}

#[test]
fn the_leader_publishes_each_slot_once() {
    on_paused_time(
        "the_leader_publishes_each_slot_once",
        the_leader_publishes_each_slot_once_on_paused_time,
    );
}

async fn the_leader_publishes_each_slot_once_on_paused_time() {
    let b: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let beat = Running::start(&b);
    tokio::time::sleep(Duration::from_secs(95)).await;
    let summary = beat.stop().await;
    let mut slots = Vec::new();
    published(&*b, &mut slots).await;
    assert!((9..=10).contains(&slots.len()), "{slots:?}");
    assert_eq!(summary.published, slots.len() as u64);
    assert_each_slot_once(&slots);
    let last = b.slot_ledger(Use::Request).last_slots(&["tick"]).await;
    assert_eq!(last.expect("ledger"), [slots.last().copied()]);
}

#[test]
fn a_standby_takes_over_without_repeating_or_skipping_a_slot() {
    on_paused_time(
        "a_standby_takes_over_without_repeating_or_skipping_a_slot",
        a_standby_takes_over_without_repeating_or_skipping_a_slot_on_paused_time,
    );
}

async fn a_standby_takes_over_without_repeating_or_skipping_a_slot_on_paused_time() {
    let mem = MemoryBackend::new();
    let b: Arc<dyn Backend> = Arc::new(mem.clone());
    let (one, two) = (Running::start(&b), Running::start(&b));
    tokio::time::sleep(Duration::from_secs(35)).await;
    let instances: Vec<String> = mem.beat_instances().into_iter().map(|(id, _)| id).collect();
    let mut both = vec![one.id.clone(), two.id.clone()];
    both.sort();
    assert_eq!(instances, both, "both announce themselves");
    let holder = b.leader_lock(Use::Request).holder().await.expect("lock");
    let holder = holder.expect("someone leads");
    let (leader, standby) = if holder.contains(&one.id) {
        (one, two)
    } else {
        (two, one)
    };
    let first = leader.stop().await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let second = standby.stop().await;
    assert!(
        first.published >= 3 && second.published >= 3,
        "{first:?} {second:?}"
    );
    let mut slots = Vec::new();
    published(&*b, &mut slots).await;
    assert_each_slot_once(&slots);
    assert!(mem.beat_instances().is_empty(), "records forgotten at stop");
}

/// Runs `scenario` on its own paused-time runtime and fails instead of
/// hanging when it does not finish within 30 s of real time: a beat that
/// loops without awaiting a timer stops simulated time for good.
fn on_paused_time<F, Fut>(what: &str, scenario: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(scenario())));
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!(
            "{what}: simulated time stood still for 30 s of real time \
             (the beat loops without waiting for a timer)"
        ),
    }
}

/// A 40 s outage from 25 s in, with the 10 s slots at `phase_ms` past a
/// multiple of 10 s of the start.
async fn outage(phase_ms: i64) {
    // 2027-01-15T08:00:00Z, a multiple of 10 s.
    let start = 1_800_000_000_000 - phase_ms;
    let mem = MemoryBackend::with_clock(crate::backend::TokioClock::starting_at(start));
    let b: Arc<dyn Backend> = Arc::new(mem.clone());
    let beat = Running::start(&b);
    tokio::time::sleep(Duration::from_secs(25)).await;
    // Longer than the lock's TTL: the lease runs out, leadership is lost.
    mem.set_available(false);
    tokio::time::sleep(Duration::from_secs(40)).await;
    mem.set_available(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    beat.stop().await;
    let mut slots = Vec::new();
    published(&*b, &mut slots).await;
    // 85 s of schedule: 8 or 9 slots, the ones due in the outage included.
    assert!(
        (8..=9).contains(&slots.len()),
        "phase {phase_ms} ms: {slots:?}"
    );
    assert_each_slot_once(&slots);
}

#[test]
fn slots_missed_in_an_outage_are_caught_up_once() {
    // Where the slots fall against the outage decides what fails first (a
    // heartbeat, a renewal or a publish) and what a failure leaves behind:
    // every phase, 250 ms apart.
    for phase_ms in (0..10_000).step_by(250) {
        on_paused_time(&format!("slots at phase {phase_ms} ms"), move || {
            outage(phase_ms)
        });
    }
}
