use super::*;

fn the_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose/docker-compose.yml")
}

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse_str(text: &str) -> Result<Project, ComposeError> {
    parse(
        text,
        Path::new("/p/docker-compose.yml"),
        Path::new("/p"),
        Env::new(),
        None,
    )
}

#[test]
fn the_projects_compose_file_loads_with_defaults_and_overrides() {
    let p = load(&the_file(), &env(&[]), None).expect("the shipped file loads");
    assert_eq!(p.name, "compose");
    assert_eq!(
        p.services.keys().collect::<Vec<_>>(),
        ["beat", "redis", "web", "worker"]
    );
    let web = &p.services["web"];
    assert_eq!(web.image, "ghcr.io/taskstack/taskstack:latest");
    assert_eq!(
        web.ports,
        [Port {
            host_ip: "127.0.0.1".into(),
            host_port: 8000,
            container_port: 8000,
            protocol: "tcp".into()
        }]
    );
    // Merge keys: the hardening anchor and the shared environment.
    assert!(web.init && web.read_only);
    assert_eq!(web.restart, Restart::UnlessStopped);
    assert_eq!(web.cap_drop, ["ALL"]);
    assert_eq!(web.tmpfs, ["/tmp"]);
    assert_eq!(
        web.environment["TASKSTACK_BROKER_URL"],
        "redis://redis:6379/0"
    );
    assert_eq!(web.environment["TASKSTACK_WEB_EXPECT_BEAT"], "true");
    assert_eq!(web.networks, ["backend", "frontend"]);
    assert_eq!(web.depends_on["beat"], Condition::Healthy);
    assert_eq!(
        web.logging.as_ref().map(|l| l.options["max-file"].as_str()),
        Some("5")
    );
    assert_eq!(p.services["worker"].replicas, 2);
    assert_eq!(
        p.services["worker"].stop_grace_period,
        Some(Duration::from_secs(30))
    );
    let redis = &p.services["redis"];
    assert_eq!(redis.volume_mounts[0].volume, "redis-data");
    assert!(redis.binds[0].source.ends_with("compose/redis.conf"));
    let hc = redis.healthcheck.as_ref().expect("redis healthcheck");
    assert_eq!(hc.interval, Some(Duration::from_secs(5)));
    assert_eq!(hc.retries, Some(5));
    assert!(p.networks["backend"].internal && !p.networks["frontend"].internal);
    assert!(
        p.secrets["api_token"]
            .file
            .ends_with("compose/secrets/api_token")
    );
    assert_eq!(
        p.start_order().expect("acyclic"),
        ["redis", "beat", "web", "worker"]
    );

    assert!(
        !p.networks.contains_key("monitoring"),
        "profile networks only with the profile"
    );
    assert!(!p.volumes.contains_key("prometheus-data"));

    let p = load(
        &the_file(),
        &env(&[
            ("COMPOSE_PROFILES", "monitoring"),
            ("WORKER_REPLICAS", "3"),
            ("WEB_PORT", "18000"),
            ("HEALTHCHECK_INTERVAL", "1s"),
            ("TASKSTACK_SECRETS_DIR", "/s"),
        ]),
        Some("My_Proj"),
    )
    .expect("loads");
    assert_eq!(p.name, "my_proj");
    assert!(p.services.contains_key("grafana") && p.networks.contains_key("monitoring"));
    assert_eq!(p.services["worker"].replicas, 3);
    assert_eq!(p.services["web"].ports[0].host_port, 18000);
    assert_eq!(p.secrets["redis_acl"].file, Path::new("/s/redis_users.acl"));
}

