//! Starts and revocations with results in PostgreSQL, whose exclusion lives
//! on the broker's Redis (running marks, revoked and started markers): each
//! order of a start and a revocation, and each crash point of a
//! revocation (marker set, row not; the task finishing between the
//! revocation's check and its row; the worker killed after its mark).

use super::tests::backend;
use super::{PostgresBackend, store};
use crate::backend::{Backend, Outgoing, PendingRecord, Use};
use crate::broker::{self, RevokeOutcome, Settle, StartVerdict, Starting};
use crate::proto::{TaskResult, TaskState};
use crate::test_postgres::PgServer;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(3600);
const Q: &str = "q";

fn json(r: &TaskResult) -> String {
    serde_json::to_string(r).expect("json")
}

/// Sends one message per id (its payload is the id), each with its
/// PENDING row unless `pending` is false (a redelivered copy).
async fn send(b: &PostgresBackend, ids: &[&str], pending: bool) {
    let batch: Vec<Outgoing> = ids
        .iter()
        .map(|id| Outgoing {
            queue_key: Q.to_owned(),
            payload: (*id).to_owned(),
            due_ms: None,
            pending: pending.then(|| PendingRecord {
                task_id: (*id).to_owned(),
                record: json(&TaskResult::pending(id, "t", Q)),
                ttl: LONG,
            }),
        })
        .collect();
    b.enqueue(Use::Request).enqueue(&batch).await.expect("send");
}

fn starting(id: &str, seq: u64) -> Starting {
    let mut r = TaskResult::pending(id, "t", Q);
    r.status = TaskState::Started;
    Starting {
        task_id: id.to_owned(),
        record: json(&r),
        seq,
    }
}

fn revoked(id: &str) -> String {
    let mut r = TaskResult::pending(id, "t", Q);
    r.status = TaskState::Revoked;
    json(&r)
}

fn settle(seq: u64, id: &str, state: Option<TaskState>) -> Settle {
    Settle {
        seq,
        result: state.map(|s| {
            let mut r = TaskResult::pending(id, "t", Q);
            r.status = s;
            (id.to_owned(), json(&r))
        }),
        started: Some(id.to_owned()),
    }
}

/// The row's state and revoked flag, `None` without a row.
fn row(pg: &PgServer, db: &str, id: &str) -> Option<String> {
    let out = pg
        .psql(
            db,
            &format!("SELECT state, revoked FROM taskstack_results WHERE task_id = '{id}'"),
        )
        .expect("psql");
    let out = out.trim();
    (!out.is_empty()).then(|| out.to_owned())
}

async fn redis_cmd<T: redis::FromRedisValue>(b: &PostgresBackend, c: &redis::Cmd) -> T {
    let mut lane = b.redis.broker().broker_pool().lane();
    let conn = lane.conn("test").await.expect("conn");
    c.query_async(conn).await.expect("redis command")
}

/// The worker's running marks (task ids).
async fn marks(b: &PostgresBackend, worker: &str) -> Vec<String> {
    let key = b.redis.broker().keys().running(worker);
    let mut m: Vec<String> = redis_cmd(b, redis::cmd("HKEYS").arg(key)).await;
    m.sort();
    m
}

/// The broker's half of a revocation alone (as if the revoker died after
/// it); `true`: marked.
async fn mark(b: &PostgresBackend, id: &str) -> bool {
    let broker = b.redis.broker();
    let mut lane = broker.broker_pool().lane();
    broker::mark_revoked(&mut lane, broker.keys(), id, LONG)
        .await
        .expect("mark")
}

