//! What the conformance suite cannot see of the PostgreSQL store: start-up
//! checks, concurrent migrations, the expiry cleaner and its lock, batch
//! round trips. Each test has its own `postgres` (and Redis when needed).

use super::{PgError, PostgresBackend, prepare, store};
use crate::backend::tests::pg_target;
use crate::backend::{Backend, Use};
use crate::broker::{Broker, RedisPool};
use crate::config::RedisTarget;
use crate::proto::result::Provenance;
use crate::proto::{TaskResult, TaskState};
use crate::test_postgres::PgServer;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn done(id: &str) -> TaskResult {
    let from = Provenance {
        name: "t.add",
        worker: "w",
        retries: 0,
        queue: "q",
        parent_id: None,
    };
    TaskResult::new(id, TaskState::Success, serde_json::json!([1, "two"]), from)
}

pub(super) async fn backend(
    pg: &PgServer,
    db: &str,
) -> (PostgresBackend, crate::test_redis::Server) {
    let redis = crate::test_redis::server();
    let target = pg_target(&pg.url(db));
    prepare(&target, T, T).await.expect("migrate");
    let t = RedisTarget::from_url(&redis.url).expect("url");
    let pool = RedisPool::new(&t, 4, T).expect("pool");
    let broker = Broker::new(pool.clone(), pool, crate::proto::Keys::new("pgtest"));
    let b = PostgresBackend::new(broker, &target, 4, T).expect("backend");
    (b, redis)
}

#[tokio::test]
async fn a_wrong_password_or_missing_database_is_a_configuration_error() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let wrong = crate::config::PgTarget::new(
        "result_backend",
        &pg.url(&db),
        Some(&crate::config::Secret::new("not-the-password")),
    )
    .expect("target");
    let e = prepare(&wrong, T, T).await.expect_err("refused");
    assert!(matches!(e, PgError::Auth { .. }), "{e:?}");
    assert!(e.is_config());
    assert!(e.to_string().contains("result_backend_password"), "{e}");

    let missing = pg_target(&pg.url("no_such_db"));
    let e = prepare(&missing, T, T).await.expect_err("no database");
    assert!(matches!(e, PgError::NoDatabase { .. }), "{e:?}");
    assert!(e.to_string().contains("`result_backend`"), "{e}");
}

#[tokio::test]
async fn many_processes_migrating_at_once_apply_each_migration_once() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let target = pg_target(&pg.url(&db));
    let runs: Vec<_> = (0..12).map(|_| prepare(&target, T, T)).collect();
    for r in futures_util::future::join_all(runs).await {
        r.expect("migrate");
    }
    let applied = pg
        .psql(
            &db,
            "SELECT count(*), max(version) FROM taskstack_schema_migrations",
        )
        .expect("query");
    assert_eq!(
        applied.trim(),
        format!("{}|{}", super::schema::latest(), super::schema::latest())
    );
}

#[tokio::test]
async fn expiry_deletes_exactly_the_expired_rows_under_one_cleaner() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    let mut results = b.results(Use::Request);
    let short: Vec<TaskResult> = (0..25).map(|i| done(&format!("s{i}"))).collect();
    let long: Vec<TaskResult> = (0..7).map(|i| done(&format!("l{i}"))).collect();
    results
        .write(&short, Duration::from_millis(300))
        .await
        .expect("write");
    results
        .write(&long, Duration::from_secs(3600))
        .await
        .expect("write");
    // Expired rows are invisible at once, before any cleaner ran.
    let start = tokio::time::Instant::now();
    while results.read("s0").await.expect("read").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "s0 never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count = |sql: &str| pg.psql(&db, sql).expect("query").trim().to_owned();
    let expired = "SELECT count(*) FROM taskstack_results WHERE expires_at <= now()";
    while count(expired) != "25" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rows never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another cleaner holds the lock: this one does nothing.
    let (client, conn) = super::connect::Connector::new(&pg_target(&pg.url(&db)), T)
        .expect("connector")
        .connect("test")
        .await
        .expect("connect");
    let driver = tokio::spawn(conn);
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::schema::EXPIRE_LOCK],
        )
        .await
        .expect("lock");
    let mut expiry = b.expiry().expect("a PostgreSQL store needs a cleaner");
    assert_eq!(expiry.sweep(10).await.expect("sweep"), None);
    client.batch_execute("COMMIT").await.expect("commit");

    // Bounded batches: 10, 10, 5, then nothing.
    let mut deleted = Vec::new();
    loop {
        let n = expiry.sweep(10).await.expect("sweep").expect("lock free");
        deleted.push(n);
        if n < 10 {
            break;
        }
    }
    assert_eq!(deleted, [10, 10, 5]);
    assert_eq!(count("SELECT count(*) FROM taskstack_results"), "7");
    for r in &long {
        assert_eq!(
            results.read(&r.task_id).await.expect("read").as_ref(),
            Some(r)
        );
    }
    drop(client);
    let _ = driver.await;
}