#[test]
fn the_app_profile_runs_a_users_image_as_app_and_as_a_worker_of_its_own_queue() {
    let p = load(&the_file(), &env(&[]), None).expect("loads");
    assert!(!p.services.contains_key("app") && !p.services.contains_key("app-worker"));

    let p = load(
        &the_file(),
        &env(&[
            ("COMPOSE_PROFILES", "app"),
            ("APP_IMAGE", "localhost/team-app:1"),
        ]),
        None,
    )
    .expect("loads with the profile");
    let (app, worker) = (&p.services["app"], &p.services["app-worker"]);
    assert_eq!(app.image, "localhost/team-app:1");
    assert_eq!(worker.image, "localhost/team-app:1");
    assert_eq!(app.command, None, "the image's own command");
    assert_eq!(
        app.networks,
        ["backend"],
        "reached by name, never published"
    );
    assert!(app.ports.is_empty());
    assert_eq!(
        worker.command.as_deref(),
        Some(&["/usr/local/bin/taskstack-worker".to_owned()][..])
    );
    assert_eq!(crate::plan::Role::of(worker), crate::plan::Role::Worker);
    assert_eq!(worker.environment["TASKSTACK_QUEUES"], "app");
    assert_eq!(
        worker.environment["TASKSTACK_CONFIG"],
        "/etc/taskstack/app-tasks.toml"
    );
    assert_eq!(
        worker.environment["TASKSTACK_BROKER_URL"],
        "redis://redis:6379/0"
    );
    assert!(worker.binds[0].source.ends_with("compose/app-tasks.toml"));
    assert_eq!(worker.binds[0].target, "/etc/taskstack/app-tasks.toml");
    assert_eq!(
        worker.binds.len(),
        1,
        "not the stock services' taskstack.toml"
    );
    assert_eq!(
        worker.secrets,
        ["redis_password", "postgres_password", "rabbitmq_password"]
    );
    assert_eq!(worker.depends_on["app"], Condition::Healthy);
    assert_eq!(worker.depends_on["redis"], Condition::Healthy);
    for svc in [app, worker] {
        assert!(svc.read_only && svc.init, "{}", svc.name);
        assert_eq!(svc.user.as_deref(), Some("65534:65534"), "{}", svc.name);
        assert_eq!(svc.cap_drop, ["ALL"], "{}", svc.name);
    }
    let order = p.start_order().expect("acyclic");
    let at = |s: &str| order.iter().position(|x| x == s).expect(s);
    assert!(at("redis") < at("app-worker") && at("app") < at("app-worker"));

    // The file app-worker reads, as it reads it, declares one task of each kind.
    let config = crate::verify::config::service_config(&p, worker).expect("app-worker's config");
    assert_eq!(config.queues, ["app"]);
    let kinds: Vec<(&str, bool)> = config
        .tasks
        .iter()
        .map(|(name, d)| {
            (
                name.as_str(),
                matches!(d.kind, taskstack::config::TaskKind::Exec(_)),
            )
        })
        .collect();
    assert_eq!(kinds, [("billing.charge", false), ("reports.render", true)]);
}

#[test]
fn unknown_keys_are_errors_naming_file_line_and_key() {
    let text = "services:\n  web:\n    image: x\n    privileged: true\n";
    let e = parse_str(text).expect_err("privileged is not supported");
    assert_eq!(e.key, "services.web.privileged");
    assert_eq!(e.line, Some(4));
    assert!(
        e.to_string()
            .starts_with("/p/docker-compose.yml:4: services.web.privileged: unknown key"),
        "{e}"
    );

    let e = parse_str("services: {}\nconfigs: {}\n").expect_err("configs");
    assert_eq!((e.key.as_str(), e.line), ("configs", Some(2)));

    let e = parse_str("services:\n  a:\n    image: x\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n      start_interval: 1s\n")
        .expect_err("start_interval needs API 1.44");
    assert_eq!(e.key, "services.a.healthcheck.start_interval");
    assert_eq!(e.line, Some(6));
}

#[test]
fn extension_keys_anchors_and_merges_are_applied() {
    let text = "x-common: &c\n  restart: always\n  image: img\nservices:\n  a:\n    <<: *c\n    x-note: fine\n";
    let p = parse_str(text).expect("valid");
    assert_eq!(p.services["a"].restart, Restart::Always);
    assert_eq!(p.services["a"].image, "img");
    assert_eq!(p.services["a"].networks, [DEFAULT_NETWORK]);
    assert!(p.networks.contains_key(DEFAULT_NETWORK));
}