#[tokio::test]
async fn a_start_marks_on_redis_and_excludes_a_revocation_in_either_order() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    assert!(b.marks_starts(), "a worker need not build STARTED records");
    send(&b, &["a", "b", "c"], true).await;
    let mut c = b.consume("w1");
    let held = c
        .take(&[Q.into()], 3, LONG, usize::MAX)
        .await
        .expect("take");
    assert_eq!(held.len(), 3);
    let mut ts = b.task_states(Use::Loop);

    // Revoked first: the start skips it.
    let r = ts.revoke("c", &revoked("c"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Revoked);
    assert_eq!(row(&pg, &db, "c").as_deref(), Some("REVOKED|t"));
    let r = ts.revoke("c", &revoked("c"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::AlreadyRevoked);
    let batch: Vec<Starting> = ["a", "b", "c"]
        .iter()
        .zip(&held)
        .map(|(id, d)| starting(id, d.seq))
        .collect();
    let go = ts
        .start_batch(Some("w1"), &batch, LONG, false)
        .await
        .expect("start");
    assert_eq!(
        go,
        [StartVerdict::Run, StartVerdict::Run, StartVerdict::Revoked]
    );
    // Marked on Redis only: no STARTED row.
    assert_eq!(row(&pg, &db, "a").as_deref(), Some("PENDING|f"));
    assert_eq!(marks(&b, "w1").await, ["a", "b"]);

    // Started first: the revocation is refused, and leaves no marker.
    let r = ts.revoke("a", &revoked("a"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Refused(TaskState::Started));
    assert_eq!(row(&pg, &db, "a").as_deref(), Some("PENDING|f"));
    let marker = b.redis.broker().keys().revoked("a");
    let marked: bool = redis_cmd(&b, redis::cmd("EXISTS").arg(marker)).await;
    assert!(!marked, "a refused revocation leaves no revoked marker");

    // The settlement commits the rows, then takes holds and marks.
    let done = [
        settle(held[0].seq, "a", Some(TaskState::Success)),
        settle(held[1].seq, "b", None),
        settle(held[2].seq, "c", None),
    ];
    c.settle(&done, LONG).await.expect("settle");
    assert_eq!(row(&pg, &db, "a").as_deref(), Some("SUCCESS|f"));
    assert!(
        marks(&b, "w1").await.is_empty(),
        "no mark outlives its hold"
    );
    let r = ts.revoke("a", &revoked("a"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Refused(TaskState::Success));
    assert_eq!(row(&pg, &db, "c").as_deref(), Some("REVOKED|t"));

    // With task_track_started the STARTED row is written too.
    send(&b, &["d"], true).await;
    let held = c
        .take(&[Q.into()], 1, LONG, usize::MAX)
        .await
        .expect("take");
    let go = ts
        .start_batch(Some("w1"), &[starting("d", held[0].seq)], LONG, true)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    assert_eq!(row(&pg, &db, "d").as_deref(), Some("STARTED|f"));
    let r = ts.revoke("d", &revoked("d"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Refused(TaskState::Started));
}

#[tokio::test]
async fn every_crash_point_of_a_revocation_ends_in_one_consistent_answer() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    let mut ts = b.task_states(Use::Loop);
    let mut c = b.consume("w1");
    let mut results = b.results(Use::Request);

    // 1. Accepted on Redis (marker set), then the revoker died before the
    // row: no worker starts the task, and the one that skips it records
    // REVOKED (waking waiters); a repeated revocation stores its row too.
    send(&b, &["e", "f"], true).await;
    assert!(mark(&b, "e").await);
    assert!(mark(&b, "f").await);
    assert_eq!(row(&pg, &db, "e").as_deref(), Some("PENDING|f"));
    let r = ts.revoke("f", &revoked("f"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Revoked, "a repeated revocation completes");
    let held = c
        .take(&[Q.into()], 2, LONG, usize::MAX)
        .await
        .expect("take");
    let batch = [starting("e", held[0].seq), starting("f", held[1].seq)];
    let go = ts
        .start_batch(Some("w1"), &batch, LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Revoked, StartVerdict::Revoked]);
    let e = results
        .wait("e", Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(e.map(|r| r.status), Some(TaskState::Revoked));
    assert_eq!(row(&pg, &db, "e").as_deref(), Some("REVOKED|t"));
    assert_eq!(row(&pg, &db, "f").as_deref(), Some("REVOKED|t"));
    let done = [
        settle(held[0].seq, "e", None),
        settle(held[1].seq, "f", None),
    ];
    c.settle(&done, LONG).await.expect("settle");

    // A row revoked by an older build (the flag, no marker on Redis): a
    // repeated revocation sets the marker, so the task is not started.
    send(&b, &["old"], true).await;
    let sql = "UPDATE taskstack_results SET state = 'REVOKED', revoked = true \
               WHERE task_id = 'old'";
    pg.psql(&db, sql).expect("psql");
    let r = ts
        .revoke("old", &revoked("old"), LONG)
        .await
        .expect("revoke");
    assert_eq!(r, RevokeOutcome::AlreadyRevoked);
    let held = c
        .take(&[Q.into()], 1, LONG, usize::MAX)
        .await
        .expect("take");
    let go = ts
        .start_batch(Some("w1"), &[starting("old", held[0].seq)], LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Revoked]);
    c.settle(&[settle(held[0].seq, "old", None)], LONG)
        .await
        .expect("settle");

    // 2. The task finished between the revocation's first check and its
    // row: the row keeps SUCCESS and the answer says so; a redelivered
    // copy is skipped without touching the row.
    send(&b, &["g"], true).await;
    let held = c
        .take(&[Q.into()], 1, LONG, usize::MAX)
        .await
        .expect("take");
    assert!(
        store::revocable(&b.pg, "g").await.expect("check").is_ok(),
        "PENDING: revocable at first"
    );
    let go = ts
        .start_batch(Some("w1"), &[starting("g", held[0].seq)], LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    c.settle(&[settle(held[0].seq, "g", Some(TaskState::Success))], LONG)
        .await
        .expect("settle");
    assert!(
        mark(&b, "g").await,
        "finished: no mark is left to refuse on"
    );
    let r = store::revoke(&b.pg, "g", &revoked("g"), LONG).await;
    assert_eq!(
        r.expect("revoke"),
        RevokeOutcome::Refused(TaskState::Success)
    );
    send(&b, &["g"], false).await;
    let held = c
        .take(&[Q.into()], 1, LONG, usize::MAX)
        .await
        .expect("take");
    let go = ts
        .start_batch(Some("w1"), &[starting("g", held[0].seq)], LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Revoked]);
    assert_eq!(row(&pg, &db, "g").as_deref(), Some("SUCCESS|f"));
    c.settle(&[settle(held[0].seq, "g", None)], LONG)
        .await
        .expect("settle");

    // 3. The worker was killed after marking h started: once its lease is
    // reaped the started marker refuses the revocation; another worker
    // runs the restored message and commits the one result.
    send(&b, &["h"], true).await;
    let mut dying = b.consume("w-dead");
    let short = Duration::from_millis(300);
    let held = dying
        .take(&[Q.into()], 1, short, usize::MAX)
        .await
        .expect("take");
    let go = ts
        .start_batch(Some("w-dead"), &[starting("h", held[0].seq)], LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run]);
    drop(dying);
    let mut leases = b.leases(Use::Loop);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if leases.reap_expired().await.expect("reap").workers > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the lease was never reaped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(marks(&b, "w-dead").await.is_empty());
    let r = ts.revoke("h", &revoked("h"), LONG).await.expect("revoke");
    assert_eq!(r, RevokeOutcome::Refused(TaskState::Started));
    let held = c
        .take(&[Q.into()], 1, LONG, usize::MAX)
        .await
        .expect("take");
    assert_eq!(held.first().and_then(|d| d.text()), Some("h"));
    let go = ts
        .start_batch(Some("w1"), &[starting("h", held[0].seq)], LONG, false)
        .await
        .expect("start");
    assert_eq!(go, [StartVerdict::Run], "the redelivery runs");
    c.settle(&[settle(held[0].seq, "h", Some(TaskState::Success))], LONG)
        .await
        .expect("settle");
    assert_eq!(row(&pg, &db, "h").as_deref(), Some("SUCCESS|f"));
    assert!(marks(&b, "w1").await.is_empty());
}
