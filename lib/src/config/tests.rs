use super::*;
use figment::Figment;
use figment::providers::{Format as _, Serialized};

fn with(pairs: &[(&str, Value)]) -> Result<Config, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    for (k, v) in pairs {
        fig = fig.merge(Serialized::default(k, v));
    }
    Config::from_figment(fig)
}

fn err(pairs: &[(&str, Value)]) -> String {
    with(pairs).expect_err("should be refused").to_string()
}

#[test]
fn defaults_are_valid() {
    let c = with(&[]).expect("defaults");
    assert_eq!(c.queues, ["celery"]);
    assert_eq!(c.result_expires, Duration::from_secs(3600));
    assert_eq!(c.lease, Duration::from_secs(30));
    assert_eq!(c.concurrency.get(), 64);
    assert_eq!(c.effective_prefetch(), 256);
    assert_eq!(
        c.backend_target().expect("backend").url(),
        c.broker_target().expect("broker").url()
    );
}

#[test]
fn environment_style_strings_are_accepted() {
    let c = with(&[
        ("queues", json!("a, b,,c")),
        ("lease", json!("2s")),
        ("drain_timeout", json!("1500ms")),
        ("result_expires", json!(60)),
        ("allow_root", json!("1")),
        ("concurrency", json!(3)),
    ])
    .expect("valid");
    assert_eq!(c.queues, ["a", "b", "c"]);
    assert_eq!(c.lease, Duration::from_secs(2));
    assert_eq!(c.drain_timeout, Duration::from_millis(1500));
    assert_eq!(c.result_expires, Duration::from_secs(60));
    assert!(c.allow_root);
    assert_eq!(c.effective_prefetch(), 12);
}

#[test]
fn bad_values_name_the_key_and_value() {
    let e = err(&[("broker_url", json!("http://x:1/0"))]);
    assert!(
        e.contains("broker_url") && e.contains("http://x:1/0"),
        "{e}"
    );
    let e = err(&[("concurrency", json!(0))]);
    assert!(e.contains("concurrency") && e.contains('0'), "{e}");
    let e = err(&[("lease", json!("soon"))]);
    assert!(e.contains("lease") && e.contains("soon"), "{e}");
    let e = err(&[("lease", json!("10ms"))]);
    assert!(e.contains("lease") && e.contains("10ms"), "{e}");
    let e = err(&[("queues", json!(""))]);
    assert!(e.contains("queues"), "{e}");
    let e = err(&[("concurrency", json!(8)), ("prefetch", json!(2))]);
    assert!(e.contains("prefetch") && e.contains('2'), "{e}");
    let e = err(&[("allow_root", json!("maybe"))]);
    assert!(e.contains("allow_root") && e.contains("maybe"), "{e}");
    let e = err(&[("log_format", json!("xml"))]);
    assert!(e.contains("log_format") && e.contains("xml"), "{e}");
    let e = err(&[("broker_url", json!("redis://h:1/abc"))]);
    assert!(e.contains("database number"), "{e}");
}

#[test]
fn runtime_threads_are_auto_or_a_positive_count_and_name_a_bad_one() {
    let fixed = |n: usize| RuntimeThreads::Fixed(NonZeroUsize::new(n).expect("n > 0"));
    let of = |c: &Config, key: &str| match key {
        "web_threads" => c.web_threads,
        _ => c.worker_runtime_threads,
    };
    for key in ["worker_runtime_threads", "web_threads"] {
        assert_eq!(of(&with(&[]).expect("defaults"), key), RuntimeThreads::Auto);
        for (v, want) in [
            (json!("auto"), RuntimeThreads::Auto),
            (json!(" AUTO "), RuntimeThreads::Auto),
            (json!(2), fixed(2)),
            (json!("3"), fixed(3)),
        ] {
            let c = with(&[(key, v.clone())]).expect("valid");
            assert_eq!(of(&c, key), want, "{key} = {v}");
        }
        let c = from_toml(&format!("{key} = 4\n")).expect("toml");
        assert_eq!(of(&c, key), fixed(4));
        assert_eq!(
            with(&[(key, json!(2))]).expect("valid").redacted()[key],
            json!(2)
        );
        assert_eq!(with(&[]).expect("defaults").redacted()[key], json!("auto"));
        for bad in [json!(0), json!("0"), json!(-1), json!("many"), json!(1.5)] {
            let e = err(&[(key, bad.clone())]);
            assert!(e.contains(key), "{key} = {bad}: {e}");
        }
    }
    let c = with(&[("web_threads", json!(3))]).expect("valid");
    assert_eq!(c.web_thread_count().expect("a count"), 3);
    if std::env::var_os(TOKIO_WORKER_THREADS).is_none() {
        let c = with(&[]).expect("defaults");
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(c.web_thread_count().expect("a count"), cpus);
    }
}

