//! `stackctl`: builds taskstack's images without a registry and runs the
//! compose stack through the Docker Engine API (thin: parses the command
//! line and calls the library).

use clap::{Parser, Subcommand, ValueEnum};
use stackctl::build::{self, BuildOptions, Profile, RedisChoice};
use stackctl::compose::{self, Env, Project};
use stackctl::engine::live::Live;
use stackctl::progress::{self, Progress};
use stackctl::up::UpOptions;
use stackctl::verify::VerifyOptions;
use stackctl::{StackError, ops};
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Create or reconcile the stack: networks, volumes, then each service
    /// once what it depends on is healthy; prints the endpoints.
    Up(UpArgs),
    /// Check the running stack against the production checklist; exit 0
    /// only when every check passes.
    Verify(VerifyArgs),
    /// A table of the project's containers: state, health, uptime, restarts.
    Status(ProjectArgs),
    /// Print a service's logs (every container of it).
    Logs(LogsArgs),
    /// Set a service's number of containers: `stackctl scale worker=4`.
    Scale(ScaleArgs),
    /// Stop and remove the project's containers and networks (and, with
    /// -v, its volumes), found by the project label.
    Down(DownArgs),
}

#[derive(Debug, clap::Args)]
struct ProjectArgs {
    /// The compose file (a `.env` beside it is read).
    #[arg(short = 'f', long, default_value = "compose/docker-compose.yml")]
    file: PathBuf,
    /// Project name [default: COMPOSE_PROJECT_NAME, else the file's
    /// directory name, as docker-compose].
    #[arg(short = 'p', long)]
    project: Option<String>,
    /// Enable a profile's services (repeatable; adds to COMPOSE_PROFILES).
    #[arg(long, value_name = "NAME")]
    profile: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    #[command(flatten)]
    project: ProjectArgs,
    /// Build the images offline first (`stackctl build`) and use them
    /// (TASKSTACK_IMAGE / REDIS_IMAGE, unless set in the environment); with
    /// the profile `postgres`, the PostgreSQL image too, with the profile
    /// `rabbitmq`, the RabbitMQ image.
    #[arg(long)]
    build: bool,
    /// Cargo profile for --build.
    #[arg(long, value_enum, default_value_t = CliProfile::Image)]
    build_profile: CliProfile,
    /// Allow more than one beat replica (standbys on the Redis lock).
    #[arg(long)]
    allow_standby_beats: bool,
    /// Fail when the stack is not healthy after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    project: ProjectArgs,
    /// A JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Accept more than one beat container.
    #[arg(long)]
    allow_standby_beats: bool,
    /// Seconds the end-to-end smoke task may take.
    #[arg(long, default_value_t = 30)]
    smoke_timeout: u64,
    /// Check a Swarm stack (`docker stack deploy -c compose/swarm.yml
    /// <stack>`; the stack's name is -p) through the Swarm's services and
    /// tasks instead of compose containers.
    #[arg(long)]
    swarm: bool,
    /// With --swarm: the web API's published address (HOST:PORT), for
    /// `/health` and the smoke task; without it they are skipped.
    #[arg(long, value_name = "HOST:PORT", requires = "swarm")]
    web: Option<String>,
    /// With --swarm --web: a file holding an API token (the `api_token`
    /// secret's file, e.g. compose/secrets/api_token).
    #[arg(long, value_name = "PATH", requires = "web")]
    api_token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// The service.
    service: String,
    /// Keep printing new lines.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only the last N lines of each container.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// The compose file.
    #[arg(long, default_value = "compose/docker-compose.yml")]
    file: PathBuf,
    #[arg(short = 'p', long)]
    project: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ScaleArgs {
    #[command(flatten)]
    project: ProjectArgs,
    /// SERVICE=N, one or more.
    #[arg(required = true, value_name = "SERVICE=N")]
    counts: Vec<String>,
    /// Allow more than one beat replica.
    #[arg(long)]
    allow_standby_beats: bool,
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, clap::Args)]
struct DownArgs {
    #[command(flatten)]
    project: ProjectArgs,
    /// Remove the project's volumes too (Redis's data!).
    #[arg(short = 'v', long)]
    volumes: bool,
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Directory holding the multi-call `taskstack` binary (package
    /// taskstack-multicall) [default: compile it (see --profile) and use
    /// <target dir>/<profile>; CARGO_TARGET_DIR is honoured].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Your own worker binary (built on `taskstack::worker::main`, e.g. from
    /// examples/my-worker), packaged as /taskstack-worker in place of the
    /// stock one, so the compose stack runs your tasks unchanged.
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
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
    /// Also build localhost/taskstack-postgres:<tag> from this host's
    /// Debian `postgresql` package, for the compose profile `postgres`.
    #[arg(long)]
    postgres: bool,
    /// Also build localhost/taskstack-rabbitmq:<tag> from this host's
    /// Debian `rabbitmq-server` package, for the compose profile `rabbitmq`.
    #[arg(long)]
    rabbitmq: bool,
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

fn build_options(
    bin_dir: Option<PathBuf>,
    worker_bin: Option<PathBuf>,
    profile: CliProfile,
    tag: String,
    redis: Redis,
    postgres: bool,
    rabbitmq: bool,
) -> BuildOptions {
    let debug = matches!(profile, CliProfile::Debug) && bin_dir.is_none();
    BuildOptions {
        bin_dir,
        profile: match profile {
            CliProfile::Image => Profile::Image,
            CliProfile::Release => Profile::Release,
            CliProfile::Debug => Profile::Debug,
        },
        tag,
        redis: match redis {
            Redis::Auto => RedisChoice::Auto,
            Redis::Build => RedisChoice::Build,
            Redis::Skip => RedisChoice::Skip,
        },
        max_app_bytes: (!debug).then_some(build::MAX_APP_IMAGE_BYTES),
        strip_debug_info: debug,
        worker_bin,
        postgres,
        rabbitmq,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stackctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn process_env() -> Env {
    std::env::vars().collect()
}

fn load(args: &ProjectArgs, env: &Env) -> Result<Project, StackError> {
    Ok(compose::load(
        &args.file,
        &profiled_env(args, env).0,
        args.project.as_deref(),
    )?)
}

/// `env` with the `--profile`s added to COMPOSE_PROFILES and, with the
/// profile `postgres`, the result store pointed at it
/// ([`stackctl::postgres::profile_env`]), with the profile `rabbitmq`, the
/// broker ([`stackctl::rabbitmq::profile_env`]), with the profile `ha`,
/// the sentinels ([`stackctl::ha::profile_env`]); their notes come back.
fn profiled_env(args: &ProjectArgs, env: &Env) -> (Env, Vec<String>) {
    let mut env = env.clone();
    if !args.profile.is_empty() {
        let mut profiles: Vec<String> = env
            .get("COMPOSE_PROFILES")
            .map(|p| p.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        profiles.extend(args.profile.iter().cloned());
        env.insert("COMPOSE_PROFILES".into(), profiles.join(","));
    }
    let notes = [
        stackctl::postgres::profile_env(&mut env, &args.file),
        stackctl::rabbitmq::profile_env(&mut env, &args.file),
        stackctl::ha::profile_env(&mut env, &args.file),
    ]
    .into_iter()
    .flatten()
    .collect();
    (env, notes)
}

/// The project `up` and `scale` run: `stackctl build`'s images where the
/// file's defaults are not here (each substitution announced).
async fn load_for_up(
    engine: &Live,
    args: &ProjectArgs,
    mut env: Env,
) -> Result<Project, StackError> {
    let (project, notes) =
        stackctl::up::images::prefer_built(engine, &mut env, |env| load(args, env)).await?;
    for n in notes {
        eprintln!("stackctl: {n}");
    }
    Ok(project)
}

fn progress_sink(services: &[String]) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(progress::Live::new(std::io::stderr(), services))
    } else {
        Box::new(progress::Lines::new(std::io::stderr()))
    }
}

async fn run(command: Command) -> Result<ExitCode, StackError> {
    match command {
        Command::Build(args) => {
            let opts = build_options(
                args.bin_dir,
                args.worker_bin,
                args.profile,
                args.tag,
                args.redis,
                args.postgres,
                args.rabbitmq,
            );
            let report = build::build(&opts, &|line| eprintln!("stackctl: {line}")).await?;
            print_build(&report);
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            let mut env = process_env();
            let (profiled, notes) = profiled_env(&args.project, &env);
            for note in notes {
                eprintln!("stackctl: {note}");
            }
            let postgres =
                stackctl::rabbitmq::profile_enabled(&profiled, stackctl::postgres::PROFILE);
            let rabbitmq =
                stackctl::rabbitmq::profile_enabled(&profiled, stackctl::rabbitmq::PROFILE);
            if args.build {
                let opts = build_options(
                    None,
                    None,
                    args.build_profile,
                    build::DEFAULT_TAG.into(),
                    Redis::Auto,
                    postgres,
                    rabbitmq,
                );
                let report = build::build(&opts, &|line| eprintln!("stackctl: {line}")).await?;
                if std::env::var_os("TASKSTACK_IMAGE").is_none() {
                    env.insert("TASKSTACK_IMAGE".into(), report.app_image.clone());
                }
                if let Some(redis) = &report.redis_image
                    && std::env::var_os("REDIS_IMAGE").is_none()
                {
                    env.insert("REDIS_IMAGE".into(), redis.clone());
                }
            }
            let engine = Live::connect().await?;
            let project = load_for_up(&engine, &args.project, env).await?;
            for (name, why) in &project.skipped {
                eprintln!("stackctl: service {name} is not started: {why}");
            }
            let opts = UpOptions {
                allow_standby_beats: args.allow_standby_beats,
                timeout: Duration::from_secs(args.timeout),
                ..UpOptions::default()
            };
            let order = project.start_order().unwrap_or_default();
            let mut progress = progress_sink(&order);
            let report = stackctl::up::up(&engine, &project, &opts, progress.as_mut()).await?;
            drop(progress);
            println!(
                "project {} is up in {:.1}s: {} created, {} recreated, {} unchanged, {} removed",
                project.name,
                report.elapsed.as_secs_f64(),
                report.created.len(),
                report.recreated.len(),
                report.kept.len(),
                report.removed.len()
            );
            for e in &report.endpoints {
                println!(
                    "  {:<8} {}  ({} → container port {})",
                    e.service,
                    e.url(),
                    e.container,
                    e.container_port
                );
            }
            if let Some(token) = project.secrets.get("api_token") {
                println!("  API token: {}", token.file.display());
            }
            println!(
                "  check it: stackctl verify{}",
                project_flags(&args.project)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let report = if args.swarm {
                let Some(stack) = args.project.project.clone() else {
                    eprintln!("stackctl: verify --swarm needs the stack's name: -p <stack>");
                    return Ok(ExitCode::FAILURE);
                };
                let docker = stackctl::docker::connect().await?;
                let opts = stackctl::verify::swarm::SwarmVerifyOptions {
                    stack,
                    web: args.web,
                    api_token_file: args.api_token_file,
                    smoke_timeout: Duration::from_secs(args.smoke_timeout),
                };
                stackctl::verify::swarm::verify(&docker, &opts).await?
            } else {
                let project = load(&args.project, &process_env())?;
                let engine = Live::connect().await?;
                let opts = VerifyOptions {
                    allow_standby_beats: args.allow_standby_beats,
                    smoke_timeout: Duration::from_secs(args.smoke_timeout),
                };
                stackctl::verify::verify(&engine, &project, &opts).await?
            };
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status(args) => {
            let name = project_name(&args)?;
            let engine = Live::connect().await?;
            let rows = ops::status(&engine, &name).await?;
            if rows.is_empty() {
                println!("project {name} has no containers");
            } else {
                print!("{}", ops::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs(args) => {
            let name = project_name(&ProjectArgs {
                file: args.file,
                project: args.project,
                profile: Vec::new(),
            })?;
            let engine = Live::connect().await?;
            ops::logs(
                &engine,
                &name,
                &args.service,
                args.tail,
                args.follow,
                &|l| println!("{l}"),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale(args) => {
            let engine = Live::connect().await?;
            let project = load_for_up(&engine, &args.project, process_env()).await?;
            let mut replicas = BTreeMap::new();
            for c in &args.counts {
                let (svc, n) = c
                    .split_once('=')
                    .and_then(|(s, n)| Some((s.to_owned(), n.parse::<usize>().ok()?)))
                    .ok_or_else(|| StackError::UnknownService {
                        service: format!("{c} (expected SERVICE=N)"),
                        known: project
                            .services
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                replicas.insert(svc, n);
            }
            let opts = UpOptions {
                allow_standby_beats: args.allow_standby_beats,
                timeout: Duration::from_secs(args.timeout),
                only: Some(replicas.keys().cloned().collect::<BTreeSet<_>>()),
                replicas,
                ..UpOptions::default()
            };
            let services: Vec<String> = opts.replicas.keys().cloned().collect();
            let mut progress = progress_sink(&services);
            let report = stackctl::up::up(&engine, &project, &opts, progress.as_mut()).await?;
            drop(progress);
            println!(
                "scaled in {:.1}s: {} created, {} removed, {} unchanged",
                report.elapsed.as_secs_f64(),
                report.created.len(),
                report.removed.len(),
                report.kept.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Down(args) => {
            let name = project_name(&args.project)?;
            let engine = Live::connect().await?;
            let report = ops::down(&engine, &name, args.volumes).await?;
            println!(
                "project {name}: removed {} container(s), {} network(s), {} volume(s)",
                report.containers.len(),
                report.networks.len(),
                report.volumes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn project_flags(p: &ProjectArgs) -> String {
    let mut s = String::new();
    if p.file.as_path() != std::path::Path::new("compose/docker-compose.yml") {
        s.push_str(&format!(" -f {}", p.file.display()));
    }
    if let Some(name) = &p.project {
        s.push_str(&format!(" -p {name}"));
    }
    s
}

/// The project name without needing a valid file when `--project` is given.
fn project_name(args: &ProjectArgs) -> Result<String, StackError> {
    if let Some(p) = &args.project {
        return Ok(compose::normalize_name(p));
    }
    Ok(load(args, &process_env())?.name)
}

fn print_build(report: &build::BuildReport) {
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
    if !report.worker_tasks.is_empty() {
        println!(
            "  /taskstack-worker is your own worker; its tasks: {}",
            report.worker_tasks.join(", ")
        );
    }
    if let Some((image, bytes)) = &report.postgres_image {
        println!(
            "{image}  {:.1} MB  (built; compose profile `{}`)",
            mb(*bytes),
            stackctl::postgres::PROFILE
        );
    }
    if let Some((image, bytes)) = &report.rabbitmq_image {
        println!(
            "{image}  {:.1} MB  (built; compose profile `{}`)",
            mb(*bytes),
            stackctl::rabbitmq::PROFILE
        );
    }
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
        // `up` runs the default tag's images without being told.
        if report.app_image == format!("{}:{}", build::APP_REPOSITORY, build::DEFAULT_TAG) {
            println!("\nrun the stack with these images: stackctl up");
        } else {
            println!(
                "\nrun the stack with these images:\n  \
                 REDIS_IMAGE={redis} TASKSTACK_IMAGE={} stackctl up",
                report.app_image
            );
        }
    }
}
