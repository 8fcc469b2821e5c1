//! The beat's Redis steps against a real `redis-server` (one per test, on a
//! free port): the lock scripts, the fenced exactly-once publish script, and
//! an in-process run with its own shutdown trigger.

use super::*;
use crate::config::{RedisTarget, ScheduleEntry};
use crate::proto::Keys;
use chrono::{DateTime, Utc};
use lock::LockHolder;
use publish::Outcome;

use crate::test_redis::{Server, server};

fn broker(s: &Server) -> Broker {
    let target = RedisTarget::from_url(&s.url).expect("url");
    let pool = crate::broker::RedisPool::new(&target, 4, Duration::from_secs(2)).expect("pool");
    Broker::new(pool.clone(), pool, Keys::new("t"))
}

pub(super) fn tick(every: &str) -> Entry {
    Entry::compile(&ScheduleEntry {
        name: "tick".into(),
        task: "proj.tick".into(),
        args: vec![],
        kwargs: serde_json::Map::new(),
        queue: "q".into(),
        cron: None,
        every: Some(humantime::parse_duration(every).expect("duration")),
        timezone: "UTC".into(),
        enabled: true,
        expires: Some(Duration::from_secs(60)),
    })
    .expect("compiles")
}

async fn queue(b: &Broker) -> Vec<String> {
    let mut c = b.broker_pool().get("read").await.expect("connection");
    redis::cmd("LRANGE")
        .arg("q")
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .expect("lrange")
}

#[tokio::test]
async fn the_lock_is_taken_once_renewed_and_released_only_by_its_holder() {
    let s = server();
    let b = broker(&s);
    let (k, mut lane) = (b.keys(), b.broker_pool().lane());
    let ttl = Duration::from_secs(5);
    let a = LockHolder::new("a", "h").value();
    let other = LockHolder::new("b", "h").value();
    assert_eq!(
        lock::try_acquire(&mut lane, k, &a, ttl)
            .await
            .expect("redis"),
        None
    );
    assert_eq!(
        lock::try_acquire(&mut lane, k, &other, ttl)
            .await
            .expect("redis"),
        Some(Some(a.clone())),
        "held: the current value comes back"
    );
    let h = lock::holder(&mut lane, k)
        .await
        .expect("redis")
        .expect("held");
    assert_eq!((h.id.as_str(), h.pid), ("a", std::process::id()));
    assert!(lock::renew(&mut lane, k, &a, ttl).await.expect("redis"));
    assert!(!lock::renew(&mut lane, k, &other, ttl).await.expect("redis"));
    assert!(!lock::release(&mut lane, k, &other).await.expect("redis"));
    assert!(lock::release(&mut lane, k, &a).await.expect("redis"));
    assert!(
        !lock::renew(&mut lane, k, &a, ttl).await.expect("redis"),
        "gone"
    );
    assert_eq!(
        lock::try_acquire(&mut lane, k, &other, ttl)
            .await
            .expect("redis"),
        None
    );
}

#[tokio::test]
async fn publishing_is_fenced_by_the_lock_and_once_per_slot() {
    let s = server();
    let b = broker(&s);
    let (k, mut lane) = (b.keys(), b.broker_pool().lane());
    let e = tick("1s");
    let slot = |secs: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).expect("t");
    let margin = Duration::from_millis(500);
    let ours = LockHolder::new("a", "h").value();
    let stale = LockHolder::new("a", "h").value(); // same instance, an older term
    assert_ne!(ours, stale, "each term has its own token");

    let mut publish = async |value: &str, at: DateTime<Utc>| {
        let payload = publish::message(&e, at, "a");
        publish::publish(&mut lane, k, value, margin, &e, at, &payload)
            .await
            .expect("redis")
    };
    // Nobody holds the lock: nothing is published.
    assert_eq!(publish(&ours, slot(0)).await, Outcome::NotLeader);
    let mut lock_lane = b.broker_pool().lane();
    lock::try_acquire(&mut lock_lane, k, &ours, Duration::from_secs(5))
        .await
        .expect("redis");
    assert_eq!(publish(&stale, slot(0)).await, Outcome::NotLeader, "fenced");
    assert_eq!(publish(&ours, slot(0)).await, Outcome::Published);
    let last = slot(0).timestamp_millis();
    assert_eq!(
        publish(&ours, slot(0)).await,
        Outcome::AlreadyPublished { last_ms: last }
    );
    assert_eq!(
        publish(&ours, slot(-5)).await,
        Outcome::AlreadyPublished { last_ms: last },
        "slots only move forward"
    );
    assert_eq!(publish(&ours, slot(1)).await, Outcome::Published);
    assert_eq!(
        publish::last_slots(&mut lock_lane, k, &["tick", "other"])
            .await
            .expect("redis"),
        vec![Some(slot(1).timestamp_millis()), None]
    );
    // Ours, but about to expire: fail closed.
    let mut c = b.broker_pool().get("shorten").await.expect("connection");
    redis::cmd("PEXPIRE")
        .arg(k.beat_lock())
        .arg(300)
        .query_async::<()>(&mut c)
        .await
        .expect("pexpire");
    assert!(matches!(
        publish(&ours, slot(2)).await,
        Outcome::LeaseTooShort { pttl_ms } if pttl_ms <= 300
    ));

    let msgs = queue(&b).await;
    assert_eq!(msgs.len(), 2, "exactly the two published slots");
    let mut seen: Vec<_> = msgs
        .iter()
        .map(|m| publish::beat_headers(m).expect("headers"))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![("tick".to_owned(), slot(0)), ("tick".to_owned(), slot(1))]
    );
    let m = crate::proto::envelope::decode(&msgs[0]).expect("a Celery message");
    assert_eq!(m.task, "proj.tick");
    assert_eq!(m.expires, Some(slot(1) + chrono::Duration::seconds(60)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_leads_publishes_and_releases_the_lock_at_shutdown() {
    let s = server();
    let b = broker(&s);
    let settings = BeatSettings {
        entries: vec![tick("1s")],
        lock_ttl: Duration::from_secs(3),
        missed_grace: Duration::from_secs(60),
        state_file: None,
        standby_interval: Duration::from_millis(200),
    };
    let beat = Beat::new(b.clone(), settings);
    let metrics = beat.metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stop = CancellationToken::new();
    let run = tokio::spawn(beat.run(Some(listener), stop.clone().cancelled_owned()));
    let start = std::time::Instant::now();
    while metrics.published_total() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "two slots published within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.is_leader());
    stop.cancel();
    let summary = run.await.expect("joined").expect("clean stop");
    assert!(summary.published >= 2);
    let mut lane = b.broker_pool().lane();
    assert_eq!(
        lock::holder(&mut lane, b.keys()).await.expect("redis"),
        None,
        "released at shutdown"
    );
    assert_eq!(queue(&b).await.len() as u64, summary.published);
}
