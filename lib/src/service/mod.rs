//! What every service binary's `main` does the same way: refuse bad
//! configuration (exit 2) and root, start the runtime and telemetry, run,
//! and turn the outcome into the exit code. Plus the state file behind the
//! exec-form `healthcheck` subcommands.

#[cfg(feature = "cli")]
pub mod cli;
pub mod memory;
pub mod metrics_http;
pub mod state;

use crate::config::{Config, ConfigError};
use std::future::Future;
use std::process::ExitCode;

/// What the command line asked a service binary to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invocation {
    /// Run the service.
    Run,
    /// Print the effective configuration (secrets redacted) and exit.
    PrintConfig,
    /// Exit 0 when this host's instance is healthy, 1 otherwise.
    Healthcheck,
}

/// Runs service `name` ("taskstack-worker", ...). Exit codes: 0 clean stop,
/// 1 runtime failure, 2 bad configuration or refused start (130, a second
/// signal, comes from [`crate::shutdown`]). `worker_threads`: the async
/// runtime's threads (1: a current-thread runtime; `None`: tokio's choice,
/// `TOKIO_WORKER_THREADS` or one per CPU).
pub fn main<R, E, H>(
    name: &str,
    loaded: Result<Config, ConfigError>,
    invocation: Invocation,
    worker_threads: Option<usize>,
    run: impl FnOnce(Config) -> R,
    healthcheck: impl FnOnce(Config) -> H,
) -> ExitCode
where
    R: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    H: Future<Output = ExitCode>,
{
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists (see `memory::tune`).
    memory::tune();
    // One thread: the current thread runs everything (with a one-thread
    // multi-thread runtime, `run` itself would stay on this thread and hand
    // every spawned task to the runtime's thread, waking it each time).
    let mut builder = if worker_threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(n) = worker_threads.filter(|&n| n > 1) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match invocation {
        Invocation::PrintConfig => {
            // Not println!: a closed pipe (`| head`) is not a crash.
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout(), "{:#}", config.redacted());
            ExitCode::SUCCESS
        }
        Invocation::Healthcheck => runtime.block_on(healthcheck(config)),
        Invocation::Run => {
            if let Err(e) = crate::config::check_not_root(config.allow_root) {
                eprintln!("{name}: {e}");
                return ExitCode::from(2);
            }
            // Secret files are part of the configuration: one that cannot
            // be read is exit 2 (a supervisor does not restart in a loop).
            let redis = if config.uses_redis() {
                config
                    .broker_target()
                    .and(config.backend_target())
                    .map(drop)
            } else {
                Ok(())
            };
            let stores = redis
                .and(config.amqp_url().map(drop))
                .and(config.postgres_target().map(drop));
            if let Err(e) = stores {
                eprintln!("{name}: {e}");
                return ExitCode::from(2);
            }
            crate::telemetry::init(&config.log_level, config.log_format);
            tracing::info!(config = %config.redacted(), "starting {name}");
            // The PostgreSQL result store: schema migrated, credentials and
            // database checked, before anything runs (a refusal is exit 2).
            if let Err(e) = runtime.block_on(prepare_result_store(&config)) {
                tracing::error!(error = %e, "{name}: the PostgreSQL result store cannot be used");
                eprintln!("{name}: {e}");
                return ExitCode::from(if e.is_config() { 2 } else { 1 });
            }
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "{name} failed");
                    eprintln!("{name}: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Prints a healthcheck's verdict and turns it into the exit code.
pub fn verdict(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(msg) => {
            println!("healthy: {msg}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("unhealthy: {msg}");
            ExitCode::from(1)
        }
    }
}

/// How long a starting service waits for an unreachable PostgreSQL result
/// store before giving up (exit 1; a supervisor restarts it).
const RESULT_STORE_START_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn prepare_result_store(config: &Config) -> Result<(), crate::backend::postgres::PgError> {
    // Already validated with the other secrets: an error here is not expected.
    let target = config
        .postgres_target()
        .map_err(|e| crate::backend::postgres::PgError::Op {
            op: "read result_backend",
            detail: e.to_string(),
        })?;
    match target {
        None => Ok(()),
        Some(t) => {
            crate::backend::postgres::prepare(
                &t,
                config.result_backend_timeout,
                RESULT_STORE_START_WAIT,
            )
            .await
        }
    }
}
