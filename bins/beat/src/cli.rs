//! The `taskstack-beat` command line: what its `main` (and the multi-call
//! `taskstack` binary, as `taskstack-beat`) runs.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::process::ExitCode;
use taskstack::beat::{Beat, BeatSettings, health};
use taskstack::config::{Config, DEFAULT_BEAT_METRICS_LISTEN};
use taskstack::service::cli::CommonArgs;
use taskstack::service::metrics_http::bind;
use taskstack::service::state::StatePath;
use taskstack::service::{self, Invocation};

const CONFIG_HELP: &str = "\
Configuration (defaults < TOML file < TASKSTACK_* environment < options above):
  TASKSTACK_CONFIG                   TOML file with the keys below (lower case) and the
                                     [[schedule]] entries
  TASKSTACK_BROKER_URL               redis://[user:pass@]host:port/db, rediss://, or unix:///path/redis.sock?db=N  [redis://127.0.0.1:6379/0]
  TASKSTACK_BROKER_PASSWORD          broker password (overrides the URL's)
  TASKSTACK_BROKER_PASSWORD_FILE     file holding the broker password (Docker secrets)
  TASKSTACK_NAMESPACE                prefix of taskstack's own keys  [taskstack]
  TASKSTACK_BEAT_LOCK_TTL            leader lock lifetime without renewal  [10s]
  TASKSTACK_BEAT_MISSED_GRACE        how old a missed slot may be and still be published once  [5m]
  TASKSTACK_BEAT_METRICS_LISTEN      ip:port for Prometheus /metrics, or off  [0.0.0.0:9102]
  TASKSTACK_BEAT_STATE_FILE          where the beat records itself for healthcheck  [/tmp/taskstack-beat-<pid>.json]
  TASKSTACK_REDIS_TIMEOUT            per command and connection attempt  [5s]
  TASKSTACK_LOG_LEVEL                tracing filter, e.g. info or taskstack=debug  [info]
  TASKSTACK_LOG_FORMAT               auto | json | pretty  [auto: json unless a terminal]
  TASKSTACK_ALLOW_ROOT               1 to run as uid 0  [0]

A schedule entry (TOML):
  [[schedule]]
  name = \"cleanup\"            # unique
  task = \"proj.cleanup\"       # required
  args = [1, 2]               # optional; kwargs = { k = \"v\" } likewise
  queue = \"celery\"            # default celery
  cron = \"30 2 * * *\"         # 5 fields (crontab), or 6 with seconds first ...
  # every = \"30s\"             # ... or a fixed interval, not both
  timezone = \"Europe/Paris\"   # IANA name, for cron  [UTC]
  enabled = true              # [true]
  expires = \"10m\"             # the message expires this long after its slot

Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration or refused start,
130 stopped at once by a second signal.";

#[derive(Debug, Parser)]
#[command(name = "taskstack-beat", version, about = "Publishes periodic Celery-protocol tasks on Redis; one leader among its instances", after_long_help = CONFIG_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    /// Leader lock lifetime without renewal, e.g. 10s.
    #[arg(long)]
    lock_ttl: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when this host's beat runs, Redis answers, and it leads with a
    /// valid lock or stands by trying (for an exec-form Docker HEALTHCHECK);
    /// 1 otherwise.
    Healthcheck,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
}

impl Cli {
    fn overrides(&self) -> Vec<(&'static str, Value)> {
        let mut o = Vec::new();
        if let Some(v) = &self.lock_ttl {
            o.push(("beat_lock_ttl", json!(v)));
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
    let loaded = cli.common.load(cli.overrides());
    service::main(
        "taskstack-beat",
        loaded,
        invocation,
        Some(2),
        run,
        healthcheck,
    )
}

async fn run(config: Config) -> anyhow::Result<()> {
    let backend =
        taskstack::open_backend(&config).context("invalid broker or result store settings")?;
    let settings = BeatSettings::from_config(&config)?;
    let listener = match config.beat_metrics_addr()? {
        Some(addr) => {
            let fallback = config.beat_metrics_listen == DEFAULT_BEAT_METRICS_LISTEN;
            Some(bind("beat_metrics_listen", addr, fallback).await?)
        }
        None => None,
    };
    let shutdown = taskstack::shutdown::install().context("cannot listen for signals")?;
    Beat::on_backend(backend, settings)
        .run(listener, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn healthcheck(config: Config) -> ExitCode {
    let at = StatePath::new("beat", config.beat_state_file.as_deref());
    if !config.uses_redis() {
        return service::verdict(match taskstack::open_backend(&config) {
            Ok(backend) => health::check_on(&at, &*backend).await,
            Err(e) => Err(e.to_string()),
        });
    }
    service::verdict(match taskstack::connect(&config) {
        Ok(broker) => health::check(&at, &broker).await,
        Err(e) => Err(e.to_string()),
    })
}