#[test]
fn required_variables_and_bad_values_fail_clearly() {
    let e = parse_str("services:\n  a:\n    image: ${IMG:?set IMG to the app image}\n")
        .expect_err("IMG unset");
    assert_eq!(e.line, Some(3));
    assert!(
        e.message
            .contains("IMG is required: set IMG to the app image"),
        "{e}"
    );

    let e = parse_str("services:\n  a:\n    image: x\n    ports: [\"8000\"]\n")
        .expect_err("no host port");
    assert_eq!(e.key, "services.a.ports[0]");
    let e =
        parse_str("services:\n  a:\n    image: x\n    restart: sometimes\n").expect_err("restart");
    assert_eq!((e.key.as_str(), e.line), ("services.a.restart", Some(4)));
    let e =
        parse_str("services:\n  a:\n    image: x\n    depends_on: [b]\n").expect_err("unknown dep");
    assert!(e.message.contains("unknown service `b`"), "{e}");
    let e = parse_str("services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [a]\n")
        .expect_err("cycle");
    assert!(e.message.contains("dependency cycle"), "{e}");
    let e = parse_str("services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: service_healthy}\n  b:\n    image: x\n")
        .expect_err("no healthcheck");
    assert!(e.message.contains("no healthcheck"), "{e}");
    let e = parse_str("services:\n  a:\n    image: x\n    volumes: [\"data:/d\"]\n")
        .expect_err("undeclared volume");
    assert!(e.message.contains("volume `data` is not declared"), "{e}");
    let e = parse_str("services:\n  a: [\n").expect_err("yaml");
    assert!(e.message.starts_with("invalid YAML"), "{e}");
}

#[test]
fn dotenv_beside_the_file_is_read_and_the_environment_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("docker-compose.yml"),
        "services:\n  a:\n    image: ${IMG}\n    environment:\n      N: ${N:-1}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join(".env"), "IMG=from-dotenv\nN=2\n").expect("write");
    let p = load(
        &dir.path().join("docker-compose.yml"),
        &env(&[("N", "3")]),
        None,
    )
    .expect("loads");
    assert_eq!(p.services["a"].image, "from-dotenv");
    assert_eq!(p.services["a"].environment["N"], "3");
}

#[test]
fn durations_parse_like_compose() {
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
    assert!(parse_duration("soon").is_err());
}

#[test]
fn the_postgres_profile_adds_an_unpublished_non_root_store_and_results_default_to_redis() {
    let p = load(&the_file(), &env(&[]), None).expect("loads");
    assert!(!p.services.contains_key("postgres"));
    assert!(!p.volumes.contains_key("postgres-data"));
    for name in ["web", "worker", "beat"] {
        let e = &p.services[name].environment;
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND"], "redis://redis:6379/0",
            "{name}"
        );
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND_PASSWORD_FILE"], "/run/secrets/redis_password",
            "{name}"
        );
        assert!(
            p.services[name]
                .secrets
                .iter()
                .any(|s| s == "postgres_password"),
            "{name}"
        );
    }

    let mut vars = env(&[("COMPOSE_PROFILES", "postgres")]);
    crate::postgres::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads with the profile");
    let pg = &p.services["postgres"];
    assert_eq!(pg.image, "localhost/taskstack-postgres:local");
    assert_eq!(pg.user.as_deref(), Some("999:999"));
    assert!(pg.ports.is_empty(), "never published");
    assert_eq!(pg.networks, ["backend"]);
    assert_eq!(pg.secrets, ["postgres_password"]);
    assert!(pg.read_only && pg.init);
    assert_eq!(pg.cap_drop, ["ALL"]);
    assert_eq!(pg.volume_mounts[0].volume, "postgres-data");
    assert_eq!(pg.volume_mounts[0].target, "/var/lib/postgresql");
    let check = pg.healthcheck.as_ref().expect("a healthcheck");
    assert_eq!(
        check.test[0], "CMD",
        "exec form: the image has no shell for CMD-SHELL"
    );
    assert_eq!(check.test[1], "pg_isready");
    for name in ["web", "worker", "beat"] {
        let e = &p.services[name].environment;
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND"], "postgresql://taskstack@postgres:5432/taskstack",
            "{name}"
        );
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND_PASSWORD_FILE"], "/run/secrets/postgres_password",
            "{name}"
        );
        assert_eq!(
            p.services[name].depends_on.get("postgres"),
            Some(&Condition::Healthy),
            "{name} starts once the store its URL names is healthy"
        );
    }
}

