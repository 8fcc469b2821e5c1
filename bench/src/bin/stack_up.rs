//! `stack_up` (cargo run --release -p taskstack-bench --bin stack_up):
//! time from starting the stack to every container healthy, `stackctl up`
//! against `docker-compose up -d` plus polling the engine until all are
//! healthy, on the same compose file, images and settings, alternating,
//! several runs each. Prints each run, the medians and the ratio; asserts
//! no timing. See `bench/README.md`.

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use stackctl::engine::live::Live;
use stackctl::engine::{Engine as _, Health};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taskstack_integration::docker::{init_secrets, workspace_root};
use taskstack_integration::free_port;

#[derive(Debug, Parser)]
#[command(
    name = "stack_up",
    about = "Time to an all-healthy stack: stackctl up vs docker-compose up -d + polling"
)]
struct Cli {
    /// Runs of each tool (alternating).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The app image (build it with `stackctl build`).
    #[arg(long, default_value = "localhost/taskstack:local")]
    app_image: String,
    /// The Redis image.
    #[arg(long, default_value = "localhost/taskstack-redis:local")]
    redis_image: String,
    /// HEALTHCHECK_INTERVAL of every service (the health checks' period
    /// bounds both tools alike).
    #[arg(long, default_value = "1s")]
    interval: String,
    /// The stackctl binary (default: beside this one).
    #[arg(long, value_name = "PATH")]
    stackctl_bin: Option<PathBuf>,
    /// Give up on one run after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0, "--runs must be at least 1");
    let stackctl = match &cli.stackctl_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("stackctl"),
    };
    ensure!(
        stackctl.exists(),
        "{} not found: cargo build --release -p stackctl (or pass --stackctl-bin)",
        stackctl.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let engine = rt.block_on(Live::connect())?;
    for image in [&cli.app_image, &cli.redis_image] {
        if rt.block_on(engine.image_id(image))?.is_none() {
            bail!(
                "image {image} is missing: build it with `stackctl build` (cargo run --release -p stackctl -- build)"
            );
        }
    }
    let secrets = init_secrets()?;
    let file = workspace_root()?.join("compose/docker-compose.yml");
    let env = |port: u16| -> Vec<(String, String)> {
        vec![
            ("TASKSTACK_IMAGE".into(), cli.app_image.clone()),
            ("REDIS_IMAGE".into(), cli.redis_image.clone()),
            (
                "TASKSTACK_SECRETS_DIR".into(),
                secrets.path().display().to_string(),
            ),
            ("WEB_PORT".into(), port.to_string()),
            ("HEALTHCHECK_INTERVAL".into(), cli.interval.clone()),
        ]
    };
    let expected = 5; // redis, web, beat, two workers
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    println!(
        "compose/docker-compose.yml, {} + {}, HEALTHCHECK_INTERVAL={}, {} runs each\n",
        cli.app_image, cli.redis_image, cli.interval, cli.runs
    );
    for run in 0..cli.runs {
        // Alternate which tool goes first, so drift hurts both alike.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for tool in order {
            let project = format!("benchup{}{run}{tool}", std::process::id());
            let env = env(free_port()?);
            let start = Instant::now();
            let result = if tool == 0 {
                let status = Command::new(&stackctl)
                    .args(["up", "-f"])
                    .arg(&file)
                    .args(["-p", &project, "--timeout", &cli.timeout.to_string()])
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .envs(env.iter().cloned())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?;
                if status.success() {
                    // stackctl returns once all are healthy; confirm.
                    rt.block_on(all_healthy(
                        &engine,
                        &project,
                        expected,
                        Duration::from_secs(5),
                    ))
                } else {
                    Err(anyhow::anyhow!("stackctl up failed: {status}"))
                }
            } else {
                let out = Command::new("docker-compose")
                    .args(["-p", &project, "-f"])
                    .arg(&file)
                    .args(["up", "-d"])
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .envs(env.iter().cloned())
                    .output()
                    .context("docker-compose (apt-get install docker-compose)")?;
                if out.status.success() {
                    rt.block_on(all_healthy(
                        &engine,
                        &project,
                        expected,
                        Duration::from_secs(cli.timeout),
                    ))
                } else {
                    Err(anyhow::anyhow!(
                        "docker-compose up -d failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            };
            let secs = start.elapsed().as_secs_f64();
            rt.block_on(stackctl::ops::down(&engine, &project, true))?;
            result?;
            let name = ["stackctl up", "docker-compose up -d + poll"][tool];
            println!("run {}: {name:<28} {secs:6.2} s", run + 1);
            times[tool].push(secs);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let s = median(&mut times[0]);
    let c = median(&mut times[1]);
    println!("\nmedian to all healthy: stackctl up {s:.2} s, docker-compose up -d + poll {c:.2} s");
    println!("ratio stackctl / docker-compose: {:.2}", s / c);
    Ok(())
}

/// Polls (every 50 ms) until `project` has `expected` containers, all
/// running and healthy.
async fn all_healthy(
    engine: &Live,
    project: &str,
    expected: usize,
    deadline: Duration,
) -> Result<()> {
    let start = Instant::now();
    let label = format!("com.docker.compose.project={project}");
    loop {
        let list = engine.list_containers(&label).await?;
        let mut healthy = 0;
        for c in &list {
            let info = engine.inspect_container(&c.id).await?;
            if info.running && matches!(info.health, Health::Healthy | Health::None) {
                healthy += 1;
            }
        }
        if list.len() == expected && healthy == expected {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{project}: {healthy}/{expected} healthy after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
