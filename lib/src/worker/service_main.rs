//! The worker binary's whole `main` as a library function (feature `cli`):
//! the stock `taskstack-worker` is [`main`] with no tasks of its own, and a
//! team's worker binary is the same call with its tasks added, so both have
//! the same command line, configuration, `healthcheck` and `config`
//! subcommands, state file, `/metrics`, root refusal, signals and exit codes.
//!
//! ```no_run
//! use taskstack::worker::{TaskContext, TaskError};
//!
//! fn main() -> std::process::ExitCode {
//!     taskstack::worker::main(|registry| {
//!         registry.register("invoices.render", |ctx: TaskContext| async move {
//!             let id = ctx.args.first().and_then(|v| v.as_u64())
//!                 .ok_or_else(|| TaskError::fail("TypeError", "invoice id expected"))?;
//!             Ok(serde_json::json!({ "invoice": id, "pages": 1 }))
//!         });
//!     })
//! }
//! ```

use super::{Registry, Worker, WorkerSettings, builtin, declared, health};
use crate::config::{Config, ConfigError, DEFAULT_WORKER_METRICS_LISTEN, TOKIO_WORKER_THREADS};
use crate::service::cli::CommonArgs;
use crate::service::metrics_http::bind;
use crate::service::state::StatePath;
use crate::service::{self, Invocation};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Value, json};
use std::process::ExitCode;