#[test]
fn the_rabbitmq_profile_adds_an_unpublished_non_root_broker_and_results_stay_on_redis() {
    let p = load(&the_file(), &env(&[]), None).expect("loads");
    assert!(!p.services.contains_key("rabbitmq"));
    assert_eq!(
        p.services["web"].depends_on.keys().collect::<Vec<_>>(),
        ["beat", "redis"],
        "nothing added for a store that is not there"
    );
    assert!(!p.volumes.contains_key("rabbitmq-data"));
    for name in ["web", "worker", "beat"] {
        let svc = &p.services[name];
        assert_eq!(
            svc.environment["TASKSTACK_BROKER_URL"], "redis://redis:6379/0",
            "{name}"
        );
        assert_eq!(
            svc.environment["TASKSTACK_BROKER_PASSWORD_FILE"], "/run/secrets/redis_password",
            "{name}"
        );
        assert!(
            svc.secrets.iter().any(|s| s == "rabbitmq_password"),
            "{name}"
        );
    }

    let mut vars = env(&[("COMPOSE_PROFILES", "rabbitmq")]);
    crate::rabbitmq::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads with the profile");
    let mq = &p.services["rabbitmq"];
    assert_eq!(mq.image, "localhost/taskstack-rabbitmq:local");
    assert_eq!(mq.user.as_deref(), Some("999:999"));
    assert!(mq.ports.is_empty(), "never published");
    assert_eq!(mq.networks, ["backend"]);
    assert_eq!(mq.secrets, ["rabbitmq_password"]);
    assert_eq!(
        mq.environment["RABBITMQ_PASSWORD_FILE"],
        "/run/secrets/rabbitmq_password"
    );
    assert!(mq.read_only && mq.init);
    assert_eq!(mq.tmpfs, ["/tmp"], "the definitions file is written there");
    assert_eq!(mq.cap_drop, ["ALL"]);
    assert_eq!(mq.volume_mounts[0].volume, "rabbitmq-data");
    assert_eq!(mq.volume_mounts[0].target, "/var/lib/rabbitmq");
    let check = mq.healthcheck.as_ref().expect("a healthcheck");
    assert_eq!(
        check.test,
        [
            "CMD",
            "rabbitmq-diagnostics",
            "-q",
            "check_port_connectivity"
        ],
        "exec form"
    );
    assert_eq!(check.interval, Some(Duration::from_secs(10)));
    for name in ["web", "worker", "beat"] {
        let e = &p.services[name].environment;
        assert_eq!(
            e["TASKSTACK_BROKER_URL"], "amqp://taskstack@rabbitmq:5672/%2F",
            "{name}"
        );
        assert_eq!(
            e["TASKSTACK_BROKER_PASSWORD_FILE"], "/run/secrets/rabbitmq_password",
            "{name}"
        );
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND"], "redis://redis:6379/0",
            "{name}"
        );
        assert_eq!(
            p.services[name].depends_on.get("rabbitmq"),
            Some(&Condition::Healthy),
            "{name} starts once the broker its URL names is healthy"
        );
    }
}

#[test]
fn with_rabbitmq_and_postgres_redis_is_not_started() {
    // Both profiles: every service's broker is RabbitMQ and its results
    // are in PostgreSQL, so nothing needs the Redis service.
    let mut vars = env(&[("COMPOSE_PROFILES", "rabbitmq,postgres")]);
    crate::postgres::profile_env(&mut vars, &the_file());
    crate::rabbitmq::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads with both profiles");
    assert!(!p.services.contains_key("redis"), "{:?}", p.services.keys());
    assert!(!p.volumes.contains_key("redis-data"));
    assert!(p.skipped["redis"].contains("no service keeps anything on Redis"));
    for name in ["web", "worker", "beat"] {
        let deps: Vec<&String> = p.services[name].depends_on.keys().collect();
        assert!(!deps.iter().any(|d| *d == "redis"), "{name}: {deps:?}");
        for store in ["rabbitmq", "postgres"] {
            assert_eq!(
                p.services[name].depends_on.get(store),
                Some(&Condition::Healthy),
                "{name} waits for {store}"
            );
        }
    }
    p.start_order().expect("an order without Redis");

    // Results on Redis (the user's RESULT_BACKEND): Redis starts.
    let mut vars = env(&[
        ("COMPOSE_PROFILES", "rabbitmq,postgres"),
        ("RESULT_BACKEND", "redis://redis:6379/0"),
    ]);
    crate::postgres::profile_env(&mut vars, &the_file());
    crate::rabbitmq::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads");
    assert!(p.services.contains_key("redis"));
    assert!(p.skipped.is_empty());
    // Without the profiles nothing is skipped.
    let p = load(&the_file(), &env(&[]), None).expect("loads");
    assert!(p.services.contains_key("redis") && p.skipped.is_empty());
    // With the `ha` profile too, its replica and sentinels need Redis.
    let mut vars = env(&[
        ("COMPOSE_PROFILES", "rabbitmq,postgres,ha"),
        ("BROKER_URL", "amqp://taskstack@rabbitmq:5672/%2F"),
        (
            "RESULT_BACKEND",
            "postgresql://taskstack@postgres:5432/taskstack",
        ),
    ]);
    crate::ha::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads");
    assert!(p.services.contains_key("redis") && p.skipped.is_empty());
}

