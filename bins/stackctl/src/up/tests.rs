use super::*;
use crate::compose::{self, Env};
use crate::engine::fake::{Behaviour, Fake};
use crate::progress::Recorder;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub(crate) const APP: &str = "localhost/taskstack:t";
pub(crate) const REDIS: &str = "localhost/taskstack-redis:t";

/// The shipped compose file with test images, a secrets directory of its
/// own, fast health checks; `extra` overrides.
pub(crate) fn shipped(secrets: &Path, extra: &[(&str, &str)]) -> Project {
    let file: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose/docker-compose.yml");
    shipped_file(&file, secrets, extra)
}

/// [`shipped`] with another compose file.
pub(crate) fn shipped_file(file: &Path, secrets: &Path, extra: &[(&str, &str)]) -> Project {
    for f in [
        "redis_password",
        "api_token",
        "redis_users.acl",
        "postgres_password",
        "rabbitmq_password",
    ] {
        std::fs::write(secrets.join(f), "s3cret-s3cret-s3cret\n").expect("write secret");
    }
    let mut env: Env = [
        ("TASKSTACK_IMAGE", APP),
        ("REDIS_IMAGE", REDIS),
        ("HEALTHCHECK_INTERVAL", "1s"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.insert(
        "TASKSTACK_SECRETS_DIR".into(),
        secrets.display().to_string(),
    );
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    compose::load(file, &env, Some("proj")).expect("the shipped file loads")
}

fn fast() -> UpOptions {
    UpOptions {
        poll: Duration::from_millis(1),
        timeout: Duration::from_secs(5),
        ..UpOptions::default()
    }
}

fn index(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no call {call:?} in {calls:?}"))
}

#[tokio::test]
async fn a_fresh_up_starts_services_in_dependency_order_once_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = shipped(dir.path(), &[]);
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_behaviour("redis", Behaviour::HealthyAfter(3));
    let mut progress = Recorder::default();
    let report = up(&engine, &p, &fast(), &mut progress).await.expect("up");
    let calls = engine.calls();
    // Resources before containers.
    assert!(index(&calls, "network proj_backend") < index(&calls, "create proj_redis_1"));
    assert!(calls.contains(&"network proj_frontend".to_owned()));
    assert!(calls.contains(&"volume proj_redis-data".to_owned()));
    // redis healthy before worker and beat exist; beat healthy before web.
    for dependent in [
        "create proj_worker_1",
        "create proj_worker_2",
        "create proj_beat_1",
    ] {
        assert!(
            index(&calls, "start proj_redis_1") < index(&calls, dependent),
            "{calls:?}"
        );
    }
    assert!(index(&calls, "create proj_beat_1") < index(&calls, "create proj_web_1"));
    assert!(
        progress
            .events
            .iter()
            .any(|e| e.starts_with("web waiting for beat (healthy)")),
        "{:?}",
        progress.events
    );
    let events = &progress.events;
    let redis_ready = events
        .iter()
        .position(|e| e.starts_with("redis ready"))
        .expect("redis ready");
    let beat_starting = events
        .iter()
        .position(|e| e == "beat starting")
        .expect("beat starting");
    assert!(redis_ready < beat_starting, "{events:?}");
    assert_eq!(report.created.len(), 5, "{report:?}");
    assert_eq!(
        report
            .endpoints
            .iter()
            .map(Endpoint::url)
            .collect::<Vec<_>>(),
        ["http://127.0.0.1:8000"]
    );
    let web = &engine.containers()["proj_web_1"];
    assert_eq!(web.spec.networks.len(), 2);
    assert!(
        web.spec
            .binds
            .iter()
            .any(|b| b.ends_with(":/run/secrets/api_token:ro"))
    );
}

#[tokio::test]
async fn a_rerun_reconciles_unchanged_kept_changed_recreated_nothing_duplicated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    let p = shipped(dir.path(), &[]);
    up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect("first up");
    engine.clear_calls();

    let again = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect("second up");
    assert_eq!(again.kept.len(), 5);
    assert!(again.created.is_empty() && again.recreated.is_empty());
    assert!(engine.calls().is_empty(), "{:?}", engine.calls());

    // LOG_LEVEL reaches web, worker and beat, not redis.
    let changed = shipped(dir.path(), &[("LOG_LEVEL", "debug")]);
    let r = up(&engine, &changed, &fast(), &mut Recorder::default())
        .await
        .expect("third up");
    let mut recreated = r.recreated.clone();
    recreated.sort();
    assert_eq!(
        recreated,
        [
            "proj_beat_1",
            "proj_web_1",
            "proj_worker_1",
            "proj_worker_2"
        ]
    );
    assert_eq!(r.kept, ["proj_redis_1"]);
    assert_eq!(engine.containers().len(), 5);

    // A rebuilt image recreates what runs it.
    engine.set_image(REDIS, "sha256:new");
    let r = up(&engine, &changed, &fast(), &mut Recorder::default())
        .await
        .expect("fourth up");
    assert_eq!(r.recreated, ["proj_redis_1"]);
}