#[test]
fn unknown_keys_are_refused() {
    let e = err(&[("concurency", json!(4))]);
    assert!(e.contains("concurency"), "{e}");
}

#[test]
fn password_file_wins_and_is_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("pw");
    std::fs::write(&f, "s3cret\n").expect("write");
    let c = with(&[
        ("broker_url", json!("redis://:old@redis:6379/2")),
        ("broker_password_file", json!(f)),
    ])
    .expect("valid");
    let t = c.broker_target().expect("target");
    assert_eq!(t.url(), "redis://:s3cret@redis:6379/2");
    assert!(!format!("{t:?}").contains("s3cret"));
    let shown = c.redacted().to_string();
    assert!(
        !shown.contains("old") && !shown.contains("s3cret"),
        "{shown}"
    );

    let c = with(&[("broker_password_file", json!(dir.path().join("missing")))])
        .expect("loads; the file is read when connecting");
    let e = c.broker_target().expect_err("missing file").to_string();
    assert!(
        e.contains("broker_password_file") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn result_backend_can_differ() {
    let c = with(&[
        ("result_backend", json!("rediss://u:p@other:6380/1")),
        ("result_backend_password", json!("q")),
    ])
    .expect("valid");
    assert_eq!(
        c.backend_target().expect("target").url(),
        "rediss://u:q@other:6380/1"
    );
}

fn from_toml(toml: &str) -> Result<Config, ConfigError> {
    let fig = Figment::from(Serialized::defaults(Config::default()))
        .merge(figment::providers::Toml::string(toml));
    Config::from_figment(fig)
}

const ENTRY: &str = "[[schedule]]\nname = \"nightly\"\ntask = \"proj.report\"\n";

#[test]
fn schedule_entries_load_with_defaults() {
    let c = from_toml(&format!(
        "beat_lock_ttl = \"3s\"\n{ENTRY}cron = \"30 2 * * *\"\ntimezone = \"America/New_York\"\n\
         [[schedule]]\nname = \"tick\"\ntask = \"proj.tick\"\nevery = \"30s\"\nargs = [1, \"a\"]\n\
         kwargs = {{ k = true }}\nqueue = \"periodic\"\nenabled = false\nexpires = \"1m\"\n"
    ))
    .expect("valid");
    assert_eq!(c.beat_lock_ttl, Duration::from_secs(3));
    assert_eq!(c.beat_missed_grace, Duration::from_secs(300));
    assert_eq!(
        c.beat_metrics_addr().expect("addr"),
        Some("0.0.0.0:9102".parse().expect("addr"))
    );
    let [nightly, tick] = c.schedule.as_slice() else {
        panic!("two entries: {:?}", c.schedule);
    };
    assert_eq!(nightly.queue, "celery");
    assert!(nightly.enabled);
    assert_eq!(nightly.every, None);
    assert_eq!(tick.every, Some(Duration::from_secs(30)));
    assert_eq!(tick.args, vec![json!(1), json!("a")]);
    assert_eq!(tick.kwargs.get("k"), Some(&json!(true)));
    assert!(!tick.enabled);
    assert_eq!(tick.expires, Some(Duration::from_secs(60)));
    // The effective configuration shows them, and reads back the same.
    let shown = c.redacted();
    assert_eq!(shown["schedule"][1]["every"], "30s");
    let again = with(&[("schedule", shown["schedule"].clone())]).expect("round trip");
    assert_eq!(again.schedule, c.schedule);
}

// Entries are compiled by the beat: without it there is nothing to check them with.
#[cfg(feature = "beat")]
#[test]
fn bad_schedule_entries_name_the_entry_and_the_field() {
    let cases = [
        (
            format!("{ENTRY}cron = \"61 * * * *\"\n"),
            "`nightly`",
            "cron",
        ),
        (
            format!("{ENTRY}cron = \"0 3 * * *\"\ntimezone = \"Mars/Base\"\n"),
            "`nightly`",
            "timezone",
        ),
        (ENTRY.to_owned(), "`nightly`", "cron"),
        (
            format!("{ENTRY}cron = \"0 3 * * *\"\nevery = \"1m\"\n"),
            "`nightly`",
            "cron",
        ),
        (
            "[[schedule]]\nname = \"nightly\"\nevery = \"1m\"\n".to_owned(),
            "`nightly`",
            "task",
        ),
        (
            format!("{ENTRY}every = \"1m\"\n{ENTRY}every = \"2m\"\n"),
            "`nightly`",
            "name",
        ),
        (format!("{ENTRY}every = \"soon\"\n"), "`nightly`", "every"),
        (
            format!("{ENTRY}every = \"1m\"\ncrn = \"x\"\n"),
            "`nightly`",
            "crn",
        ),
        (
            format!("{ENTRY}every = \"1m\"\nargs = 5\n"),
            "`nightly`",
            "args",
        ),
        (
            "[[schedule]]\ntask = \"t\"\nevery = \"1m\"\n".to_owned(),
            "schedule[0]",
            "name",
        ),
    ];
    for (toml, entry, field) in cases {
        let e = from_toml(&toml).expect_err(&toml).to_string();
        assert!(
            e.contains(&format!("schedule entry {entry}"))
                && e.contains(&format!("field `{field}`")),
            "{toml}\n=> {e}"
        );
    }
}

#[test]
fn bad_beat_settings_name_the_key() {
    let e = err(&[("beat_lock_ttl", json!("100ms"))]);
    assert!(e.contains("beat_lock_ttl") && e.contains("100ms"), "{e}");
    let e = err(&[("beat_missed_grace", json!("0s"))]);
    assert!(e.contains("beat_missed_grace"), "{e}");
    let e = err(&[("beat_metrics_listen", json!("localhost:9102"))]);
    assert!(
        e.contains("beat_metrics_listen") && e.contains("localhost:9102"),
        "{e}"
    );
    let c = with(&[("beat_metrics_listen", json!("off"))]).expect("off is valid");
    assert_eq!(c.beat_metrics_addr().expect("addr"), None);
}

#[test]
fn web_keys_parse_and_tokens_are_required_and_redacted() {
    let c = with(&[
        ("web_listen", json!("127.0.0.1:9000")),
        (
            "api_tokens",
            json!("first-token-0123456789, second-token-0123456789"),
        ),
        ("web_body_limit", json!("512KiB")),
        ("web_tasks", json!("a.b, c.d")),
        ("web_expect_beat", json!("yes")),
    ])
    .expect("valid");
    assert_eq!(c.web_addr().expect("addr").port(), 9000);
    assert_eq!(c.web_body_limit, 512 * 1024);
    assert_eq!(c.web_tasks, ["a.b", "c.d"]);
    assert!(c.web_expect_beat);
    assert_eq!(c.load_api_tokens().expect("tokens").len(), 2);
    let shown = c.redacted().to_string();
    assert!(!shown.contains("first-token"), "{shown}");

    let e = with(&[])
        .expect("defaults")
        .load_api_tokens()
        .expect_err("no token");
    assert!(e.to_string().contains("TASKSTACK_API_TOKENS"), "{e}");
    let e = err(&[("api_tokens", json!("short"))]);
    assert!(e.contains("at least 16") && !e.contains("short\""), "{e}");
    let e = err(&[("web_listen", json!("nowhere"))]);
    assert!(e.contains("web_listen"), "{e}");
    let e = err(&[("web_body_limit", json!("12 parsecs"))]);
    assert!(e.contains("web_body_limit"), "{e}");
    let e = err(&[("web_body_limit", json!(10))]);
    assert!(e.contains("at least 1024"), "{e}");
}

#[test]
fn api_tokens_come_from_a_file_with_comments() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("tokens");
    std::fs::write(&path, "# deploy tokens\n\nfile-token-0123456789abcdef\n").expect("write");
    let c = with(&[("api_tokens_file", json!(path))]).expect("valid");
    let tokens = c.load_api_tokens().expect("tokens");
    assert_eq!(
        tokens.iter().map(Secret::expose).collect::<Vec<_>>(),
        ["file-token-0123456789abcdef"]
    );
    std::fs::write(&path, "tiny\n").expect("write");
    let e = c.load_api_tokens().expect_err("too short");
    assert!(e.to_string().contains("api_tokens_file"), "{e}");
    let missing = with(&[("api_tokens_file", json!(dir.path().join("none")))]).expect("valid");
    let e = missing.load_api_tokens().expect_err("missing file");
    assert!(e.to_string().contains("cannot read"), "{e}");
}

