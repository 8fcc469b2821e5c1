//! Configuration shared by every taskstack binary.
//!
//! Layers, later ones winning: built-in defaults < the TOML file named by
//! `TASKSTACK_CONFIG` < `TASKSTACK_*` environment variables < command-line
//! overrides. Passwords may come from files (`*_PASSWORD_FILE`, for Docker
//! secrets). Everything is validated once, at start-up; an error names the
//! key and the value (for a `[[schedule]]` entry: the entry and the field).
//! Nothing else in taskstack reads the environment.

mod amqp;
mod annotations;
mod de;
mod load;
mod postgres;
mod rate;
mod redis_socket;
mod redis_target;
mod runtime;
mod sentinel;
mod targets;
mod tasks;
mod validate;

use targets::secret;
use validate::parse_redis_url;
mod web;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::secret::{Secret, SecretUrl, redact_url};
pub use amqp::{QueueType, is_amqp_url};
pub use annotations::{Annotation, TaskAnnotations};
pub use postgres::{PgTarget, SslMode, is_postgres_url};
pub use rate::RateLimit;
pub use redis_socket::is_socket_url;
pub(crate) use redis_socket::redact_socket_url;
pub use redis_target::RedisTarget;
pub use runtime::{RuntimeThreads, TOKIO_WORKER_THREADS};
pub(crate) use sentinel::redact_sentinel_url;
pub use sentinel::{DEFAULT_SENTINEL_PORT, SentinelTarget, is_sentinel_url};
pub use tasks::{DeclaredTasks, ExecDecl, HttpDecl, TaskDecl, TaskKind};

/// Environment variable naming the TOML configuration file.
pub const CONFIG_FILE_ENV: &str = "TASKSTACK_CONFIG";
/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "TASKSTACK_";

/// A configuration problem, naming the key and the offending value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("configuration key `{key}` has invalid value {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("configuration file {path:?} (from {CONFIG_FILE_ENV}) cannot be read: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("configuration key `{key}`: cannot read secret file {path:?}: {reason}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("schedule entry {entry}: field `{field}` has invalid value {value:?}: {reason}")]
    Schedule {
        /// The entry's name in backquotes, or `schedule[<index>]` when it has none.
        entry: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Load(String),
}

/// Fewest Redis connections a process may be configured with (a web
/// serving thread's share); a worker needs more, see
/// [`crate::worker::MIN_POOL_SIZE`].
pub const MIN_POOL_SIZE: usize = 4;

/// The default `worker_metrics_listen`; taken, a free port is used instead.
pub const DEFAULT_WORKER_METRICS_LISTEN: &str = "0.0.0.0:9101";
/// The default `beat_metrics_listen`; taken, a free port is used instead.
pub const DEFAULT_BEAT_METRICS_LISTEN: &str = "0.0.0.0:9102";

/// The default `max_task_delay`: one year.
pub const DEFAULT_MAX_TASK_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, human-readable otherwise.
    Auto,
    Json,
    #[serde(alias = "text", alias = "human")]
    Pretty,
}

/// Whether `q` may name a queue a worker serves; the reason if not.
pub fn check_queue_name(q: &str) -> Result<(), &'static str> {
    if q.is_empty() {
        Err("a queue name may not be empty")
    } else if q.chars().any(|c| c.is_control() || c.is_whitespace()) || q.contains(':') {
        Err("queue names may not contain spaces, control characters or ':'")
    } else {
        Ok(())
    }
}

/// Which remote-control commands a worker obeys (`worker_remote_control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteControl {
    /// Every command, `shutdown` included.
    All,
    /// Read-only commands and those that change how tasks run but not
    /// whether the worker runs (`revoke`, `add_consumer`,
    /// `cancel_consumer`, `rate_limit`, `time_limit`, `enable_events`,
    /// `disable_events`, `heartbeat`); `shutdown` is refused with an error
    /// reply. The default:
    /// a worker stopped with exit code 0 is not restarted by an
    /// `on-failure` restart policy, so `shutdown` from any broker client
    /// would outlast that client's access.
    #[default]
    Control,
    /// Read-only commands only (`ping`, `stats`, `active`, `registered`, ...).
    Inspect,
    /// No pidbox at all: `celery inspect ping` does not see the worker.
    Off,
}