const CONFIG_HELP: &str = "\
Configuration (defaults < TOML file < TASKSTACK_* environment < options above):
  TASKSTACK_CONFIG                   TOML file with the keys below (lower case)
  TASKSTACK_BROKER_URL               redis://[user:pass@]host:port/db, rediss://, or unix:///path/redis.sock?db=N  [redis://127.0.0.1:6379/0]
  TASKSTACK_BROKER_PASSWORD          broker password (overrides the URL's)
  TASKSTACK_BROKER_PASSWORD_FILE     file holding the broker password (Docker secrets)
  TASKSTACK_RESULT_BACKEND           where results go  [the broker]
  TASKSTACK_RESULT_BACKEND_PASSWORD / _FILE
  TASKSTACK_NAMESPACE                prefix of taskstack's own keys  [taskstack]
  TASKSTACK_QUEUES                   comma-separated queues, served in order  [celery]
  TASKSTACK_CONCURRENCY              tasks run at once  [64]
  TASKSTACK_PREFETCH                 messages held at once, >= concurrency  [4 x concurrency]
  TASKSTACK_WORKER_RUNTIME_THREADS   async runtime threads, or auto  [auto: 1 without tasks of the binary's own, else 1 per CPU]
  TASKSTACK_LEASE                    claim on held messages without renewal  [30s]
  TASKSTACK_DRAIN_TIMEOUT            time running tasks get at shutdown  [20s]
  TASKSTACK_RESULT_EXPIRES           how long results are kept  [1h]
  TASKSTACK_REDIS_POOL_SIZE          Redis connections  [12]
  TASKSTACK_REDIS_TIMEOUT            per command and connection attempt  [5s]
  TASKSTACK_LOG_LEVEL                tracing filter, e.g. info or taskstack=debug  [info]
  TASKSTACK_LOG_FORMAT               auto | json | pretty  [auto: json unless a terminal]
  TASKSTACK_ALLOW_ROOT               1 to run as uid 0  [0]
  TASKSTACK_MAX_MESSAGE_SIZE         larger messages are dead-lettered unread  [2MiB]
  TASKSTACK_MAX_TASK_DELAY           furthest an ETA/countdown may lie ahead  [365d]
  TASKSTACK_WORKER_STATE_FILE        where the worker records itself for healthcheck  [/tmp/taskstack-worker-<pid>.json]
  TASKSTACK_WORKER_METRICS_LISTEN    ip:port serving Prometheus /metrics, or off  [0.0.0.0:9101; taken: a free port]
  TASKSTACK_WORKER_NODENAME          Celery node name for inspect/control/Flower  [taskstack@<host>; taken: taskstack-<pid>@<host>]
  TASKSTACK_WORKER_REMOTE_CONTROL    all | control | inspect | off  [control: all but shutdown]
  TASKSTACK_WORKER_SEND_TASK_EVENTS  1 to send Celery task events (-E)  [0]
  TASKSTACK_TASK_TRACK_STARTED       1 to store a STARTED record when a task starts  [0]

Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration or refused start,
130 stopped at once by a second signal.";

#[derive(Debug, Parser)]
#[command(about = "Runs tasks from Celery-protocol queues on Redis")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// Queues to consume, comma-separated, in service order.
    #[arg(short = 'Q', long)]
    queues: Option<String>,
    /// Tasks run at once.
    #[arg(short = 'c', long)]
    concurrency: Option<usize>,
    /// Messages held at once (running plus waiting).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Lease length, e.g. 30s.
    #[arg(long)]
    lease: Option<String>,
    /// Drain deadline at shutdown, e.g. 20s.
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Send Celery task events (Flower, `celery events`); sets
    /// worker_send_task_events.
    #[arg(short = 'E', long = "task-events")]
    task_events: bool,
    /// The Celery node name (worker_nodename), e.g. `w1@%h` style names
    /// written out: `w1@myhost`.
    #[arg(short = 'n', long = "hostname")]
    nodename: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when this host's worker is running and heartbeating in Redis
    /// (for an exec-form Docker HEALTHCHECK), 1 otherwise.
    Healthcheck,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Print the tasks this binary runs (built-in, its own, and those the
    /// configuration declares) and exit.
    Tasks,
}

impl Cli {
    fn overrides(&self) -> Vec<(&'static str, Value)> {
        let mut o = Vec::new();
        if let Some(v) = &self.queues {
            o.push(("queues", json!(v)));
        }
        if let Some(v) = self.concurrency {
            o.push(("concurrency", json!(v)));
        }
        if let Some(v) = self.prefetch {
            o.push(("prefetch", json!(v)));
        }
        if let Some(v) = &self.lease {
            o.push(("lease", json!(v)));
        }
        if let Some(v) = &self.drain_timeout {
            o.push(("drain_timeout", json!(v)));
        }
        if self.task_events {
            o.push(("worker_send_task_events", json!(true)));
        }
        if let Some(v) = &self.nodename {
            o.push(("worker_nodename", json!(v)));
        }
        o
    }
}

/// A worker binary's `main`, named and versioned as its own program.
pub struct WorkerMain<F> {
    name: &'static str,
    version: &'static str,
    tasks: F,
}

impl<F> std::fmt::Debug for WorkerMain<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMain")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<F: FnOnce(&mut Registry)> WorkerMain<F> {
    /// `name` and `version` are what `--help`, `--version` and the logs
    /// show (e.g. `env!("CARGO_PKG_NAME")`, `env!("CARGO_PKG_VERSION")`);
    /// `tasks` registers the binary's own tasks.
    pub fn new(name: &'static str, version: &'static str, tasks: F) -> Self {
        Self {
            name,
            version,
            tasks,
        }
    }

    /// Parses the command line and runs; the exit code is the process's.
    pub fn run(self) -> ExitCode {
        self.run_from(std::env::args_os())
    }

    /// Parses `args` (the program name first) and runs.
    pub fn run_from<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let name = self.name;
        let mut own = Registry::new();
        (self.tasks)(&mut own);
        let help = format!(
            "{CONFIG_HELP}\n\nTasks of this binary (without those a configuration declares): {}.",
            own_and_builtin(&own).join(", ")
        );
        let matches = Cli::command()
            .name(name)
            .version(self.version)
            .after_long_help(help)
            .get_matches_from(args);
        let cli = match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        };
        // A pool too small for the worker's loops is bad configuration
        // (exit 2), not a stall once it runs.
        let loaded = cli.common.load(cli.overrides()).and_then(|c| {
            if c.uses_redis() {
                super::check_pool_size(c.redis_pool_size.get())?;
            }
            Ok(c)
        });
        let invocation = match cli.command {
            None => Invocation::Run,
            Some(Command::Config) => Invocation::PrintConfig,
            Some(Command::Healthcheck) => Invocation::Healthcheck,
            Some(Command::Tasks) => return print_tasks(name, loaded, own),
        };
        // Handlers of the binary's own may block a runtime thread; the
        // built-in and declared ones never do (see `RuntimeThreads`).
        let own_tasks = !own.is_empty();
        // The registry is part of the configuration: a clash or a bad
        // declaration is exit 2, before anything starts.
        let (loaded, registry) = match loaded.and_then(|c| registry(&c, own).map(|r| (c, r))) {
            Ok((c, r)) => (Ok(c), r),
            Err(e) => (Err(e), Registry::new()),
        };
        // tokio reads its own variable; `auto` leaves the choice to it.
        let tokio_env = std::env::var_os(TOKIO_WORKER_THREADS).is_some();
        let threads = loaded
            .as_ref()
            .ok()
            .and_then(|c| c.worker_runtime_threads.resolve(own_tasks, tokio_env));
        service::main(
            name,
            loaded,
            invocation,
            threads,
            |config| run(config, registry),
            healthcheck,
        )
    }
}

/// The stock worker's `main` with `tasks` added to the built-in ones: see
/// the module documentation. The program calls itself `taskstack-worker`;
/// [`WorkerMain`] gives it a name and version of its own.
pub fn main(tasks: impl FnOnce(&mut Registry)) -> ExitCode {
    WorkerMain::new("taskstack-worker", env!("CARGO_PKG_VERSION"), tasks).run()
}

/// Every task a worker with `own` tasks and `config` runs: the built-ins,
/// then `own`, then the tasks the configuration declares. A name registered
/// twice is a configuration error naming it.
pub fn registry(config: &Config, own: Registry) -> Result<Registry, ConfigError> {
    let mut registry = Registry::new();
    builtin::register(&mut registry);
    registry.absorb(own).map_err(|name| {
        ConfigError::Load(format!(
            "task `{name}` is registered twice: it is a built-in task; give yours another name"
        ))
    })?;
    declared::register(&mut registry, &config.tasks)?;
    annotate(&mut registry, config)?;
    Ok(registry)
}