#[test]
fn web_connection_limits_parse_and_are_validated() {
    let c = with(&[]).expect("defaults");
    assert_eq!(c.web_header_timeout, Duration::from_secs(10));
    assert_eq!(c.web_idle_timeout, Duration::from_secs(60));
    assert_eq!(c.web_max_connections.get(), 1024);
    let c = with(&[
        ("web_header_timeout", json!("2s")),
        ("web_idle_timeout", json!(30)),
        ("web_max_connections", json!(50)),
    ])
    .expect("valid");
    assert_eq!(c.web_header_timeout, Duration::from_secs(2));
    assert_eq!(c.web_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.web_max_connections.get(), 50);
    let e = err(&[("web_header_timeout", json!("5ms"))]);
    assert!(e.contains("web_header_timeout") && e.contains("5ms"), "{e}");
    let e = err(&[("web_idle_timeout", json!("never"))]);
    assert!(e.contains("web_idle_timeout") && e.contains("never"), "{e}");
    let e = err(&[("web_max_connections", json!(0))]);
    assert!(e.contains("web_max_connections"), "{e}");
}

/// Every secret a configuration can hold, each one distinct.
const SECRETS: [&str; 5] = [
    "url-pass-4f1e",
    "broker-pass-77ab",
    "backend-url-pass-19cd",
    "backend-pass-0e5f",
    "api-token-aaaa-0123456789",
];