#[tokio::test]
async fn scale_adds_and_removes_only_that_services_containers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    let p = shipped(dir.path(), &[]);
    up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect("up");
    engine.clear_calls();
    let scale = |n: usize| UpOptions {
        replicas: BTreeMap::from([("worker".to_owned(), n)]),
        only: Some(BTreeSet::from(["worker".to_owned()])),
        ..fast()
    };
    let r = up(&engine, &p, &scale(3), &mut Recorder::default())
        .await
        .expect("scale up");
    assert_eq!(r.created, ["proj_worker_3"]);
    assert_eq!(
        engine.calls(),
        ["create proj_worker_3", "start proj_worker_3"]
    );
    let r = up(&engine, &p, &scale(1), &mut Recorder::default())
        .await
        .expect("scale down");
    let mut removed = r.removed.clone();
    removed.sort();
    assert_eq!(removed, ["proj_worker_2", "proj_worker_3"]);
    assert_eq!(engine.containers().len(), 4);
}

#[tokio::test]
async fn more_than_one_beat_needs_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    let p = shipped(dir.path(), &[]);
    let two_beats = UpOptions {
        replicas: BTreeMap::from([("beat".to_owned(), 2)]),
        ..fast()
    };
    let e = up(&engine, &p, &two_beats, &mut Recorder::default())
        .await
        .expect_err("refused");
    assert!(
        matches!(e, StackError::BeatReplicas { replicas: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("--allow-standby-beats"));
    assert!(engine.calls().is_empty(), "nothing was changed");
    let allowed = UpOptions {
        allow_standby_beats: true,
        ..two_beats
    };
    up(&engine, &p, &allowed, &mut Recorder::default())
        .await
        .expect("allowed");
    assert!(engine.containers().contains_key("proj_beat_2"));
}

#[tokio::test]
async fn an_unhealthy_service_fails_up_with_its_checks_and_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_behaviour(
        "worker",
        Behaviour::UnhealthyAfter(2, "unhealthy: no heartbeat".into()),
    );
    engine.set_logs(
        "proj_worker_1",
        &["starting", "ERROR Password authentication failed"],
    );
    let p = shipped(dir.path(), &[]);
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("worker unhealthy");
    let StackError::ServiceFailed {
        service,
        health,
        logs,
        ..
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(service, "worker");
    assert_eq!(health, &["exit 1: unhealthy: no heartbeat"]);
    assert_eq!(
        logs.last().map(String::as_str),
        Some("ERROR Password authentication failed")
    );
    let text = e.to_string();
    assert!(
        text.contains("is unhealthy") && text.contains("Password authentication failed"),
        "{text}"
    );
    // web, which depends on beat only, may start; it never got a worker-less go-ahead from us:
    assert!(!engine.containers().is_empty());
}

#[tokio::test]
async fn an_exiting_service_fails_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_behaviour("redis", Behaviour::ExitsAfter(1, 1));
    let p = shipped(dir.path(), &[]);
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("redis exits");
    assert!(
        e.to_string().contains("proj_redis_1 exited with code 1"),
        "{e}"
    );
    assert!(
        !engine.containers().contains_key("proj_worker_1"),
        "dependents never start"
    );
}

#[tokio::test]
async fn missing_images_secrets_and_taken_ports_fail_before_any_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = shipped(dir.path(), &[]);
    let engine = Fake::with_images(&[REDIS]);
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("no app image");
    assert!(
        matches!(&e, StackError::ImageMissing { image, .. } if image == APP),
        "{e}"
    );
    assert!(e.to_string().contains("stackctl build"));

    let engine = Fake::with_images(&[APP, REDIS]);
    engine.occupy_port(8000);
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("port taken");
    assert!(
        matches!(&e, StackError::PortTaken { addr, .. } if addr == "127.0.0.1:8000"),
        "{e}"
    );
    assert!(engine.containers().is_empty());

    std::fs::remove_file(dir.path().join("redis_password")).expect("rm");
    let e = up(
        &Fake::with_images(&[APP, REDIS]),
        &p,
        &fast(),
        &mut Recorder::default(),
    )
    .await
    .expect_err("secret missing");
    assert!(e.to_string().contains("compose/init-secrets"), "{e}");
}

