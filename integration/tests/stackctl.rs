//! `stackctl up / verify / status / logs / scale / down` against the real
//! Docker engine with the real images (built once per test process by
//! `stackctl`'s own code from this profile's binaries, tagged
//! `localhost/...:test`, never pulled). Each test runs its own compose
//! project (a unique name, its own secrets and web port) and takes it down
//! with `stackctl down -v` when it ends, even after a failure.

use anyhow::{Context as _, Result, bail, ensure};
use stackctl::engine::Engine as _;
use stackctl::engine::live::Live;
use stackctl::progress::Recorder;
use stackctl::up::{UpOptions, up};
use stackctl::verify::{VerifyOptions, VerifyReport, verify};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use taskstack_integration::docker::{
    StackctlProject, crash_main_process, docker, health, images, init_secrets, leftovers, unique,
    workspace_root,
};
use taskstack_integration::{Prereq, free_port, require, wait_until};
use testcontainers::bollard::models::HealthStatusEnum;

/// A project on the test images with `secrets`, a free web port and fast
/// health checks.
fn project(what: &str, secrets: &Path, extra: &[(&str, &str)]) -> Result<StackctlProject> {
    project_on(
        &workspace_root()?.join("compose/docker-compose.yml"),
        what,
        secrets,
        extra,
    )
}