impl RemoteControl {
    /// The setting's name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Control => "control",
            Self::Inspect => "inspect",
            Self::Off => "off",
        }
    }
}

/// The whole configuration. Field names are the TOML keys; the environment
/// variable is `TASKSTACK_` + the key in upper case. Passwords, tokens and
/// URLs are [`Secret`]s and [`SecretUrl`]s, so `Debug` and `Serialize`
/// (the start-up log line, the `config` subcommand) never show them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `redis://[user:pass@]host:port/db` or `rediss://...` (TLS), or a
    /// master found through Redis Sentinel:
    /// `redis+sentinel://[user:pass@]host:port[,host:port...]/<master name>[/<db>]`
    /// (`rediss+sentinel://` for TLS; the password is the master's), or
    /// RabbitMQ: `amqp://user[:pass]@host:5672/vhost` (`amqps://` for TLS),
    /// which needs `result_backend = "redis://..."`.
    pub broker_url: SecretUrl,
    /// RabbitMQ only: how queues taskstack creates are declared, `classic`
    /// (Celery's default) or `quorum`.
    pub broker_queue_type: QueueType,
    /// RabbitMQ only: declare the work queues taskstack creates with
    /// `x-max-priority` = this (1..=255, Celery's `task_queue_max_priority`),
    /// so RabbitMQ serves higher `priority` first. Classic queues only.
    pub broker_queue_max_priority: Option<u8>,
    /// Overrides the password in `broker_url`.
    pub broker_password: Option<Secret>,
    /// A file whose content (trailing newline removed) is the broker password.
    pub broker_password_file: Option<PathBuf>,
    /// Where results are stored; defaults to the broker. A `redis://` or
    /// `rediss://` URL, or `postgresql://user@host/db[?sslmode=...]` for the
    /// PostgreSQL result store.
    pub result_backend: Option<SecretUrl>,
    pub result_backend_password: Option<Secret>,
    pub result_backend_password_file: Option<PathBuf>,
    /// The sentinels' own password (Celery's `sentinel_kwargs`), for
    /// `redis+sentinel://` broker and result-backend URLs; the master's
    /// password stays in the URL or `*_password(_file)`.
    pub sentinel_password: Option<Secret>,
    /// A file whose content (trailing newline removed) is the sentinels' password.
    pub sentinel_password_file: Option<PathBuf>,
    /// PostgreSQL result store: timeout of a connection attempt, of one
    /// statement (`statement_timeout`) and of waiting for a pooled connection.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub result_backend_timeout: Duration,
    /// Prefix of taskstack's own Redis keys (queues and results keep Celery's names).
    pub namespace: String,
    /// Queues this worker consumes, in the order they are served.
    #[serde(deserialize_with = "de::list")]
    pub queues: Vec<String>,
    /// Tasks run at once by one worker process.
    pub concurrency: NonZeroUsize,
    /// Messages one worker holds at once (running plus waiting); at least
    /// `concurrency`. Default: 4 × concurrency.
    pub prefetch: Option<NonZeroUsize>,
    /// `taskstack-worker`: threads of the async runtime. `auto` (the
    /// default): one when every task is built-in or declared (none blocks
    /// a thread; one thread drains faster than two, see README
    /// "Performance"), one per CPU when the binary has handlers of its own.
    pub worker_runtime_threads: RuntimeThreads,
    /// How long a worker's claim on its messages lasts without renewal.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub lease: Duration,
    /// How long a stopping worker lets running tasks finish.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub drain_timeout: Duration,
    /// How long results are kept.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub result_expires: Duration,
    /// `taskstack-worker`: result records carry the task's `args` and
    /// `kwargs` (Celery's `result_extended`; off by default, as in Celery),
    /// each when its JSON is at most 4 KiB. The PostgreSQL store keeps them
    /// in its columns either way.
    #[serde(deserialize_with = "de::flag")]
    pub result_extended: bool,
    /// Largest message a worker decodes (`"2MiB"`); a larger one is
    /// dead-lettered unread, with the reason. The default admits anything
    /// the web API accepts (a 1 MiB body grows by a third in base64).
    #[serde(deserialize_with = "de::bytes")]
    pub max_message_size: u64,
    /// Furthest into the future an ETA or countdown may lie (`"365d"`): a
    /// producer refuses a later one, a worker dead-letters it with the
    /// reason, so nothing waits forever in the delayed set unseen.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub max_task_delay: Duration,
    /// Redis connections per process.
    pub redis_pool_size: NonZeroUsize,
    /// Replicas that must acknowledge (Redis `WAIT`) the writes that
    /// matter before they count as done: an enqueue, a result before its
    /// message is acknowledged, a beat slot. 0 (the default) does not
    /// wait, and an acknowledged write can vanish in a Sentinel failover.
    pub redis_min_replicas_acked: u32,
    /// Timeout of one Redis command or connection attempt.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub redis_timeout: Duration,
    /// A tracing filter: `info`, `debug`, `taskstack=debug,info`, ...
    pub log_level: String,
    pub log_format: LogFormat,
    /// Run even as root (uid 0). Off by default.
    #[serde(deserialize_with = "de::flag")]
    pub allow_root: bool,
    /// Where a worker records who it is, for `taskstack-worker healthcheck`.
    /// Unset (the default): one file per process,
    /// `/tmp/taskstack-worker-<pid>.json`, so several workers share a host
    /// and `healthcheck` checks every one. A set file may not be shared by
    /// two running workers.
    pub worker_state_file: Option<PathBuf>,
    /// `taskstack-worker`: `ip:port` serving Prometheus metrics at
    /// `/metrics`, or `off`. With the default, a worker that finds the port
    /// taken (another worker on this host) serves on a free port instead,
    /// logs it and announces it in its heartbeat record; a port set here
    /// is used or the start fails.
    pub worker_metrics_listen: String,
    /// `taskstack-worker`: the Celery node name remote control and events
    /// know the worker by (`celery inspect -d`, Flower). Unset:
    /// `taskstack@<hostname>`, or `taskstack-<pid>@<hostname>` when another
    /// worker on this host has that name.
    pub worker_nodename: Option<String>,
    /// `taskstack-worker`: which Celery remote-control commands are obeyed:
    /// `all`, `control` (the default: everything but `shutdown`), `inspect`
    /// (read-only commands) or `off` (no pidbox). Whoever can write to the
    /// broker can send them.
    pub worker_remote_control: RemoteControl,
    /// `taskstack-worker`: send Celery task events (Flower, `celery
    /// events`) from the start; the `-E` flag. Worker heartbeat events are
    /// sent in any case.
    #[serde(deserialize_with = "de::flag")]
    pub worker_send_task_events: bool,
    /// `taskstack-web`: publish Celery's `task-sent` event for each task
    /// enqueued through the API (Celery's `task_send_sent_event`).
    #[serde(deserialize_with = "de::flag")]
    pub task_send_sent_event: bool,
    /// `taskstack-worker`: store a STARTED result record when a task starts
    /// (Celery's `task_track_started`, off by default as in Celery). Off,
    /// a task's record goes from PENDING to its outcome, and a revocation
    /// of a running task is refused all the same. With results on another
    /// server than the broker, or in PostgreSQL, STARTED is always stored.
    #[serde(deserialize_with = "de::flag")]
    pub task_track_started: bool,
    /// `taskstack-beat`: how long the leader lock lasts without renewal. The
    /// leader renews it every third of this; a standby takes over at most
    /// about this long (plus a second) after the leader dies.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub beat_lock_ttl: Duration,
    /// `taskstack-beat`: how old a missed slot (one no leader published,
    /// e.g. during a restart or a failover) may be and still be published,
    /// once; older missed slots are skipped, logged and counted.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub beat_missed_grace: Duration,
    /// `taskstack-beat`: `ip:port` serving Prometheus metrics at `/metrics`,
    /// or `off`.
    pub beat_metrics_listen: String,
    /// Where a beat records who it is, for `taskstack-beat healthcheck`.
    /// Unset (the default): `/tmp/taskstack-beat-<pid>.json`, one per process.
    pub beat_state_file: Option<PathBuf>,
    /// `taskstack-beat`'s periodic entries (`[[schedule]]` in the TOML file).
    pub schedule: Vec<ScheduleEntry>,
    /// `taskstack-web`: `ip:port` the HTTP API listens on.
    pub web_listen: String,
    /// `taskstack-web`: bearer tokens accepted on `/api/*` (comma-separated
    /// in the environment). At least one, from here or `api_tokens_file`.
    #[serde(deserialize_with = "de::list")]
    pub api_tokens: Vec<Secret>,
    /// `taskstack-web`: a file of API tokens, one per line (blank lines and
    /// `#` comments ignored), for Docker secrets and credentials.
    pub api_tokens_file: Option<PathBuf>,
    /// `taskstack-web`: largest request body accepted (`"1MiB"`); larger
    /// ones are refused with 413.
    #[serde(deserialize_with = "de::bytes")]
    pub web_body_limit: u64,
    /// `taskstack-web`: task names the API accepts. Empty: the names live
    /// workers announce in their heartbeats.
    #[serde(deserialize_with = "de::list")]
    pub web_tasks: Vec<String>,
    /// `taskstack-web`: `/health` also requires a beat leader holding the lock.
    #[serde(deserialize_with = "de::flag")]
    pub web_expect_beat: bool,
    /// `taskstack-web`: how long a client may take to send a request's
    /// headers (also how long an idle keep-alive connection waits for the
    /// next request); then the connection is closed.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub web_header_timeout: Duration,
    /// `taskstack-web`: a connection on which nothing is read or written for
    /// this long (a stalled body, a client that does not read its answer)
    /// is closed.
    #[serde(deserialize_with = "de::duration", serialize_with = "de::ser_duration")]
    pub web_idle_timeout: Duration,
    /// `taskstack-web`: connections served at once; further ones wait in the
    /// listen backlog until one closes (a WARN says the limit was hit).
    pub web_max_connections: NonZeroUsize,
    /// `taskstack-web`: threads serving requests, each with a runtime and
    /// Redis connections of its own (a request never changes thread);
    /// `auto` (the default): tokio's `TOKIO_WORKER_THREADS` when set, else
    /// one per CPU.
    pub web_threads: RuntimeThreads,
    /// `taskstack-worker`: program and HTTP tasks (`[tasks."name"]` tables
    /// with `exec = [...]` or `http = "url"`), run like built-in tasks.
    #[serde(default)]
    pub tasks: DeclaredTasks,
    /// `taskstack-worker`: rate and time limits of built-in tasks and of
    /// the worker's own (`[task_annotations."name"]` tables with
    /// `rate_limit`, `time_limit`, `soft_time_limit`), as Celery's
    /// `task_annotations`.
    #[serde(default)]
    pub task_annotations: TaskAnnotations,
}

