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
mod postgres;
mod rate;
mod redis_target;
mod sentinel;
mod tasks;
mod web;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::secret::{Secret, SecretUrl, redact_url};
pub use amqp::{QueueType, is_amqp_url};
pub use annotations::{Annotation, TaskAnnotations};
pub use postgres::{PgTarget, SslMode, is_postgres_url};
pub use rate::RateLimit;
pub use redis_target::RedisTarget;
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

/// Fewest Redis connections a process may be configured with.
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
            lease: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
            result_expires: Duration::from_secs(3600),
            result_extended: false,
            max_message_size: 2 << 20,
            max_task_delay: DEFAULT_MAX_TASK_DELAY,
            redis_pool_size: NonZeroUsize::new(8).expect("8 > 0"),
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
            tasks: DeclaredTasks::default(),
            task_annotations: TaskAnnotations::default(),
        }
    }
}

impl Config {
    /// Loads defaults < `TASKSTACK_CONFIG` file < `TASKSTACK_*` environment
    /// < `overrides` (key, value) pairs, then validates.
    pub fn load(overrides: &[(&str, Value)]) -> Result<Self, ConfigError> {
        Self::load_from(None, overrides)
    }

    /// Like [`Config::load`], with the TOML file given explicitly (a
    /// command-line `--config`), which wins over `TASKSTACK_CONFIG`.
    pub fn load_from(
        file: Option<&Path>,
        overrides: &[(&str, Value)],
    ) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
        if let Some(path) = file {
            std::fs::metadata(&path).map_err(|e| ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            fig = fig.merge(Toml::file_exact(&path));
        }
        fig = fig.merge(Env::prefixed(ENV_PREFIX).ignore(&["CONFIG"]));
        for (key, value) in overrides {
            fig = fig.merge(Serialized::default(key, value));
        }
        Self::from_figment(fig)
    }

