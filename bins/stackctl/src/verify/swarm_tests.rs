use super::*;
use serde_json::json;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn app(name: &str, program: &str, replicas: u64) -> SwarmService {
    SwarmService {
        name: name.into(),
        desired: Some(replicas),
        running: replicas as usize,
        command: vec![format!("/{program}")],
        env: env(&[
            (
                "TASKSTACK_BROKER_PASSWORD_FILE",
                "/run/secrets/redis_password",
            ),
            ("TASKSTACK_DRAIN_TIMEOUT", "20s"),
        ]),
        secret_files: vec!["redis_password".into()],
        networks: vec![("s_backend".into(), true)],
        update_order: Some("stop-first".into()),
        stop_grace_period: Some(Duration::from_secs(30)),
        restart_condition: Some("any".into()),
        memory_limit: Some(128 << 20),
        ..SwarmService::default()
    }
}

/// The stack compose/swarm.yml describes, all healthy.
fn healthy() -> SwarmFacts {
    let mut web = app("web", "taskstack-web", 2);
    web.update_order = Some("start-first".into());
    web.env.insert(
        "TASKSTACK_API_TOKENS_FILE".into(),
        "/run/secrets/api_token".into(),
    );
    web.secret_files.push("api_token".into());
    web.networks.push(("s_frontend".into(), false));
    web.published = vec!["8000/ingress".into()];
    let redis = SwarmService {
        command: vec!["redis-server".into(), "/etc/redis.conf".into()],
        env: BTreeMap::new(),
        secret_files: vec!["redis_acl".into()],
        ..app("redis", "redis-server", 1)
    };
    SwarmFacts {
        stack: "s".into(),
        node: Ok(("active".into(), true)),
        services: vec![
            app("beat", "taskstack-beat", 2),
            redis,
            web,
            app("worker", "taskstack-worker", 2),
        ],
        web_health: Some(Ok(200)),
        smoke: Some(Ok(SmokeFacts {
            task_id: "t1".into(),
            expected: 5,
            state: "SUCCESS".into(),
            result: json!(5),
            elapsed: Duration::from_millis(12),
        })),
    }
}

fn failed(f: &SwarmFacts) -> Vec<(String, String)> {
    evaluate(f)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| (c.id, c.reason))
        .collect()
}

fn svc<'a>(f: &'a mut SwarmFacts, name: &str) -> &'a mut SwarmService {
    f.services
        .iter_mut()
        .find(|s| s.name == name)
        .expect("a service of the shipped shape")
}

#[test]
fn the_shipped_shape_passes_every_check() {
    let f = healthy();
    assert_eq!(failed(&f), vec![]);
    let ids: Vec<String> = evaluate(&f).into_iter().map(|c| c.id).collect();
    for id in [
        "swarm.node",
        "service.worker",
        "redis.internal.redis",
        "secrets.redis_password.beat",
        "secrets.api_token.web",
        "update.web",
        "update.worker",
        "worker.stop_grace.worker",
        "beat.replicas.beat",
        "restart.redis",
        "resources.memory",
        "web.health",
        "smoke.add",
    ] {
        assert!(ids.iter().any(|i| i == id), "{id} missing from {ids:?}");
    }
}

#[test]
fn a_node_outside_a_swarm_fails_with_the_command_to_run() {
    let mut f = healthy();
    f.node = Ok(("inactive".into(), false));
    let bad = failed(&f);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].1.contains("docker swarm init"), "{bad:?}");
}

#[test]
fn missing_replicas_are_named_with_the_tasks_errors() {
    let mut f = healthy();
    let w = svc(&mut f, "worker");
    w.running = 1;
    w.problems = vec!["task 2 rejected (No such image: x)".into()];
    assert_eq!(
        failed(&f),
        vec![(
            "service.worker".to_owned(),
            "1/2 tasks running: task 2 rejected (No such image: x)".to_owned()
        )]
    );
}

#[test]
fn a_missing_role_fails() {
    let mut f = healthy();
    f.services.retain(|s| s.name != "beat");
    let bad = failed(&f);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, "service.beat");
}