#[test]
fn the_ha_profile_adds_a_replica_and_three_sentinels_the_services_reach_the_master_through() {
    let p = load(&the_file(), &env(&[]), None).expect("loads");
    assert!(!p.services.contains_key("redis-replica"));
    assert!(!p.volumes.contains_key("redis-replica-data"));
    let redis = &p.services["redis"];
    assert_eq!(
        redis
            .command
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str),
        Some("redis-server"),
        "without the profile Redis starts as before"
    );
    for name in ["web", "worker", "beat"] {
        assert_eq!(
            p.services[name].environment["TASKSTACK_SENTINEL_PASSWORD_FILE"], "",
            "{name}: empty is none"
        );
    }

    let mut vars = env(&[("COMPOSE_PROFILES", "ha")]);
    crate::ha::profile_env(&mut vars, &the_file());
    let p = load(&the_file(), &vars, None).expect("loads with the profile");
    let node_sh = "/usr/local/etc/redis/ha/node.sh";
    for name in ["redis", "redis-replica"] {
        let svc = &p.services[name];
        assert_eq!(
            svc.command
                .as_ref()
                .and_then(|c| c.first())
                .map(String::as_str),
            Some(node_sh),
            "{name}"
        );
        assert_eq!(svc.environment["REDIS_NODE"], name);
        assert!(
            svc.binds
                .iter()
                .any(|b| b.target == "/usr/local/etc/redis/ha"
                    && b.read_only
                    && b.source.ends_with("compose/redis-ha"))
        );
        assert_eq!(svc.secrets, ["redis_acl", "redis_password"], "{name}");
    }
    assert_eq!(
        p.services["redis-replica"].volume_mounts[0].volume,
        "redis-replica-data"
    );
    for name in crate::ha::SENTINELS {
        let s = &p.services[name];
        assert_eq!(s.environment["SENTINEL_NAME"], name);
        assert_eq!(s.environment["REDIS_MASTER_NAME"], crate::ha::MASTER_NAME);
        assert_eq!(s.user.as_deref(), Some("999:1000"));
        assert!(s.ports.is_empty(), "never published");
        assert_eq!(s.networks, ["backend"]);
        assert!(s.read_only && s.init);
        assert_eq!(
            s.tmpfs,
            ["/tmp"],
            "the sentinel's configuration is written there"
        );
        assert_eq!(s.cap_drop, ["ALL"]);
        assert_eq!(s.secrets, ["redis_password"]);
        let check = s.healthcheck.as_ref().expect("a healthcheck");
        assert_eq!(
            check.test,
            ["CMD", "/usr/local/etc/redis/ha/sentinel.sh", "health"]
        );
        assert_eq!(
            s.depends_on.get("redis"),
            Some(&Condition::Healthy),
            "{name}: the master is there to monitor"
        );
    }
    for name in ["web", "worker", "beat"] {
        let svc = &p.services[name];
        let e = &svc.environment;
        assert_eq!(e["TASKSTACK_BROKER_URL"], crate::ha::SENTINEL_URL, "{name}");
        assert_eq!(
            e["TASKSTACK_RESULT_BACKEND"],
            crate::ha::SENTINEL_URL,
            "{name}"
        );
        assert_eq!(
            e["TASKSTACK_SENTINEL_PASSWORD_FILE"], "/run/secrets/redis_password",
            "{name}"
        );
        assert_eq!(
            svc.depends_on.get("sentinel-1"),
            Some(&Condition::Healthy),
            "{name} starts once the first sentinel its URL names is healthy"
        );
    }
}