/// [`project`] on another compose file.
fn project_on(
    file: &Path,
    what: &str,
    secrets: &Path,
    extra: &[(&str, &str)],
) -> Result<StackctlProject> {
    let report = images()?;
    let mut env = vec![
        ("TASKSTACK_IMAGE", report.app_image.clone()),
        (
            "REDIS_IMAGE",
            report.redis_image.clone().context("no Redis image")?,
        ),
        ("TASKSTACK_SECRETS_DIR", secrets.display().to_string()),
        ("WEB_PORT", free_port()?.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".into()),
        ("WORKER_LEASE", "4s".into()),
    ];
    for (k, v) in extra {
        env.push((k, (*v).to_owned()));
    }
    StackctlProject::with_file(&unique(what).replace('-', ""), file, &env)
}

fn opts() -> UpOptions {
    UpOptions {
        timeout: Duration::from_secs(120),
        ..UpOptions::default()
    }
}

async fn verify_now(engine: &Live, p: &StackctlProject, standby: bool) -> Result<VerifyReport> {
    let opts = VerifyOptions {
        allow_standby_beats: standby,
        ..VerifyOptions::default()
    };
    Ok(verify(engine, &p.project, &opts).await?)
}

fn failed_ids(r: &VerifyReport) -> BTreeSet<String> {
    r.failed().iter().map(|c| c.id.clone()).collect()
}

/// The whole life: `up` (progress in dependency order), `docker-compose`
/// recognises the containers, `verify` passes, a re-run changes nothing,
/// the beat's process is SIGKILLed and restarted by the restart policy,
/// `verify` passes again naming the new lock holder, `down -v` leaves
/// nothing with the project's label.
#[tokio::test(flavor = "multi_thread")]
async fn up_verify_beat_crash_and_down() -> Result<()> {
    // SIGKILLing a container's main process from the host needs root.
    require(Prereq::Root);
    let secrets = init_secrets()?;
    let p = project("sctl", secrets.path(), &[])?;
    let engine = Live::connect().await?;
    let started = Instant::now();
    let mut progress = Recorder::default();
    let report = up(&engine, &p.project, &opts(), &mut progress).await?;
    eprintln!(
        "{:?}: up: {} created in {:?}",
        started.elapsed(),
        report.created.len(),
        report.elapsed
    );
    ensure!(report.created.len() == 5, "{report:?}");
    // A dependency is healthy for its dependents once its own health test
    // passes (`up` runs it) or the engine reports it healthy.
    let events = &progress.events;
    let pos = |prefix: &str| events.iter().position(|e| e.starts_with(prefix));
    let healthy = |svc: &str| {
        events.iter().position(|e| {
            e.starts_with(&format!("{svc} ready"))
                || (e.starts_with(&format!("{svc} health check"))
                    && e.contains("passed the health test"))
        })
    };
    for (dep, dependent) in [("redis", "beat"), ("redis", "worker"), ("beat", "web")] {
        let (Some(h), Some(s)) = (healthy(dep), pos(&format!("{dependent} starting"))) else {
            bail!("{dep} never healthy or {dependent} never started: {events:?}");
        };
        ensure!(
            h < s,
            "dependency order ({dep} before {dependent}): {events:?}"
        );
    }
    for svc in ["redis", "beat", "worker", "web"] {
        ensure!(
            pos(&format!("{svc} ready")).is_some(),
            "{svc} never ready: {events:?}"
        );
    }
    let web = report
        .endpoints
        .iter()
        .find(|e| e.service == "web")
        .context("no web endpoint")?;
    ensure!(web.host_ip == "127.0.0.1", "{web:?}");

    // docker-compose v1 sees the same project.
    let ps = p.compose()?.run(&["ps"])?;
    for svc in ["redis_1", "web_1", "worker_1", "worker_2", "beat_1"] {
        let line = ps
            .lines()
            .find(|l| l.starts_with(&format!("{}_{svc}", p.name())))
            .with_context(|| format!("docker-compose ps does not list {svc}:\n{ps}"))?;
        ensure!(line.contains("Up (healthy)"), "{line}");
    }

    let first = verify_now(&engine, &p, false).await?;
    ensure!(first.ok, "{}", first.render());
    let holder = first.beat_lock_holder.clone().context("no lock holder")?;
    ensure!(
        holder.container.as_deref() == Some(&format!("{}_beat_1", p.name())),
        "{holder:?}"
    );

    // Re-running changes nothing.
    let again = up(&engine, &p.project, &opts(), &mut Recorder::default()).await?;
    ensure!(
        again.kept.len() == 5 && again.created.is_empty() && again.recreated.is_empty(),
        "{again:?}"
    );

    let rows = stackctl::ops::status(&engine, p.name()).await?;
    ensure!(
        rows.len() == 5 && rows.iter().all(|r| r.health == "healthy"),
        "{rows:?}"
    );

    let beat = format!("{}_beat_1", p.name());
    let d = docker().await?;
    crash_main_process(&d, &beat).await?;
    let crashed = Instant::now();
    wait_until(
        &format!("{beat} to be restarted and healthy"),
        Duration::from_secs(60),
        || {
            let (d, beat) = (&d, &beat);
            async move {
                let c = d.inspect_container(beat, None).await?;
                Ok((c.restart_count.unwrap_or(0) >= 1
                    && health(&c) == Some(HealthStatusEnum::HEALTHY))
                .then_some(()))
            }
        },
    )
    .await?;
    // The dead leader's lock lapses (TTL 10 s), then the restarted
    // process takes it: verify passes and names it.
    let last = std::sync::Mutex::new(String::new());
    let after = wait_until(
        "verify to pass after the beat crash",
        Duration::from_secs(60),
        || {
            let (engine, p, last) = (&engine, &p, &last);
            async move {
                let r = verify_now(engine, p, false).await?;
                *last.lock().expect("lock") = r.render();
                Ok(r.ok.then_some(r))
            }
        },
    )
    .await
    .with_context(|| last.lock().expect("lock").clone())?;
    let new = after.beat_lock_holder.context("no lock holder")?;
    eprintln!(
        "{:?} after the crash: verify passes; lock holder {} (was {})",
        crashed.elapsed(),
        new.holder.id,
        holder.holder.id
    );
    ensure!(
        new.holder.id != holder.holder.id,
        "the holder must be the new process: {new:?}"
    );
    ensure!(new.container == holder.container, "{new:?}");

    let mut lines = std::sync::Mutex::new(Vec::new());
    let sink = |l: &str| lines.lock().expect("lock").push(l.to_owned());
    stackctl::ops::logs(&engine, p.name(), "web", Some(5), false, &sink).await?;
    ensure!(
        lines
            .get_mut()
            .expect("lock")
            .iter()
            .any(|l| l.contains("taskstack-web serving")),
        "{:?}",
        lines
    );

    let down = stackctl::ops::down(&engine, p.name(), true).await?;
    ensure!(
        down.containers.len() == 5 && down.volumes.len() == 1,
        "{down:?}"
    );
    let left = leftovers(&docker().await?, &p.label()).await?;
    ensure!(left.is_empty(), "down -v left {left:?}");
    Ok(())
}

/// verify fails, naming the check, against broken stacks: Redis that takes
/// clients without a password, a second beat (refused unless standbys are
/// allowed), a stopped worker. `scale` adds and removes containers.
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_what_is_broken() -> Result<()> {
    let secrets = init_secrets()?;
    // Redis's default user without a password (the healthcheck user stays),
    // and services that send none: a copy of the compose directory.
    std::fs::write(
        secrets.path().join("redis_users.acl"),
        "user default on nopass ~* &* +@all\nuser healthcheck on nopass -@all +ping\n",
    )?;
    let dir = tempfile::tempdir()?;
    let compose = workspace_root()?.join("compose");
    std::fs::copy(
        compose.join("taskstack.toml"),
        dir.path().join("taskstack.toml"),
    )?;
    // Without a password Redis refuses other hosts unless protected mode
    // is off: the misconfiguration verify must catch.
    let conf = std::fs::read_to_string(compose.join("redis.conf"))? + "\nprotected-mode no\n";
    std::fs::write(dir.path().join("redis.conf"), conf)?;
    std::fs::create_dir(dir.path().join("redis-ha"))?;
    for f in ["lib.sh", "node.sh", "sentinel.sh"] {
        std::fs::copy(
            compose.join("redis-ha").join(f),
            dir.path().join("redis-ha").join(f),
        )?;
    }
    let yml = std::fs::read_to_string(compose.join("docker-compose.yml"))?;
    // Neither the broker nor the (Redis) result store gets a password.
    let mut open = yml.clone();
    for line in [
        "  TASKSTACK_BROKER_PASSWORD_FILE: ${BROKER_PASSWORD_FILE:-/run/secrets/redis_password}\n",
        "  TASKSTACK_RESULT_BACKEND_PASSWORD_FILE: ${RESULT_BACKEND_PASSWORD_FILE:-/run/secrets/redis_password}\n",
    ] {
        ensure!(
            open.contains(line),
            "the compose file no longer has the line {line:?}"
        );
        open = open.replace(line, "");
    }
    std::fs::write(dir.path().join("docker-compose.yml"), open)?;
    let p = project_on(
        &dir.path().join("docker-compose.yml"),
        "sbroken",
        secrets.path(),
        &[("WORKER_REPLICAS", "1")],
    )?;
    let engine = Live::connect().await?;
    up(&engine, &p.project, &opts(), &mut Recorder::default()).await?;

    let r = verify_now(&engine, &p, false).await?;
    ensure!(
        failed_ids(&r) == BTreeSet::from(["redis.password".to_owned()]),
        "{}",
        r.render()
    );
    ensure!(
        r.check("redis.password")
            .is_some_and(|c| c.reason.contains("PONG"))
    );

    // A second beat: refused by scale, allowed with the flag, then flagged
    // by verify unless standbys are allowed there too.
    let scale = |svc: &str, n: usize, standby: bool| UpOptions {
        replicas: BTreeMap::from([(svc.to_owned(), n)]),
        only: Some(BTreeSet::from([svc.to_owned()])),
        allow_standby_beats: standby,
        ..opts()
    };
    let refused = up(
        &engine,
        &p.project,
        &scale("beat", 2, false),
        &mut Recorder::default(),
    )
    .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("--allow-standby-beats")),
        "{refused:?}"
    );
    up(
        &engine,
        &p.project,
        &scale("beat", 2, true),
        &mut Recorder::default(),
    )
    .await?;
    let r = verify_now(&engine, &p, false).await?;
    ensure!(failed_ids(&r).contains("beat.single"), "{}", r.render());
    let r = verify_now(&engine, &p, true).await?;
    ensure!(
        !failed_ids(&r).contains("beat.single") && !failed_ids(&r).contains("beat.lock"),
        "{}",
        r.render()
    );

    // Scale the worker up, then stop one: verify names the service.
    let grown = up(
        &engine,
        &p.project,
        &scale("worker", 2, false),
        &mut Recorder::default(),
    )
    .await?;
    ensure!(
        grown.created == [format!("{}_worker_2", p.name())],
        "{grown:?}"
    );
    engine
        .stop_container(
            &format!("{}_worker_2", p.name()),
            Some(Duration::from_secs(10)),
        )
        .await?;
    let r = verify_now(&engine, &p, true).await?;
    let worker = r.check("service.worker").context("service.worker")?;
    ensure!(
        !worker.ok && worker.reason.contains("_worker_2 is exited"),
        "{}",
        r.render()
    );
    Ok(())
}

/// Clear errors before anything is changed: a missing image names the
/// command that builds it; a taken port names the port.
#[tokio::test(flavor = "multi_thread")]
async fn up_refuses_missing_images_and_taken_ports() -> Result<()> {
    let secrets = init_secrets()?;
    let engine = Live::connect().await?;
    let p = project(
        "snoimg",
        secrets.path(),
        &[("TASKSTACK_IMAGE", "localhost/taskstack:never-built")],
    )?;
    let e = up(&engine, &p.project, &opts(), &mut Recorder::default())
        .await
        .expect_err("the image is missing");
    ensure!(
        e.to_string().contains("localhost/taskstack:never-built")
            && e.to_string().contains("stackctl build"),
        "{e}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let p = project("sport", secrets.path(), &[("WEB_PORT", &port)])?;
    let e = up(&engine, &p.project, &opts(), &mut Recorder::default())
        .await
        .expect_err("the port is taken");
    ensure!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    ensure!(
        engine
            .list_containers(&p.label())
            .await?
            .iter()
            .all(|c| !c.name.contains("_web_")),
        "no web container for a taken port"
    );
    Ok(())
}