#[test]
fn redis_on_an_open_network_or_published_fails() {
    let mut f = healthy();
    let r = svc(&mut f, "redis");
    r.networks.push(("s_frontend".into(), false));
    r.published = vec!["6379/ingress".into()];
    assert_eq!(
        failed(&f),
        vec![(
            "redis.internal.redis".to_owned(),
            "on non-internal network(s) s_frontend; publishes 6379/ingress".to_owned()
        )]
    );
}

#[test]
fn a_password_in_the_environment_or_not_from_a_secret_fails() {
    let mut f = healthy();
    svc(&mut f, "beat")
        .env
        .insert("TASKSTACK_BROKER_PASSWORD".into(), "hunter2".into());
    svc(&mut f, "worker").secret_files.clear();
    let bad = failed(&f);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert_eq!(bad[0].0, "secrets.redis_password.beat");
    assert!(
        bad[0].1.contains("TASKSTACK_BROKER_PASSWORD set"),
        "{bad:?}"
    );
    assert!(!bad[0].1.contains("hunter2"), "the secret leaked: {bad:?}");
    assert_eq!(bad[1].0, "secrets.redis_password.worker");
    assert!(bad[1].1.contains("not a mounted Swarm secret"), "{bad:?}");
}

#[test]
fn wrong_update_orders_fail() {
    let mut f = healthy();
    svc(&mut f, "web").update_order = Some("stop-first".into());
    svc(&mut f, "worker").update_order = None;
    let ids: Vec<String> = failed(&f).into_iter().map(|(i, _)| i).collect();
    assert_eq!(ids, ["update.web", "update.worker"]);
}

#[test]
fn a_grace_period_not_above_the_drain_timeout_fails() {
    let mut f = healthy();
    svc(&mut f, "worker").stop_grace_period = Some(Duration::from_secs(20));
    let bad = failed(&f);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0]
            .1
            .contains("stop_grace_period 20s is not above the drain timeout 20s")
    );
    let mut f = healthy();
    svc(&mut f, "worker")
        .env
        .insert("TASKSTACK_DRAIN_TIMEOUT".into(), "soon".into());
    assert_eq!(failed(&f)[0].0, "worker.stop_grace.worker");
}

#[test]
fn no_beat_no_restart_no_memory_limit_fail() {
    let mut f = healthy();
    svc(&mut f, "beat").desired = Some(0);
    svc(&mut f, "beat").running = 0;
    svc(&mut f, "redis").restart_condition = Some("none".into());
    svc(&mut f, "web").memory_limit = None;
    let ids: Vec<String> = failed(&f).into_iter().map(|(i, _)| i).collect();
    assert_eq!(
        ids,
        [
            "service.beat",
            "beat.replicas.beat",
            "restart.redis",
            "resources.memory"
        ]
    );
}

#[test]
fn the_web_checks_run_only_when_asked_and_name_what_failed() {
    let mut f = healthy();
    f.web_health = None;
    f.smoke = None;
    assert!(
        evaluate(&f)
            .iter()
            .all(|c| c.id != "web.health" && c.id != "smoke.add")
    );
    f.web_health = Some(Ok(503));
    f.smoke = Some(Err("POST /api/v1/tasks answered 401".into()));
    assert_eq!(
        failed(&f),
        vec![
            (
                "web.health".to_owned(),
                "GET /health answered 503".to_owned()
            ),
            (
                "smoke.add".to_owned(),
                "POST /api/v1/tasks answered 401".to_owned()
            )
        ]
    );
}

#[test]
fn roles_come_from_the_program_then_the_name() {
    let mut s = SwarmService {
        name: "jobs".into(),
        command: vec!["/taskstack".into(), "taskstack-worker".into()],
        ..SwarmService::default()
    };
    assert_eq!(s.role(), Role::Worker);
    s.command.clear();
    assert_eq!(s.role(), Role::Other);
    s.name = "beat".into();
    assert_eq!(s.role(), Role::Beat);
}