#[tokio::test]
async fn a_stack_that_never_turns_healthy_times_out_naming_what_it_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_behaviour("redis", Behaviour::HealthyAfter(u32::MAX));
    let p = shipped(dir.path(), &[]);
    let opts = UpOptions {
        timeout: Duration::from_millis(50),
        ..fast()
    };
    let e = up(&engine, &p, &opts, &mut Recorder::default())
        .await
        .expect_err("timeout");
    let text = e.to_string();
    assert!(
        text.contains("redis (not healthy yet)") && text.contains("web (not started"),
        "{text}"
    );
}

/// Answers exec with exit 0 for Redis's health test and 1 otherwise, and
/// records which containers were asked.
fn redis_test_passes(asked: &Arc<Mutex<Vec<String>>>) -> crate::engine::fake::ExecHandler {
    let asked = Arc::clone(asked);
    Arc::new(move |c, cmd| {
        asked
            .lock()
            .expect("lock")
            .push(format!("{} {}", c.spec.name, cmd.join(" ")));
        crate::engine::ExecOutput {
            exit_code: Some(if cmd.first().map(String::as_str) == Some("redis-cli") {
                0
            } else {
                1
            }),
            ..Default::default()
        }
    })
}

#[tokio::test]
async fn dependents_start_once_the_dependencys_own_health_test_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = shipped(dir.path(), &[]);
    let engine = Fake::with_images(&[APP, REDIS]);
    // The engine's verdict on redis comes late; its health test passes at once.
    engine.set_behaviour("redis", Behaviour::HealthyAfter(30));
    let asked = Arc::new(Mutex::new(Vec::new()));
    engine.set_exec(redis_test_passes(&asked));
    let mut progress = Recorder::default();
    up(&engine, &p, &fast(), &mut progress).await.expect("up");
    let events = &progress.events;
    let at = |prefix: &str| {
        events
            .iter()
            .position(|e| e.starts_with(prefix))
            .unwrap_or_else(|| panic!("no event {prefix:?} in {events:?}"))
    };
    assert!(at("redis health check 1/1 passed the health test") < at("worker starting"));
    assert!(at("worker starting") < at("redis ready"), "{events:?}");
    // The workers' and beat's tests failed, so web waited for the engine.
    assert!(at("beat ready") < at("web starting"), "{events:?}");
    let asked = asked.lock().expect("lock").clone();
    assert!(
        asked.iter().any(
            |a| a.starts_with("proj_redis_1 redis-cli -e --no-auth-warning --user healthcheck")
        ),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .any(|a| a == "proj_beat_1 /taskstack-beat healthcheck"),
        "{asked:?}"
    );
    // Nothing waits on web: its test is left to the engine.
    assert!(
        !asked.iter().any(|a| a.starts_with("proj_web_1")),
        "{asked:?}"
    );
    for c in engine.containers().values() {
        assert_eq!(
            c.health,
            Health::Healthy,
            "{}: up returns on the engine's verdict",
            c.spec.name
        );
    }
}

#[tokio::test]
async fn a_dependency_the_engine_then_finds_unhealthy_still_fails_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = shipped(dir.path(), &[]);
    let engine = Fake::with_images(&[APP, REDIS]);
    engine.set_behaviour(
        "redis",
        Behaviour::UnhealthyAfter(20, "NOAUTH Authentication required".into()),
    );
    engine.set_exec(redis_test_passes(&Arc::new(Mutex::new(Vec::new()))));
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("redis turned unhealthy");
    assert!(
        matches!(&e, StackError::ServiceFailed { service, health, .. }
            if service == "redis" && health.iter().any(|h| h.contains("NOAUTH"))),
        "{e}"
    );
    // Its dependents had started on the passed test.
    assert!(engine.calls().contains(&"start proj_worker_1".to_owned()));
}

/// The shipped file with no image variables, secrets in `secrets`.
fn load_plain(secrets: &Path) -> impl Fn(&Env) -> Result<Project, StackError> {
    let secrets = secrets.display().to_string();
    move |env: &Env| {
        let mut env = env.clone();
        env.insert("TASKSTACK_SECRETS_DIR".into(), secrets.clone());
        let file: PathBuf =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose/docker-compose.yml");
        Ok(compose::load(&file, &env, Some("proj"))?)
    }
}