    /// Extracts and validates a configuration from any figment (tests use this
    /// with in-memory providers).
    pub fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            let names = schedule_names(&fig);
            ConfigError::Load(
                e.into_iter()
                    .map(|e| describe(e, &names))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.broker_is_amqp() {
            self.validate_amqp()?;
        } else {
            check_redis_url("broker_url", self.broker_url.expose())?;
            self.refuse_amqp_only_settings()?;
        }
        if let Some(b) = &self.result_backend {
            if is_postgres_url(b.expose()) {
                PgTarget::new("result_backend", b.expose(), None)?;
            } else {
                check_redis_url("result_backend", b.expose())?;
            }
        }
        self.validate_sentinel()?;
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(invalid(
                "namespace",
                &self.namespace,
                "use letters, digits and - _ . : only, at least one",
            ));
        }
        if self.queues.is_empty() {
            return Err(invalid("queues", "", "at least one queue is needed"));
        }
        for q in &self.queues {
            check_queue_name(q).map_err(|why| invalid("queues", q, why))?;
        }
        if let Some(p) = self.prefetch
            && p < self.concurrency
        {
            return Err(invalid(
                "prefetch",
                &p.to_string(),
                &format!("must be at least concurrency ({})", self.concurrency),
            ));
        }
        let at_least = |key: &'static str, d: Duration, min: Duration| {
            if d < min {
                Err(invalid(
                    key,
                    &humantime::format_duration(d).to_string(),
                    &format!("must be at least {}", humantime::format_duration(min)),
                ))
            } else {
                Ok(())
            }
        };
        if self.redis_pool_size.get() < MIN_POOL_SIZE {
            return Err(invalid(
                "redis_pool_size",
                &self.redis_pool_size.to_string(),
                &format!("must be at least {MIN_POOL_SIZE}: a worker keeps three connections busy"),
            ));
        }
        at_least("lease", self.lease, Duration::from_secs(1))?;
        at_least(
            "result_expires",
            self.result_expires,
            Duration::from_secs(1),
        )?;
        at_least(
            "max_task_delay",
            self.max_task_delay,
            Duration::from_secs(1),
        )?;
        if self.max_message_size < 1024 {
            return Err(invalid(
                "max_message_size",
                &self.max_message_size.to_string(),
                "must be at least 1KiB",
            ));
        }
        at_least(
            "redis_timeout",
            self.redis_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "result_backend_timeout",
            self.result_backend_timeout,
            Duration::from_millis(100),
        )?;
        // Checked where logs are set up; a producer-only build has no telemetry.
        #[cfg(feature = "service")]
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", &self.log_level, &e.to_string()))?;
        at_least("beat_lock_ttl", self.beat_lock_ttl, Duration::from_secs(1))?;
        at_least(
            "beat_missed_grace",
            self.beat_missed_grace,
            Duration::from_secs(1),
        )?;
        self.beat_metrics_addr()?;
        self.worker_metrics_addr()?;
        self.validate_web()?;
        self.validate_schedule()
    }

    /// Every entry compiles (cron, time zone, interval, queue) and names are
    /// unique; disabled entries are checked too, so a typo never waits for
    /// the day someone enables the entry.
    fn validate_schedule(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, entry) in self.schedule.iter().enumerate() {
            // Only a build with the beat can compile an entry; a producer
            // never runs the schedule.
            #[cfg(feature = "beat")]
            crate::beat::schedule::Entry::compile(entry).map_err(|e| ConfigError::Schedule {
                entry: entry.label(i),
                field: e.field,
                value: e.value,
                reason: e.reason,
            })?;
            if !names.insert(entry.name.as_str()) {
                return Err(ConfigError::Schedule {
                    entry: entry.label(i),
                    field: "name",
                    value: entry.name.clone(),
                    reason: "another entry has the same name; names must be unique".into(),
                });
            }
        }
        Ok(())
    }

    /// Where `taskstack-beat` serves metrics; `None` when `beat_metrics_listen`
    /// is `off` (or empty).
    pub fn beat_metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        metrics_addr("beat_metrics_listen", &self.beat_metrics_listen, 9102)
    }

    /// Where `taskstack-worker` serves metrics; `None` when
    /// `worker_metrics_listen` is `off` (or empty).
    pub fn worker_metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        metrics_addr("worker_metrics_listen", &self.worker_metrics_listen, 9101)
    }

    /// Messages one worker may hold at once.
    pub fn effective_prefetch(&self) -> usize {
        self.prefetch
            .map_or(self.concurrency.get().saturating_mul(4), NonZeroUsize::get)
    }

    /// The broker's URL with the password from `broker_password(_file)` applied.
    /// With a RabbitMQ broker: the result backend's Redis (taskstack's own
    /// records live there).
    pub fn broker_target(&self) -> Result<RedisTarget, ConfigError> {
        if self.broker_is_amqp()
            && let Some(url) = &self.result_backend
            && !is_postgres_url(url.expose())
        {
            return self.backend_target();
        }
        let pw = secret(
            "broker_password_file",
            self.broker_password.as_ref(),
            self.broker_password_file.as_deref(),
        )?;
        Ok(
            RedisTarget::new("broker_url", self.broker_url.expose(), pw.as_ref())?
                .with_sentinel_password(self.sentinel_secret()?),
        )
    }

    /// The Redis server of result records and Celery's chord counters: the
    /// `result_backend` when it is a Redis URL, else the broker's (with a
    /// PostgreSQL result store, chord counters stay on the broker).
    pub fn backend_target(&self) -> Result<RedisTarget, ConfigError> {
        match &self.result_backend {
            None => self.broker_target(),
            Some(url) if is_postgres_url(url.expose()) => self.broker_target(),
            Some(url) => {
                let pw = secret(
                    "result_backend_password_file",
                    self.result_backend_password.as_ref(),
                    self.result_backend_password_file.as_deref(),
                )?;
                Ok(
                    RedisTarget::new("result_backend", url.expose(), pw.as_ref())?
                        .with_sentinel_password(self.sentinel_secret()?),
                )
            }
        }
    }

    /// The PostgreSQL result store, when `result_backend` names one
    /// (password from `result_backend_password(_file)`).
    pub fn postgres_target(&self) -> Result<Option<PgTarget>, ConfigError> {
        let Some(url) = self
            .result_backend
            .as_ref()
            .filter(|u| is_postgres_url(u.expose()))
        else {
            return Ok(None);
        };
        let pw = secret(
            "result_backend_password_file",
            self.result_backend_password.as_ref(),
            self.result_backend_password_file.as_deref(),
        )?;
        PgTarget::new("result_backend", url.expose(), pw.as_ref()).map(Some)
    }

    /// The effective configuration as JSON, for the start-up log line and
    /// the `config` subcommand. Secrets show as `***`: their types
    /// serialize that way, so no key can be forgotten.
    pub fn redacted(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| json!({ "error": e.to_string() }))
    }
}