fn with_every_secret() -> Config {
    with(&[
        (
            "broker_url",
            json!(format!("redis://app:{}@redis:6379/0", SECRETS[0])),
        ),
        ("broker_password", json!(SECRETS[1])),
        (
            "result_backend",
            json!(format!("rediss://app:{}@other:6380/1", SECRETS[2])),
        ),
        ("result_backend_password", json!(SECRETS[3])),
        ("api_tokens", json!(SECRETS[4])),
    ])
    .expect("valid")
}

#[test]
fn no_secret_shows_in_debug_or_the_printed_configuration() {
    let c = with_every_secret();
    let shown = [
        format!("{c:?}"),
        format!("{c:#?}"),
        c.redacted().to_string(),
        format!("{:#}", c.redacted()),
        toml_like(&c),
        format!("{:?} {:?}", c.broker_target(), c.backend_target()),
    ];
    for text in &shown {
        for s in SECRETS {
            assert!(!text.contains(s), "{s} shown in {text}");
        }
    }
    // What the secrets were replaced by, and the rest still readable.
    let v = c.redacted();
    assert_eq!(v["broker_password"], "***");
    assert_eq!(v["api_tokens"], json!(["***"]));
    assert_eq!(v["broker_url"], "redis://app:***@redis:6379/0");
    assert_eq!(v["result_backend"], "rediss://app:***@other:6380/1");
    // The connections still get them.
    assert_eq!(
        c.broker_target().expect("broker").url(),
        format!("redis://app:{}@redis:6379/0", SECRETS[1])
    );
    assert_eq!(
        c.backend_target().expect("backend").url(),
        format!("rediss://app:{}@other:6380/1", SECRETS[3])
    );
    assert_eq!(c.load_api_tokens().expect("tokens")[0].expose(), SECRETS[4]);
}

