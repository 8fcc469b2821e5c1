//! The monitoring profile (`compose/monitoring/`): the alert rules pass
//! their promtool unit tests, the Prometheus configuration is valid, and a
//! real Prometheus (Debian's package, on loopback) scraping real web,
//! worker and beat processes finds every metric the alert rules and the
//! Grafana dashboard use — so neither can reference a metric that does not
//! exist.

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use taskstack_integration::http::request;
use taskstack_integration::{
    BeatProcess, Prereq, RedisServer, WebProcess, WorkerProcess, free_port, namespace, require,
    wait_until,
};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/monitoring")
}

fn tool(name: &'static str) -> Result<Command> {
    require(Prereq::Program {
        name,
        package: "prometheus",
    });
    Ok(Command::new(name))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed:\n{text}");
    Ok(text)
}

/// Every `taskstack_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("taskstack_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_owned());
        i = end;
    }
    names
}

#[test]
fn alert_rules_pass_their_unit_tests_and_the_config_is_valid() -> Result<()> {
    let dir = monitoring_dir();
    run_ok(
        tool("promtool")?
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]),
    )?;
    let out =
        run_ok(
            tool("promtool")?
                .current_dir(&dir)
                .args(["test", "rules", "alerts_test.yml"]),
        )?;
    assert!(out.contains("SUCCESS"), "{out}");
    // Every rule has a test.
    let rules = std::fs::read_to_string(dir.join("alerts.yml"))?;
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml"))?;
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "alert {line} has no unit test in alerts_test.yml"
        );
    }
    // The shipped Prometheus configuration, with its rule file beside it.
    let tmp = tempfile::tempdir()?;
    std::fs::copy(dir.join("alerts.yml"), tmp.path().join("alerts.yml"))?;
    let config = std::fs::read_to_string(dir.join("prometheus.yml"))?
        .replace("/etc/prometheus/alerts.yml", "alerts.yml");
    std::fs::write(tmp.path().join("prometheus.yml"), config)?;
    run_ok(
        tool("promtool")?
            .current_dir(tmp.path())
            .args(["check", "config", "prometheus.yml"]),
    )?;
    Ok(())
}

#[test]
fn the_dashboard_uses_the_provisioned_datasource() -> Result<()> {
    let dir = monitoring_dir().join("grafana");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("dashboards/taskstack.json"),
    )?)?;
    let source = std::fs::read_to_string(dir.join("provisioning/datasources/prometheus.yml"))?;
    let panels = dash["panels"].as_array().context("no panels")?;
    ensure!(!panels.is_empty());
    for p in panels {
        let uid = p["datasource"]["uid"]
            .as_str()
            .context("panel without datasource")?;
        assert!(
            source.contains(&format!("uid: {uid}")),
            "panel {} uses {uid}",
            p["title"]
        );
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{}",
            p["title"]
        );
    }
    Ok(())
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(targets: &[(&str, &str)]) -> Result<Prometheus> {
    let dir = tempfile::tempdir()?;
    let jobs: Vec<String> = targets
        .iter()
        .map(|(job, addr)| {
            format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"{addr}\"]\n")
        })
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{}",
        jobs.concat()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config)?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let child = tool("prometheus")?
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
        .spawn()
        .context("cannot start prometheus")?;
    Ok(Prometheus {
        child,
        addr,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_finds_every_metric_the_rules_and_dashboard_use() -> Result<()> {
    let dir = monitoring_dir();
    let mut wanted = metric_names(&std::fs::read_to_string(dir.join("alerts.yml"))?);
    wanted.extend(metric_names(&std::fs::read_to_string(
        dir.join("grafana/dashboards/taskstack.json"),
    )?));
    ensure!(wanted.len() > 10, "too few metric names found: {wanted:?}");

    let redis = RedisServer::start()?;
    let ns = namespace("monitoring");
    let worker_addr = format!("127.0.0.1:{}", free_port()?);
    let beat_addr = format!("127.0.0.1:{}", free_port()?);
    let _worker = WorkerProcess::spawn(
        &redis.url(),
        &ns,
        &[("TASKSTACK_WORKER_METRICS_LISTEN", &worker_addr)],
    )?;
    let schedule = "[[schedule]]\nname = \"tick\"\ntask = \"taskstack.echo\"\nevery = \"1s\"\n";
    let _beat = BeatProcess::spawn(
        &redis.url(),
        &ns,
        schedule,
        &[("TASKSTACK_BEAT_METRICS_LISTEN", &beat_addr)],
    )?;
    let web = WebProcess::spawn(&redis.url(), &ns, &[]).await?;
    let prom = start_prometheus(&[
        ("taskstack-web", &web.addr),
        ("taskstack-worker", &worker_addr),
        ("taskstack-beat", &beat_addr),
    ])?;

    // Work of every kind: successes, failures, a dead letter, a revocation.
    wait_until(
        "the worker to announce its tasks",
        Duration::from_secs(30),
        || async {
            let (s, _) = web
                .call(
                    "POST",
                    "/api/v1/tasks",
                    Some(&json!({"task": "taskstack.add", "args": [1, 2]})),
                )
                .await?;
            Ok((s == 202).then_some(()))
        },
    )
    .await?;
    web.call(
        "POST",
        "/api/v1/tasks",
        Some(&json!({"task": "taskstack.fail", "args": ["x"]})),
    )
    .await?;
    let mut c = redis.conn()?;
    redis::cmd("LPUSH")
        .arg("celery")
        .arg("not a message")
        .query::<()>(&mut c)?;

    let scraped = || async {
        let (s, v) = request(
            &prom.addr,
            "GET",
            "/api/v1/label/__name__/values",
            None,
            None,
        )
        .await
        .unwrap_or((0, Value::Null));
        let have: BTreeSet<String> = v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        (s == 200).then_some(have)
    };
    let waited = wait_until(
        "Prometheus to have scraped every metric the rules and dashboard use",
        Duration::from_secs(60),
        || async { Ok(scraped().await.filter(|have| wanted.is_subset(have))) },
    )
    .await;
    let names = match waited {
        Ok(names) => names,
        Err(e) => {
            let have = scraped().await.unwrap_or_default();
            let missing: Vec<&String> = wanted.difference(&have).collect();
            bail!("{e:#}; never exported: {missing:?}");
        }
    };
    let (_, targets) = request(&prom.addr, "GET", "/api/v1/targets", None, None).await?;
    for t in targets["data"]["activeTargets"]
        .as_array()
        .context("no targets")?
    {
        assert_eq!(t["health"], "up", "{t}");
    }
    eprintln!(
        "{} taskstack metrics scraped; the rules and dashboard use {}",
        names.iter().filter(|n| n.starts_with("taskstack_")).count(),
        wanted.len()
    );
    Ok(())
}