#[tokio::test]
async fn a_batch_is_one_statement_and_the_later_record_of_a_task_wins() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    let first = done("dup");
    let mut later = done("dup");
    later.result = serde_json::json!("later");
    let batch = vec![first, done("other"), later.clone()];
    b.results(Use::Request)
        .write(&batch, T)
        .await
        .expect("a task twice in a batch is not an error");
    assert_eq!(
        b.results(Use::Request).read("dup").await.expect("read"),
        Some(later)
    );
    let failure = TaskResult::failure(
        "bad",
        TaskState::Failure,
        &crate::proto::ExceptionInfo::builtin("ValueError", "no"),
        Provenance {
            name: "t.add",
            worker: "w",
            retries: 2,
            queue: "q",
            parent_id: Some("p1"),
        },
    );
    b.results(Use::Request)
        .write(std::slice::from_ref(&failure), T)
        .await
        .expect("write");
    assert_eq!(
        b.results(Use::Request).read("bad").await.expect("read"),
        Some(failure)
    );
    let row = pg
        .psql(
            &db,
            "SELECT state, result IS NULL, error->>'exc_type', task_name, retries, queue \
             FROM taskstack_results WHERE task_id = 'bad'",
        )
        .expect("query");
    assert_eq!(row.trim(), "FAILURE|t|ValueError|t.add|2|q");
    let n = store::write(&b.pg, &[], T).await;
    assert!(n.is_ok(), "an empty batch needs no round trip");
}

/// Whether the session of `target` is encrypted (`pg_stat_ssl`).
async fn session_is_tls(target: &crate::config::PgTarget) -> bool {
    let (client, conn) = super::connect::Connector::new(target, T)
        .expect("connector")
        .connect("test")
        .await
        .expect("connect");
    let driver = tokio::spawn(conn);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    drop(client);
    let _ = driver.await;
    ssl
}

#[tokio::test]
async fn tls_require_and_verify_full_work_against_a_server_with_ssl_on() {
    let pg = PgServer::start_tls();
    let db = pg.create_database();
    let ca = pg
        .ca_cert()
        .expect("a TLS server has a CA")
        .display()
        .to_string();
    let verify = format!("sslmode=verify-full&sslrootcert={ca}");
    for (host, query) in [
        ("127.0.0.1", "sslmode=require"),
        ("127.0.0.1", verify.as_str()),
        ("localhost", verify.as_str()),
    ] {
        let target = pg_target(&pg.url_with(host, &db, query));
        prepare(&target, T, T)
            .await
            .unwrap_or_else(|e| panic!("{host} {query}: {e}"));
        assert!(session_is_tls(&target).await, "{host} {query}: encrypted");
        // The pool and the LISTEN connection go over TLS too.
        let redis = crate::test_redis::server();
        let t = RedisTarget::from_url(&redis.url).expect("url");
        let pool = RedisPool::new(&t, 4, T).expect("pool");
        let broker = Broker::new(pool.clone(), pool, crate::proto::Keys::new("pgtls"));
        let b = PostgresBackend::new(broker, &target, 2, T).expect("backend");
        let id = format!("tls-{host}-{}", query.len());
        let mut results = b.results(Use::Request);
        results
            .write(&[done(&id)], T)
            .await
            .expect("write over TLS");
        let r = results.wait(&id, T).await.expect("wait over TLS");
        assert_eq!(r.map(|r| r.status), Some(TaskState::Success));
    }
    // Without sslmode=disable in the URL, a plain session is still allowed
    // by the server: the client's sslmode decides.
    assert!(!session_is_tls(&pg_target(&pg.url(&db))).await);
}