/// The configuration through another serializer (figment's own value
/// tree), as a tool printing TOML would.
fn toml_like(c: &Config) -> String {
    format!(
        "{:?}",
        figment::value::Value::serialize(c).expect("serializable")
    )
}

#[test]
fn bad_secret_values_are_refused_without_showing_them() {
    let e = err(&[("api_tokens", json!("short-secret"))]);
    assert!(!e.contains("short-secret"), "{e}");
    let e = err(&[("broker_url", json!("redis://:pw-9f8e7d@/0"))]);
    assert!(e.contains("broker_url") && !e.contains("pw-9f8e7d"), "{e}");
}

#[test]
fn sentinel_urls_and_the_sentinel_password_reach_both_targets() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("sentinel-pw");
    std::fs::write(&file, "s-pw\n").expect("write");
    let c = with(&[
        (
            "broker_url",
            json!("redis+sentinel://:m-pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/1"),
        ),
        (
            "result_backend",
            json!("rediss+sentinel://10.0.0.3/other/2"),
        ),
        ("result_backend_password", json!("r-pw")),
        ("sentinel_password_file", json!(file)),
    ])
    .expect("valid");
    let b = c.broker_target().expect("broker");
    let s = b.sentinel().expect("a sentinel target");
    assert_eq!((s.master_name.as_str(), s.db), ("mymaster", 1));
    assert_eq!(
        s.sentinel_password.as_ref().map(Secret::expose),
        Some("s-pw")
    );
    assert_eq!(s.password.as_ref().map(Secret::expose), Some("m-pw"));
    let r = c.backend_target().expect("backend");
    let s = r.sentinel().expect("a sentinel target");
    assert!(s.tls);
    assert_eq!(
        s.sentinels,
        [("10.0.0.3".to_owned(), DEFAULT_SENTINEL_PORT)]
    );
    assert_eq!(s.password.as_ref().map(Secret::expose), Some("r-pw"));
    assert_eq!(
        s.sentinel_password.as_ref().map(Secret::expose),
        Some("s-pw")
    );
    let shown = c.redacted().to_string();
    for pw in ["m-pw", "r-pw", "s-pw"] {
        assert!(!shown.contains(pw), "{shown}");
    }
    assert!(
        shown.contains("redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26379/mymaster/1"),
        "{shown}"
    );
}

#[test]
fn sentinel_mistakes_name_the_key() {
    let e = err(&[("broker_url", json!("redis+sentinel://:pw@s1:26379"))]);
    assert!(
        e.contains("`broker_url`") && e.contains("must name the master"),
        "{e}"
    );
    assert!(!e.contains(":pw@"), "{e}");
    let e = err(&[("result_backend", json!("redis+sentinel://s1:99999/m"))]);
    assert!(e.contains("`result_backend`") && e.contains("port"), "{e}");
    let e = err(&[("sentinel_password", json!("x"))]);
    assert!(
        e.contains("`sentinel_password`") && e.contains("redis+sentinel://"),
        "{e}"
    );
    // Read when the target is made, like the other password files.
    let c = with(&[
        ("broker_url", json!("redis+sentinel://s1/m")),
        ("sentinel_password_file", json!("/nonexistent/pw")),
    ]);
    let e = c
        .expect("loads")
        .broker_target()
        .expect_err("unreadable")
        .to_string();
    assert!(e.contains("sentinel_password_file"), "{e}");
    // Empty (the compose file's `${SENTINEL_PASSWORD_FILE:-}` without the
    // profile ha) is unset: no error beside a plain URL, no password.
    let c = with(&[
        ("broker_url", json!("redis://r:6379/0")),
        ("sentinel_password_file", json!("")),
    ])
    .expect("an empty sentinel_password_file is unset");
    c.broker_target().expect("a plain target");
    let c = with(&[
        ("broker_url", json!("redis+sentinel://s1/m")),
        ("sentinel_password_file", json!("")),
    ])
    .expect("loads");
    assert!(c.sentinel_secret().expect("no file to read").is_none());
}

