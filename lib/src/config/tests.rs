use super::*;
use figment::providers::Serialized;

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
    assert_eq!(c.effective_prefetch(), 64);
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
