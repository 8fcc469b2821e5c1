//! A program that only sends tasks and reads results builds the library
//! with `default-features = false`; it must not pull in the service
//! binaries' dependencies (HTTP server, metrics, cron, log formatting).

use std::process::Command;

/// The library's normal dependencies for a feature selection, by name.
fn dependencies(features: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "tree",
        "--offline",
        "--locked",
        "-e",
        "normal",
        "--prefix",
        "none",
    ])
    .args(["--format", "{p}", "-p", "taskstack"])
    .arg("--manifest-path")
    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
    .args(features);
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

const SERVICE_ONLY: [&str; 5] = [
    "axum",
    "prometheus-client",
    "cron",
    "tracing-subscriber",
    "chrono-tz",
];

#[test]
fn the_producer_build_leaves_out_the_service_dependencies() {
    let producer = dependencies(&["--no-default-features"]);
    assert!(
        producer.iter().any(|d| d == "redis"),
        "sanity: {producer:?}"
    );
    for dep in SERVICE_ONLY {
        assert!(
            !producer.iter().any(|d| d == dep),
            "{dep} is built for a producer-only program"
        );
    }
    // The default build (the binaries) still has every one of them.
    let full = dependencies(&[]);
    for dep in SERVICE_ONLY {
        assert!(full.iter().any(|d| d == dep), "{dep} missing by default");
    }
}