#[tokio::test]
async fn after_stackctl_build_a_plain_up_runs_the_built_images_and_makes_the_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let built_app = "localhost/taskstack:local";
    let built_redis = "localhost/taskstack-redis:local";
    let engine = Fake::with_images(&[built_app, built_redis]);
    let mut env = Env::new();
    let (p, notes) = images::prefer_built(&engine, &mut env, load_plain(&secrets))
        .await
        .expect("load");
    assert_eq!(p.services["web"].image, built_app);
    assert_eq!(p.services["worker"].image, built_app);
    assert_eq!(p.services["redis"].image, built_redis);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].starts_with("using localhost/taskstack:local (made by `stackctl build`) for beat, web, worker: ghcr.io/taskstack/taskstack:latest is not on this engine"),
        "{notes:?}"
    );
    assert_eq!(env["TASKSTACK_IMAGE"], built_app);

    let mut progress = Recorder::default();
    let report = up(&engine, &p, &fast(), &mut progress).await.expect("up");
    assert_eq!(report.created.len(), 5, "{report:?}");
    let created: Vec<&String> = progress
        .events
        .iter()
        .filter(|e| e.starts_with("created secret"))
        .collect();
    assert_eq!(created.len(), 6, "{:?}", progress.events);
    // The format is init-secrets' own: run on this directory, it keeps
    // every value and rewrites the ACL byte for byte.
    let read = |f: &str| std::fs::read(secrets.join(f)).expect(f);
    let before: Vec<Vec<u8>> = ["redis_password", "api_token", "redis_users.acl"]
        .iter()
        .map(|f| read(f))
        .collect();
    assert_eq!(before[0].len(), 64);
    let status = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose/init-secrets"),
    )
    .env("TASKSTACK_SECRETS_DIR", &secrets)
    .stdout(std::process::Stdio::null())
    .status()
    .expect("init-secrets runs");
    assert!(status.success());
    let after: Vec<Vec<u8>> = ["redis_password", "api_token", "redis_users.acl"]
        .iter()
        .map(|f| read(f))
        .collect();
    assert_eq!(before, after);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&secrets), 0o700);
    assert_eq!(mode(&secrets.join("api_token")), 0o644);
}

#[tokio::test]
async fn a_choice_is_never_overridden_and_a_partial_secret_set_is_refused_with_the_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    // The file's default is here: it stays.
    let engine = Fake::with_images(&[
        "ghcr.io/taskstack/taskstack:latest",
        "localhost/taskstack:local",
    ]);
    let (p, notes) = images::prefer_built(&engine, &mut Env::new(), load_plain(&secrets))
        .await
        .expect("load");
    assert_eq!(
        p.services["web"].image,
        "ghcr.io/taskstack/taskstack:latest"
    );
    assert_eq!(p.services["redis"].image, "redis:7-alpine");
    assert!(notes.is_empty(), "{notes:?}");
    // A variable that is set stays, even naming an image that is not here.
    let engine = Fake::with_images(&["localhost/taskstack:local"]);
    let mut env: Env = [("TASKSTACK_IMAGE".to_owned(), "mine:1".to_owned())].into();
    let (p, _) = images::prefer_built(&engine, &mut env, load_plain(&secrets))
        .await
        .expect("load");
    assert_eq!(p.services["web"].image, "mine:1");
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("mine:1 is not here");
    assert!(e.to_string().contains("image mine:1"), "{e}");

    // One file of an existing set missing: refused, naming the command.
    std::fs::create_dir_all(&secrets).expect("mkdir");
    std::fs::write(secrets.join("redis_password"), "pw").expect("write");
    let engine = Fake::with_images(&[
        "localhost/taskstack:local",
        "localhost/taskstack-redis:local",
    ]);
    let (p, _) = images::prefer_built(&engine, &mut Env::new(), load_plain(&secrets))
        .await
        .expect("load");
    let e = up(&engine, &p, &fast(), &mut Recorder::default())
        .await
        .expect_err("partial set");
    let text = e.to_string();
    assert!(
        text.contains(&format!("TASKSTACK_SECRETS_DIR={} ", secrets.display()))
            && text.contains("compose/init-secrets`"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(secrets.join("redis_password")).expect("pw"),
        "pw"
    );
    assert!(engine.containers().is_empty());
}

#[tokio::test]
async fn a_missing_secret_nothing_derives_from_is_made_in_an_existing_set() {
    // A set made before the profile `postgres` existed: its password is
    // made alone, the others are kept.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = shipped(dir.path(), &[]);
    let before = std::fs::read(dir.path().join("redis_password")).expect("pw");
    std::fs::remove_file(dir.path().join("postgres_password")).expect("rm");
    // ... and one made before the profile `rabbitmq` existed.
    std::fs::remove_file(dir.path().join("rabbitmq_password")).expect("rm");
    let engine = Fake::with_images(&[APP, REDIS]);
    let mut progress = Recorder::default();
    up(&engine, &p, &fast(), &mut progress).await.expect("up");
    for name in ["postgres_password", "rabbitmq_password"] {
        let made = dir.path().join(name);
        assert!(
            progress
                .events
                .iter()
                .any(|e| e == &format!("created secret {}", made.display())),
            "{:?}",
            progress.events
        );
        assert_eq!(std::fs::read_to_string(&made).expect("made").len(), 64);
    }
    assert_eq!(
        std::fs::read(dir.path().join("redis_password")).expect("pw"),
        before
    );
}