/// One periodic entry of `taskstack-beat` (a `[[schedule]]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Unique among entries; carried in each message's `beat_entry` header
    /// and keying the entry's last published slot in Redis.
    #[serde(default)]
    pub name: String,
    /// The task name (required).
    #[serde(default)]
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// The queue the message goes to.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// A cron expression: 5 fields (minute hour day-of-month month
    /// day-of-week) or 6 (seconds first). Exactly one of `cron` and `every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// A fixed interval (`"30s"`): slots are the multiples of it since the
    /// Unix epoch, so every instance agrees on them.
    #[serde(
        default,
        deserialize_with = "de::opt_duration",
        serialize_with = "de::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
    /// IANA time zone a `cron` expression is read in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default = "default_true", deserialize_with = "de::flag")]
    pub enabled: bool,
    /// The message expires this long after its slot (the worker then records
    /// it as REVOKED instead of running it).
    #[serde(
        default,
        deserialize_with = "de::opt_duration",
        serialize_with = "de::ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<Duration>,
}

fn default_queue() -> String {
    "celery".into()
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_true() -> bool {
    true
}

impl ScheduleEntry {
    /// How error messages name this entry: its name, or its position.
    pub fn label(&self, index: usize) -> String {
        if self.name.is_empty() {
            format!("schedule[{index}]")
        } else {
            format!("`{}`", self.name)
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker_url: "redis://127.0.0.1:6379/0".into(),
            broker_queue_type: QueueType::default(),
            broker_queue_max_priority: None,
            broker_password: None,
            broker_password_file: None,
            result_backend: None,
            result_backend_password: None,
            result_backend_password_file: None,
            sentinel_password: None,
            sentinel_password_file: None,
            redis_min_replicas_acked: 0,
            result_backend_timeout: Duration::from_secs(5),
            namespace: "taskstack".into(),
            queues: vec!["celery".into()],
            // Chosen by measurement (bench `drain_defaults`, README
            // "Performance"): the start step batches at most this many
            // tasks, so below it the fixed Redis work per batch shows.
            concurrency: NonZeroUsize::new(64).expect("64 > 0"),
            prefetch: None,
            worker_runtime_threads: RuntimeThreads::Auto,
            lease: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
            result_expires: Duration::from_secs(3600),
            result_extended: false,
            max_message_size: 2 << 20,
            max_task_delay: DEFAULT_MAX_TASK_DELAY,
            redis_pool_size: NonZeroUsize::new(12).expect("12 > 0"),
            redis_timeout: Duration::from_secs(5),
            log_level: "info".into(),
            log_format: LogFormat::Auto,
            allow_root: false,
            worker_state_file: None,
            worker_metrics_listen: DEFAULT_WORKER_METRICS_LISTEN.into(),
            worker_nodename: None,
            worker_remote_control: RemoteControl::default(),
            worker_send_task_events: false,
            task_send_sent_event: false,
            task_track_started: false,
            beat_lock_ttl: Duration::from_secs(10),
            beat_missed_grace: Duration::from_secs(300),
            beat_metrics_listen: DEFAULT_BEAT_METRICS_LISTEN.into(),
            beat_state_file: None,
            schedule: Vec::new(),
            web_listen: "0.0.0.0:8000".into(),
            api_tokens: Vec::new(),
            api_tokens_file: None,
            web_body_limit: 1 << 20,
            web_tasks: Vec::new(),
            web_expect_beat: false,
            web_header_timeout: Duration::from_secs(10),
            web_idle_timeout: Duration::from_secs(60),
            web_max_connections: NonZeroUsize::new(1024).expect("1024 > 0"),
            web_threads: RuntimeThreads::Auto,
            tasks: DeclaredTasks::default(),
            task_annotations: TaskAnnotations::default(),
        }
    }
}

impl Config {
    /// Messages one worker may hold at once.
    pub fn effective_prefetch(&self) -> usize {
        self.prefetch
            .map_or(self.concurrency.get().saturating_mul(4), NonZeroUsize::get)
    }

    /// The effective configuration as JSON, for the start-up log line and
    /// the `config` subcommand. Secrets show as `***`: their types
    /// serialize that way, so no key can be forgotten.
    pub fn redacted(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| json!({ "error": e.to_string() }))
    }
}

/// Refuses to run as root (uid 0) unless `allow_root` is set.
pub fn check_not_root(allow_root: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid == 0 && !allow_root {
        return Err(
            "refusing to run as root (uid 0): a task runs with every privilege of its \
                    worker. Run as an unprivileged user, or set TASKSTACK_ALLOW_ROOT=1 \
                    (--allow-root) if you accept the risk."
                .into(),
        );
    }
    Ok(())
}

fn invalid(key: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
