//! The `taskstack-web` command line: what its `main` (and the multi-call
//! `taskstack` binary, as `taskstack-web`) runs.

use crate::threads::OpenBackend;
use crate::{AppState, WebSettings, health};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use taskstack::config::{Config, MIN_POOL_SIZE};
use taskstack::service::cli::CommonArgs;
use taskstack::service::{self, Invocation};

const CONFIG_HELP: &str = "\
Configuration (defaults < TOML file < TASKSTACK_* environment < options above):
  TASKSTACK_CONFIG                   TOML file with the keys below (lower case)
  TASKSTACK_WEB_LISTEN               ip:port to serve on  [0.0.0.0:8000]
  TASKSTACK_API_TOKENS               comma-separated bearer tokens (>= 16 characters each)
  TASKSTACK_API_TOKENS_FILE          file of tokens, one per line (Docker secrets)
                                     at least one token is required
  TASKSTACK_WEB_BODY_LIMIT           largest request body, e.g. 1MiB  [1MiB]
  TASKSTACK_WEB_TASKS                comma-separated task names accepted  [those live workers announce]
  TASKSTACK_WEB_EXPECT_BEAT          1 when /health must see a beat leader  [0]
  TASKSTACK_WEB_HEADER_TIMEOUT       time to send a request's headers (and between
                                     keep-alive requests)  [10s]
  TASKSTACK_WEB_IDLE_TIMEOUT         a connection with no traffic this long is closed  [60s]
  TASKSTACK_WEB_MAX_CONNECTIONS      connections served at once; more wait  [1024]
  TASKSTACK_QUEUES                   queues /health requires a live worker on; the first is
                                     the default queue of enqueued tasks  [celery]
  TASKSTACK_BROKER_URL               redis://[user:pass@]host:port/db, rediss://, or unix:///path/redis.sock?db=N  [redis://127.0.0.1:6379/0]
  TASKSTACK_BROKER_PASSWORD / _FILE  broker password (overrides the URL's)
  TASKSTACK_RESULT_BACKEND           where results live  [the broker]
  TASKSTACK_RESULT_BACKEND_PASSWORD / _FILE
  TASKSTACK_NAMESPACE                prefix of taskstack's own keys  [taskstack]
  TASKSTACK_RESULT_EXPIRES           how long task records are kept  [1h]
  TASKSTACK_REDIS_POOL_SIZE          Redis connections  [12]
  TASKSTACK_REDIS_TIMEOUT            per command and connection attempt  [5s]
  TASKSTACK_LOG_LEVEL                tracing filter, e.g. info or taskstack=debug  [info]
  TASKSTACK_LOG_FORMAT               auto | json | pretty  [auto: json unless a terminal]
  TASKSTACK_ALLOW_ROOT               1 to run as uid 0  [0]

Routes: POST/GET/DELETE /api/v1/tasks[/{id}], /api/v1/queues, /api/v1/workers,
/api/v1/dead-letters/{queue}[/requeue|/discard], /health, /health/live, /metrics,
/openapi.json (the full description).
Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration or refused start,
130 stopped at once by a second signal.";

#[derive(Debug, Parser)]
#[command(name = "taskstack-web", version, about = "HTTP API that enqueues Celery-protocol tasks and reports their results", after_long_help = CONFIG_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// ip:port to serve on.
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when this process's /health (on loopback) answers 200, for an
    /// exec-form Docker HEALTHCHECK; 1 otherwise, printing why.
    Healthcheck,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
}

impl Cli {
    fn overrides(&self) -> Vec<(&'static str, Value)> {
        let mut o = Vec::new();
        if let Some(v) = &self.listen {
            o.push(("web_listen", json!(v)));
        }
        o
    }
}

/// Parses `args` (the program name first) and runs; the exit code is the
/// process's.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let invocation = match cli.command {
        None => Invocation::Run,
        Some(Command::Config) => Invocation::PrintConfig,
        Some(Command::Healthcheck) => Invocation::Healthcheck,
    };
    let mut loaded = cli.common.load(cli.overrides());
    if invocation == Invocation::Run {
        // A missing or unreadable token is a configuration error (exit 2).
        loaded = loaded.and_then(|c| WebSettings::from_config(&c).map(|_| c));
    }
    // The calling thread's runtime is one of the serving threads (see
    // `threads`), so it is a current-thread one.
    service::main(
        "taskstack-web",
        loaded,
        invocation,
        Some(1),
        run,
        healthcheck,
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let settings = WebSettings::from_config(&config)?;
    // Every thread opens its own connections to the same stores, its share
    // of the process's.
    let config = thread_share(config, settings.threads);
    let backend =
        taskstack::open_backend(&config).context("invalid broker or result store settings")?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (web_listen)", settings.listen))?;
    let shutdown = taskstack::shutdown::install().context("cannot listen for signals")?;
    let threads = settings.threads;
    let open: Arc<OpenBackend> = Arc::new(move || {
        taskstack::open_backend(&config).context("invalid broker or result store settings")
    });
    crate::threads::run_on_threads(
        AppState::on_backend(backend, settings),
        listener,
        shutdown.cancelled_owned(),
        threads,
        open,
    )
    .await
}

/// `config` for one of `threads` serving threads: an equal share of the
/// process's `redis_pool_size` connections (which also sizes a PostgreSQL
/// result store's pool), at least [`MIN_POOL_SIZE`] each.
fn thread_share(mut config: Config, threads: usize) -> Config {
    let share = config
        .redis_pool_size
        .get()
        .div_ceil(threads.max(1))
        .max(MIN_POOL_SIZE);
    if let Some(n) = NonZeroUsize::new(share) {
        config.redis_pool_size = n;
    }
    config
}

async fn healthcheck(config: Config) -> ExitCode {
    let verdict = match config.web_addr() {
        Ok(addr) if addr.port() == 0 => {
            Err("web_listen has port 0: there is no fixed port to check".to_owned())
        }
        Ok(addr) => health::probe(health::probe_addr(addr), Duration::from_secs(3)).await,
        Err(e) => Err(e.to_string()),
    };
    service::verdict(verdict.map(|_| "/health answered 200".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_an_equal_share_of_the_pool_and_at_least_the_minimum() {
        let sized = |n: usize| Config {
            redis_pool_size: NonZeroUsize::new(n).expect("n > 0"),
            ..Config::default()
        };
        for (size, threads, each) in [
            (8, 1, 8),
            (8, 2, 4),
            (9, 2, 5),
            (32, 4, 8),
            (8, 4, 4),
            (8, 0, 8),
        ] {
            let c = thread_share(sized(size), threads);
            assert_eq!(c.redis_pool_size.get(), each, "{size} over {threads}");
        }
    }
}
