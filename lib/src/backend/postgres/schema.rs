//! The result store's schema, created and migrated by the services at
//! start. Migrations are numbered and never edited once shipped; each runs
//! once, recorded in `taskstack_schema_migrations`. The whole run is one
//! transaction under a transaction-level advisory lock, so many workers
//! starting at once wait for the first instead of racing it, and a failed
//! migration leaves nothing half done.

use super::connect::PgError;

/// `pg_advisory_xact_lock` key of the migration run ("tsk" + 1).
pub(crate) const MIGRATE_LOCK: i64 = 0x7473_6b00_0000_0001;
/// `pg_try_advisory_xact_lock` key of the expiry cleaner ("tsk" + 2).
pub(crate) const EXPIRE_LOCK: i64 = 0x7473_6b00_0000_0002;
/// The NOTIFY channel a finished result is announced on (payload: task id).
pub(crate) const CHANNEL: &str = "taskstack_results";

/// (version, what it does, SQL). Append only.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "task results",
        "CREATE TABLE taskstack_results (
        task_id      text PRIMARY KEY,
        state        text NOT NULL,
        result       jsonb,
        error        jsonb,
        traceback    text,
        task_name    text,
        args         jsonb,
        kwargs       jsonb,
        worker       text,
        retries      integer,
        queue        text,
        parent_id    text,
        group_id     text,
        children     jsonb NOT NULL DEFAULT '[]'::jsonb,
        revoked      boolean NOT NULL DEFAULT false,
        date_started timestamptz,
        date_done    timestamptz,
        expires_at   timestamptz NOT NULL
    );
    CREATE INDEX taskstack_results_expires_at ON taskstack_results (expires_at);",
    ),
    (
        2,
        "records of a RabbitMQ broker without Redis",
        // Each keyed by the configured `namespace`, as the Redis keys are.
        "CREATE TABLE taskstack_workers (
        namespace  text NOT NULL,
        worker_id  text NOT NULL,
        record     text NOT NULL,
        held       jsonb NOT NULL DEFAULT '{}'::jsonb,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (namespace, worker_id)
    );
    CREATE TABLE taskstack_dead_letters (
        id        bigserial PRIMARY KEY,
        namespace text NOT NULL,
        queue     text NOT NULL,
        record    text NOT NULL
    );
    CREATE INDEX taskstack_dead_letters_queue ON taskstack_dead_letters (namespace, queue, id);
    CREATE TABLE taskstack_beat_lock (
        namespace  text PRIMARY KEY,
        value      text NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE TABLE taskstack_beat_instances (
        namespace   text NOT NULL,
        instance_id text NOT NULL,
        record      text NOT NULL,
        expires_at  timestamptz NOT NULL,
        PRIMARY KEY (namespace, instance_id)
    );
    CREATE TABLE taskstack_beat_slots (
        namespace text NOT NULL,
        entry     text NOT NULL,
        slot_ms   bigint NOT NULL,
        PRIMARY KEY (namespace, entry)
    );
    CREATE TABLE taskstack_beat_outbox (
        id        bigserial PRIMARY KEY,
        namespace text NOT NULL,
        queue     text NOT NULL,
        message   text NOT NULL
    );
    CREATE TABLE taskstack_canvas_sent (
        namespace  text NOT NULL,
        task_id    text NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (namespace, task_id)
    );
    CREATE INDEX taskstack_canvas_sent_expires_at ON taskstack_canvas_sent (expires_at);
    CREATE TABLE taskstack_chords (
        namespace     text NOT NULL,
        group_id      text NOT NULL,
        size          integer,
        claim         text,
        claim_expires timestamptz,
        expires_at    timestamptz NOT NULL,
        PRIMARY KEY (namespace, group_id)
    );
    CREATE INDEX taskstack_chords_expires_at ON taskstack_chords (expires_at);
    CREATE TABLE taskstack_chord_parts (
        namespace text NOT NULL,
        group_id  text NOT NULL,
        member    text NOT NULL,
        idx       bigint,
        part      text NOT NULL,
        PRIMARY KEY (namespace, group_id, member)
    );",
    ),
];

/// The newest schema version this build knows.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies the migrations this database lacks; refuses a database migrated
/// by a newer build.
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), PgError> {
    let op = "migrate the result store";
    let e = |e: tokio_postgres::Error| PgError::op(op, &e);
    let tx = client.transaction().await.map_err(e)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(e)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS taskstack_schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(e)?;
    let row = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM taskstack_schema_migrations",
            &[],
        )
        .await
        .map_err(e)?;
    let current: i32 = row.get(0);
    if current > latest() {
        return Err(PgError::Op {
            op,
            detail: format!(
                "the database's schema is version {current}, newer than this build's {}: \
                 upgrade taskstack",
                latest()
            ),
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(e)?;
        tx.execute(
            "INSERT INTO taskstack_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(e)?;
        tracing::info!(version, name, "result store schema migrated");
    }
    tx.commit().await.map_err(e)
}