/// A metrics listen address (`ip:port`), or `None` for `off` / empty.
fn metrics_addr(
    key: &'static str,
    raw: &str,
    example_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| {
        invalid(
            key,
            raw,
            &format!(
                "use ip:port such as 0.0.0.0:{example_port} (port 0 picks a free port), or off"
            ),
        )
    })
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

/// The `name` of each `[[schedule]]` entry as written (for error messages
/// about entries that do not deserialize).
fn schedule_names(fig: &Figment) -> Vec<Option<String>> {
    fig.extract_inner::<Vec<Value>>("schedule")
        .map(|entries| {
            entries
                .iter()
                .map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// One figment error as "key `k` (from <source>): <what>", with the
/// environment variable spelled out when that is where the value came from,
/// and a `[[schedule]]` entry named by its name as well as its position.
fn describe(e: figment::Error, schedule_names: &[Option<String>]) -> String {
    if let [first, index, field, ..] = e.path.as_slice()
        && first == "schedule"
        && let Ok(i) = index.parse::<usize>()
    {
        let entry = match schedule_names.get(i).cloned().flatten() {
            Some(name) => format!("`{name}` (schedule[{i}])"),
            None => format!("schedule[{i}]"),
        };
        return format!("schedule entry {entry}: field `{field}`: {}", e.kind);
    }
    let key = e.path.join(".").to_lowercase();
    let source = match &e.metadata {
        Some(m) if m.name.contains("environment") => {
            format!("environment variable {ENV_PREFIX}{}", key.to_uppercase())
        }
        Some(m) => match &m.source {
            Some(src) => format!("{} ({src})", m.name),
            None => m.name.to_string(),
        },
        None => "configuration".into(),
    };
    if key.is_empty() {
        format!("{} (from {source})", e.kind)
    } else {
        format!("configuration key `{key}` (from {source}): {}", e.kind)
    }
}

fn invalid(key: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A password: the content of `file` when set (trailing newline removed),
/// else `inline`.
fn secret(
    file_key: &'static str,
    inline: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
            key: file_key,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let pw = text.trim_end_matches(['\n', '\r']).to_owned();
        if pw.is_empty() {
            return Err(ConfigError::SecretFile {
                key: file_key,
                path: path.to_owned(),
                reason: "the file is empty".into(),
            });
        }
        return Ok(Some(Secret::new(pw)));
    }
    Ok(inline.cloned())
}

/// Checks a `redis://`, `rediss://` or Sentinel URL.
fn check_redis_url(key: &'static str, raw: &str) -> Result<(), ConfigError> {
    if is_sentinel_url(raw) {
        sentinel::parse_sentinel_url(key, raw, None).map(drop)
    } else {
        parse_redis_url(key, raw).map(drop)
    }
}

fn parse_redis_url(key: &'static str, raw: &str) -> Result<url::Url, ConfigError> {
    let shown = redact_url(raw);
    let url = url::Url::parse(raw).map_err(|e| invalid(key, &shown, &e.to_string()))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(invalid(
            key,
            &shown,
            "the scheme must be redis://, rediss://, redis+sentinel:// or rediss+sentinel://",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(key, &shown, "the URL names no host"));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(invalid(
            key,
            &shown,
            "the path must be a database number such as /0",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests;
