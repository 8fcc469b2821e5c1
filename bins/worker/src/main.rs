//! `taskstack-worker`: runs registered tasks from Celery-protocol queues.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::process::ExitCode;
use taskstack::config::{Config, DEFAULT_WORKER_METRICS_LISTEN};
use taskstack::service::cli::CommonArgs;
use taskstack::service::metrics_http::bind;
use taskstack::service::state::StatePath;
use taskstack::service::{self, Invocation};
use taskstack::worker::{Registry, Worker, WorkerSettings, builtin, health};

const CONFIG_HELP: &str = "\
Configuration (defaults < TOML file < TASKSTACK_* environment < options above):
  TASKSTACK_CONFIG                   TOML file with the keys below (lower case)
  TASKSTACK_BROKER_URL               redis://[user:pass@]host:port/db or rediss://  [redis://127.0.0.1:6379/0]
  TASKSTACK_BROKER_PASSWORD          broker password (overrides the URL's)
  TASKSTACK_BROKER_PASSWORD_FILE     file holding the broker password (Docker secrets)
  TASKSTACK_RESULT_BACKEND           where results go  [the broker]
  TASKSTACK_RESULT_BACKEND_PASSWORD / _FILE
  TASKSTACK_NAMESPACE                prefix of taskstack's own keys  [taskstack]
  TASKSTACK_QUEUES                   comma-separated queues, served in order  [celery]
  TASKSTACK_CONCURRENCY              tasks run at once  [16]
  TASKSTACK_PREFETCH                 messages held at once, >= concurrency  [4 x concurrency]
  TASKSTACK_LEASE                    claim on held messages without renewal  [30s]
  TASKSTACK_DRAIN_TIMEOUT            time running tasks get at shutdown  [20s]
  TASKSTACK_RESULT_EXPIRES           how long results are kept  [1h]
  TASKSTACK_REDIS_POOL_SIZE          Redis connections  [8]
  TASKSTACK_REDIS_TIMEOUT            per command and connection attempt  [5s]
  TASKSTACK_LOG_LEVEL                tracing filter, e.g. info or taskstack=debug  [info]
  TASKSTACK_LOG_FORMAT               auto | json | pretty  [auto: json unless a terminal]
  TASKSTACK_ALLOW_ROOT               1 to run as uid 0  [0]
  TASKSTACK_MAX_MESSAGE_SIZE         larger messages are dead-lettered unread  [2MiB]
  TASKSTACK_MAX_TASK_DELAY           furthest an ETA/countdown may lie ahead  [365d]
  TASKSTACK_WORKER_STATE_FILE        where the worker records itself for healthcheck  [/tmp/taskstack-worker-<pid>.json]
  TASKSTACK_WORKER_METRICS_LISTEN    ip:port serving Prometheus /metrics, or off  [0.0.0.0:9101; taken: a free port]

Built-in tasks: taskstack.echo, taskstack.add, taskstack.sleep, taskstack.fail.
Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration or refused start,
130 stopped at once by a second signal.";

#[derive(Debug, Parser)]
#[command(name = "taskstack-worker", version, about = "Runs tasks from Celery-protocol queues on Redis", after_long_help = CONFIG_HELP)]
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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when this host's worker is running and heartbeating in Redis
    /// (for an exec-form Docker HEALTHCHECK), 1 otherwise.
    Healthcheck,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
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
        o
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let invocation = match cli.command {
        None => Invocation::Run,
        Some(Command::Config) => Invocation::PrintConfig,
        Some(Command::Healthcheck) => Invocation::Healthcheck,
    };
    let loaded = cli.common.load(cli.overrides());
    service::main(
        "taskstack-worker",
        loaded,
        invocation,
        None,
        run,
        healthcheck,
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let broker = taskstack::connect(&config).context("invalid Redis settings")?;
    let mut registry = Registry::new();
    builtin::register(&mut registry);
    let shutdown = taskstack::shutdown::install().context("cannot listen for signals")?;
    let mut worker = Worker::new(broker, registry, WorkerSettings::from_config(&config));
    if let Some(addr) = config.worker_metrics_addr()? {
        let fallback = config.worker_metrics_listen == DEFAULT_WORKER_METRICS_LISTEN;
        let listener = bind("worker_metrics_listen", addr, fallback).await?;
        worker = worker.serve_metrics(listener);
    }
    worker.run(shutdown.cancelled_owned()).await?;
    Ok(())
}

async fn healthcheck(config: Config) -> ExitCode {
    service::verdict(match taskstack::connect(&config) {
        Ok(broker) => {
            let at = StatePath::new("worker", config.worker_state_file.as_deref());
            health::check(&at, &broker).await
        }
        Err(e) => Err(e.to_string()),
    })
}