#[test]
fn an_amqp_broker_with_postgresql_results_uses_no_redis() {
    let amqp = ("broker_url", Value::from("amqp://guest@127.0.0.1:5672/v"));
    let pg = ("result_backend", Value::from("postgresql://u@127.0.0.1/db"));
    let c = with(&[amqp.clone(), pg.clone()]).expect("valid");
    assert!(!c.uses_redis());
    assert!(c.postgres_target().expect("target").is_some());
    let e = err(&[
        amqp.clone(),
        pg,
        ("redis_min_replicas_acked", Value::from(1)),
    ]);
    assert!(
        e.contains("redis_min_replicas_acked") && e.contains("no Redis is used"),
        "{e}"
    );
    let c = with(&[amqp, ("result_backend", Value::from("redis://127.0.0.1/1"))]).expect("valid");
    assert!(c.uses_redis());
    assert!(Config::load_from(None, &[]).expect("defaults").uses_redis());
}

#[test]
fn an_amqp_broker_needs_a_result_backend_named_in_the_error() {
    let amqp = ("broker_url", Value::from("amqp://guest@127.0.0.1:5672/v"));
    let e = err(std::slice::from_ref(&amqp));
    assert!(
        e.contains("result_backend") && e.contains("redis://"),
        "{e}"
    );
    assert!(e.contains("postgresql://"), "{e}");
    let e = err(&[
        ("broker_url", Value::from("amqp:///v")),
        ("result_backend", Value::from("redis://127.0.0.1/1")),
    ]);
    assert!(e.contains("broker_url") && e.contains("no host"), "{e}");
    let c = with(&[
        amqp,
        ("result_backend", Value::from("redis://127.0.0.1:6380/1")),
        ("broker_password", Value::from("s3cret")),
        ("broker_queue_type", Value::from("quorum")),
    ])
    .expect("valid");
    assert_eq!(c.broker_queue_type, QueueType::Quorum);
    assert_eq!(
        c.amqp_url().expect("url").expect("amqp").expose(),
        "amqp://guest:s3cret@127.0.0.1:5672/v"
    );
    // taskstack's own records go to the result backend's Redis.
    assert_eq!(
        c.broker_target().expect("target").url(),
        c.backend_target().expect("target").url()
    );
    let e = err(&[("broker_queue_type", Value::from("stream"))]);
    assert!(e.contains("broker_queue_type"), "{e}");
}

#[test]
fn rabbitmq_queue_settings_are_checked_and_refused_with_a_redis_broker() {
    let amqp = [
        ("broker_url", Value::from("amqp://guest@127.0.0.1:5672/v")),
        ("result_backend", Value::from("redis://127.0.0.1:6380/1")),
    ];
    let c = with(&[
        amqp[0].clone(),
        amqp[1].clone(),
        ("broker_queue_max_priority", Value::from(10)),
    ])
    .expect("valid");
    assert_eq!(c.broker_queue_max_priority, Some(10));
    let e = err(&[
        amqp[0].clone(),
        amqp[1].clone(),
        ("broker_queue_max_priority", Value::from(0)),
    ]);
    assert!(
        e.contains("broker_queue_max_priority") && e.contains("1..=255"),
        "{e}"
    );
    let e = err(&[
        amqp[0].clone(),
        amqp[1].clone(),
        ("broker_queue_max_priority", Value::from(256)),
    ]);
    assert!(e.contains("broker_queue_max_priority"), "{e}");
    let e = err(&[
        amqp[0].clone(),
        amqp[1].clone(),
        ("broker_queue_type", Value::from("quorum")),
        ("broker_queue_max_priority", Value::from(10)),
    ]);
    assert!(
        e.contains("broker_queue_max_priority") && e.contains("quorum"),
        "{e}"
    );
    // With Redis, a RabbitMQ-only setting would do nothing: refused.
    let e = err(&[("broker_queue_max_priority", Value::from(10))]);
    assert!(
        e.contains("broker_queue_max_priority") && e.contains("RabbitMQ broker"),
        "{e}"
    );
    let e = err(&[("broker_queue_type", Value::from("quorum"))]);
    assert!(
        e.contains("broker_queue_type") && e.contains("RabbitMQ broker"),
        "{e}"
    );
    with(&[("broker_queue_type", Value::from("classic"))]).expect("the default is fine");
}