/// Applies `[task_annotations."name"]`: each names a built-in task or one
/// of the worker's own (a declared task carries the keys in its table).
fn annotate(registry: &mut Registry, config: &Config) -> Result<(), ConfigError> {
    for (name, a) in config.task_annotations.iter() {
        if config.tasks.0.contains_key(name) {
            return Err(ConfigError::Load(format!(
                "task_annotations: task `{name}` is declared in [tasks.\"{name}\"]; set \
                 rate_limit, time_limit and soft_time_limit in that table"
            )));
        }
        let limits = crate::worker::TaskLimits {
            rate_limit: a.rate_limit.clone(),
            soft_time_limit: a.soft_time_limit,
            time_limit: a.time_limit,
        };
        if !registry.set_limits(name, limits) {
            return Err(ConfigError::Load(format!(
                "task_annotations: task `{name}` is not registered in this worker (its tasks: {})",
                registry.names().join(", ")
            )));
        }
    }
    Ok(())
}

fn own_and_builtin(own: &Registry) -> Vec<String> {
    let mut all = Registry::new();
    builtin::register(&mut all);
    let mut names = all.names();
    names.extend(own.names().into_iter().filter(|n| !all.contains(n)));
    names
}

fn print_tasks(name: &str, loaded: Result<Config, ConfigError>, own: Registry) -> ExitCode {
    use std::io::Write as _;
    match loaded.and_then(|c| registry(&c, own)) {
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            for task in r.names() {
                // Not println!: a closed pipe (`| head`) is not a crash.
                if writeln!(out, "{task}").is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why a running worker stopped with exit code 1.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("invalid broker or result store settings: {0}")]
    Connect(#[source] crate::ConnectError),
    #[error("cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Metrics(#[from] crate::service::metrics_http::BindError),
    #[error(transparent)]
    Worker(#[from] super::WorkerError),
}

async fn run(config: Config, registry: Registry) -> Result<(), RunError> {
    let backend = crate::open_backend(&config).map_err(RunError::Connect)?;
    let shutdown = crate::shutdown::install().map_err(RunError::Signals)?;
    let mut worker = Worker::on_backend(backend, registry, WorkerSettings::from_config(&config));
    if let Some(addr) = config.worker_metrics_addr()? {
        let fallback = config.worker_metrics_listen == DEFAULT_WORKER_METRICS_LISTEN;
        let listener = bind("worker_metrics_listen", addr, fallback).await?;
        worker = worker.serve_metrics(listener);
    }
    worker.run(shutdown.cancelled_owned()).await?;
    Ok(())
}

async fn healthcheck(config: Config) -> ExitCode {
    let at = StatePath::new("worker", config.worker_state_file.as_deref());
    if !config.uses_redis() {
        return service::verdict(match crate::open_backend(&config) {
            Ok(backend) => health::check_on(&at, &*backend).await,
            Err(e) => Err(e.to_string()),
        });
    }
    service::verdict(match crate::connect(&config) {
        Ok(broker) => health::check(&at, &broker).await,
        Err(e) => Err(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::TaskContext;

    fn config() -> Config {
        Config::load_from(None, &[]).expect("defaults load")
    }

    #[test]
    fn own_tasks_join_the_built_ins() {
        let mut own = Registry::new();
        own.register("invoices.render", |_: TaskContext| async {
            Ok(Value::Null)
        });
        let r = registry(&config(), own).expect("no clash");
        assert!(r.contains("invoices.render"));
        assert!(r.contains("taskstack.echo"));
    }

    #[test]
    fn an_own_task_named_like_a_built_in_is_refused_by_name() {
        let mut own = Registry::new();
        own.register("taskstack.echo", |_: TaskContext| async { Ok(Value::Null) });
        let e = registry(&config(), own).expect_err("clash").to_string();
        assert!(e.contains("`taskstack.echo`"), "{e}");
    }

    #[test]
    fn task_events_and_node_name_flags_set_their_keys() {
        let cli = Cli::try_parse_from(["w", "-E", "-n", "w1@host"]).expect("parses");
        let o = cli.overrides();
        assert!(
            o.contains(&("worker_send_task_events", json!(true))),
            "{o:?}"
        );
        assert!(o.contains(&("worker_nodename", json!("w1@host"))), "{o:?}");
        let c = Config::load_from(None, &o).expect("loads");
        assert!(c.worker_send_task_events);
        assert_eq!(c.worker_nodename.as_deref(), Some("w1@host"));
        let e = Config::load_from(None, &[("worker_remote_control", json!("everything"))])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("worker_remote_control"), "{e}");
    }

    #[test]
    fn help_lists_the_binary_s_tasks_and_is_named_after_it() {
        let cmd = Cli::command().name("my-worker").version("9.9.9");
        assert_eq!(cmd.get_name(), "my-worker");
        let mut own = Registry::new();
        own.register("invoices.render", |_: TaskContext| async {
            Ok(Value::Null)
        });
        let names = own_and_builtin(&own);
        assert_eq!(names.first().map(String::as_str), Some("taskstack.add"));
        assert_eq!(names.last().map(String::as_str), Some("invoices.render"));
    }
}