#[tokio::test]
async fn tls_refusals_are_configuration_errors_naming_result_backend() {
    let pg = PgServer::start_tls();
    let db = pg.create_database();
    let other = tempfile::tempdir().expect("tempdir");
    let other_ca = crate::test_postgres::make_ca(other.path(), "other-ca");
    let wrong_ca = pg_target(&pg.url_with(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
    ));
    // Refused at once, not retried until `give_up`.
    let started = std::time::Instant::now();
    let e = prepare(&wrong_ca, T, Duration::from_secs(60))
        .await
        .expect_err("a certificate from another CA is refused");
    assert!(started.elapsed() < Duration::from_secs(30), "not retried");
    assert!(matches!(e, PgError::Tls { .. }), "{e:?}");
    assert!(e.is_config());
    let msg = e.to_string();
    assert!(msg.contains("`result_backend`"), "{msg}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");

    let plain = PgServer::start();
    let plain_db = plain.create_database();
    let require = pg_target(&plain.url_with("127.0.0.1", &plain_db, "sslmode=require"));
    let e = prepare(&require, T, Duration::from_secs(60))
        .await
        .expect_err("sslmode=require against ssl=off");
    assert!(matches!(e, PgError::Tls { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("`result_backend`"), "{msg}");
    assert!(msg.contains("does not support TLS"), "{msg}");
}

#[tokio::test]
async fn args_and_kwargs_fill_their_columns_within_the_bound_and_survive_later_records() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    let mut kw = serde_json::Map::new();
    kw.insert("k".into(), serde_json::json!([3]));
    let with = done("a").with_args(&[serde_json::json!(1)], &kw);
    // A writer that does not bound them (not the worker): the store does.
    let mut huge = done("h");
    huge.args = Some(serde_json::json!(["x".repeat(crate::proto::ARGS_BOUND)]));
    huge.kwargs = Some(serde_json::Value::Object(kw.clone()));
    let mut results = b.results(Use::Request);
    results
        .write(&[with.clone(), huge], T)
        .await
        .expect("write");
    assert_eq!(results.read("a").await.expect("read"), Some(with));
    let cols = |id: &str| {
        pg.psql(
            &db,
            &format!(
                "SELECT coalesce(args::text, 'NULL'), coalesce(kwargs::text, 'NULL') \
                 FROM taskstack_results WHERE task_id = '{id}'"
            ),
        )
        .expect("query")
        .trim()
        .to_owned()
    };
    assert_eq!(cols("a"), r#"[1]|{"k": [3]}"#);
    assert_eq!(cols("h"), r#"NULL|{"k": [3]}"#);
    // A later record without them (a revocation, a dead letter) keeps the row's.
    results.write(&[done("a")], T).await.expect("write");
    assert_eq!(cols("a"), r#"[1]|{"k": [3]}"#);
}

#[tokio::test]
async fn one_batch_wakes_each_of_its_many_waiters() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    // 600 uuid-like ids, one statement.
    let ids: Vec<String> = (0..600)
        .map(|i| format!("{i:08}-0000-4000-8000-{:012}", i * 7))
        .collect();
    let waiters: Vec<_> = ids
        .iter()
        .map(|id| {
            let b = b.clone();
            let id = id.clone();
            tokio::spawn(async move { b.results(Use::Request).wait(&id, T * 4).await })
        })
        .collect();
    // Every waiter listens (and has read no row) before the batch commits,
    // so each is woken by a notification.
    let start = tokio::time::Instant::now();
    loop {
        let n = b.listener.lock().await.as_ref().map_or(0, |l| l.waiting());
        if n == ids.len() {
            break;
        }
        assert!(start.elapsed() < T * 2, "only {n} waiters registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let batch: Vec<TaskResult> = ids.iter().map(|id| done(id)).collect();
    b.results(Use::Request)
        .write(&batch, T)
        .await
        .expect("write");
    for (w, id) in waiters.into_iter().zip(&ids) {
        let r = w.await.expect("join").expect("wait");
        assert_eq!(r.map(|r| r.task_id), Some(id.clone()), "{id} woken");
    }
}

#[tokio::test]
async fn a_finished_or_cancelled_wait_leaves_no_waiter() {
    let pg = PgServer::start();
    let db = pg.create_database();
    let (b, _redis) = backend(&pg, &db).await;
    let waiting = || async { b.listener.lock().await.as_ref().map_or(0, |l| l.waiting()) };
    // A result already stored: answered from the row.
    b.results(Use::Request)
        .write(&[done("stored")], T)
        .await
        .expect("write");
    let r = b
        .results(Use::Request)
        .wait("stored", T)
        .await
        .expect("wait");
    assert_eq!(r.map(|r| r.task_id).as_deref(), Some("stored"));
    assert_eq!(waiting().await, 0, "after a wait for a stored result");
    // Given up by its caller midway.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        b.results(Use::Request).wait("never", T),
    )
    .await;
    assert!(gave_up.is_err(), "nothing stores `never`");
    assert_eq!(waiting().await, 0, "after a cancelled wait");
    // Timed out.
    let r = b
        .results(Use::Request)
        .wait("never", Duration::from_millis(200))
        .await
        .expect("wait");
    assert!(r.is_none());
    assert_eq!(waiting().await, 0, "after a timed-out wait");
}
