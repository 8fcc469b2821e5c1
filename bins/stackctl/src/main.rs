//! `stackctl`: builds taskstack's container images without a registry.

use clap::{Parser, Subcommand, ValueEnum};
use stackctl::build::{self, BuildOptions, Profile, RedisChoice};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "stackctl", version, about = "taskstack's container tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build localhost/taskstack:<tag> (web, worker, beat) and, when no
    /// Redis image is present, localhost/taskstack-redis:<tag>, FROM scratch,
    /// from binaries of this host; nothing is pulled.
    Build(BuildArgs),
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Directory holding taskstack-web, taskstack-worker and taskstack-beat
    /// [default: compile them (see --profile) and use <target
    /// dir>/<profile>; CARGO_TARGET_DIR is honoured].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Tag of both images.
    #[arg(long, default_value = build::DEFAULT_TAG)]
    tag: String,
    /// auto: build the Redis image unless redis:7-alpine is present locally.
    #[arg(long, value_enum, default_value_t = Redis::Auto)]
    redis: Redis,
    /// Cargo profile to compile when --bin-dir is not given: image (release
    /// with fat LTO, the smallest), release, or debug (packaged without
    /// debug information; no size limit).
    #[arg(long, value_enum, default_value_t = CliProfile::Image)]
    profile: CliProfile,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliProfile {
    Image,
    Release,
    Debug,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Redis {
    Auto,
    Build,
    Skip,
}

fn main() -> ExitCode {
    let Command::Build(args) = Cli::parse().command;
    let debug = matches!(args.profile, CliProfile::Debug) && args.bin_dir.is_none();
    let opts = BuildOptions {
        bin_dir: args.bin_dir,
        profile: match args.profile {
            CliProfile::Image => Profile::Image,
            CliProfile::Release => Profile::Release,
            CliProfile::Debug => Profile::Debug,
        },
        tag: args.tag,
        redis: match args.redis {
            Redis::Auto => RedisChoice::Auto,
            Redis::Build => RedisChoice::Build,
            Redis::Skip => RedisChoice::Skip,
        },
        max_app_bytes: (!debug).then_some(build::MAX_APP_IMAGE_BYTES),
        strip_debug_info: debug,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stackctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(build::build(&opts, &|line| eprintln!("stackctl: {line}"))) {
        Ok(report) => {
            #[allow(clippy::cast_precision_loss)]
            let mb = |b: u64| b as f64 / 1e6;
            println!(
                "{}  {:.1} MB  ({})",
                report.app_image,
                mb(report.app_bytes),
                report
                    .binaries
                    .iter()
                    .map(|b| format!("/{b}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if let Some(redis) = &report.redis_image {
                let how = if report.redis_built {
                    "built"
                } else {
                    "found locally"
                };
                println!(
                    "{redis}  {:.1} MB  ({how})",
                    mb(report.redis_bytes.unwrap_or_default())
                );
                println!(
                    "\nrun the stack with these images:\n  compose/init-secrets\n  \
                     REDIS_IMAGE={redis} TASKSTACK_IMAGE={} docker-compose -f compose/docker-compose.yml up -d",
                    report.app_image
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stackctl: {e}");
            ExitCode::FAILURE
        }
    }
}
