//! `stackctl status`, `logs` and `down`: reading and removing a project's
//! containers, networks and volumes by Compose's project label (so they
//! work on what `docker-compose` made too).

use crate::engine::{ContainerInfo, Engine};
use crate::error::StackError;
use crate::plan::{labels, project_label};
use std::time::Duration;

/// One row of `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub service: String,
    pub container: String,
    pub state: String,
    pub health: String,
    /// Since the last start, while running ("-" otherwise).
    pub uptime: String,
    pub restarts: i64,
}

/// The project's containers, ordered by service and number.
pub async fn status<E: Engine>(engine: &E, project: &str) -> Result<Vec<Row>, StackError> {
    let mut rows = Vec::new();
    for c in engine.list_containers(&project_label(project)).await? {
        let info = engine.inspect_container(&c.id).await?;
        rows.push(row(&info, chrono::Utc::now()));
    }
    rows.sort_by(|a, b| {
        (&a.service, natural(&a.container)).cmp(&(&b.service, natural(&b.container)))
    });
    Ok(rows)
}

fn natural(name: &str) -> (usize, String) {
    let n = name
        .rsplit('_')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (n, name.to_owned())
}

fn row(c: &ContainerInfo, now: chrono::DateTime<chrono::Utc>) -> Row {
    let uptime = c
        .started_at
        .as_deref()
        .filter(|_| c.running)
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or_else(
            || "-".to_owned(),
            |t| human(now.signed_duration_since(t).to_std().unwrap_or_default()),
        );
    let state = if c.running || c.exit_code.is_none() {
        c.state.clone()
    } else {
        format!("{} ({})", c.state, c.exit_code.unwrap_or_default())
    };
    Row {
        service: c.label(labels::SERVICE).unwrap_or("?").to_owned(),
        container: c.name.clone(),
        state,
        health: c.health.to_string(),
        uptime,
        restarts: c.restart_count,
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The rows as an aligned table with a header.
pub fn render(rows: &[Row]) -> String {
    let head = [
        "SERVICE",
        "CONTAINER",
        "STATE",
        "HEALTH",
        "UPTIME",
        "RESTARTS",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.service.clone(),
                r.container.clone(),
                r.state.clone(),
                r.health.clone(),
                r.uptime.clone(),
                r.restarts.to_string(),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            w[i] = w[i].max(v.len());
        }
    }
    let line = |c: [&str; 6]| {
        let mut s = String::new();
        for (i, v) in c.iter().enumerate() {
            if i == 5 {
                s.push_str(v);
            } else {
                s.push_str(&format!("{v:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(head);
    for c in &cells {
        out.push_str(&line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]]));
    }
    out
}

/// Prints the logs of `service`'s containers to `out` (each line prefixed
/// with the container's name when there are several), following them with
/// `follow` until they stop.
pub async fn logs<E: Engine>(
    engine: &E,
    project: &str,
    service: &str,
    tail: Option<usize>,
    follow: bool,
    out: &(dyn Fn(&str) + Sync),
) -> Result<(), StackError> {
    let label = format!("{}={service}", labels::SERVICE);
    let mut containers: Vec<_> = engine
        .list_containers(&project_label(project))
        .await?
        .into_iter()
        .filter(|c| c.labels.get(labels::SERVICE).is_some_and(|s| s == service))
        .collect();
    if containers.is_empty() {
        return Err(StackError::NotUp {
            service: service.to_owned(),
            project: format!("{project} (no container labelled {label})"),
        });
    }
    containers.sort_by_key(|c| natural(&c.name));
    let many = containers.len() > 1;
    let width = containers.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let results = futures_util::future::join_all(containers.iter().map(|c| {
        let prefix = if many {
            format!("{:<width$} | ", c.name)
        } else {
            String::new()
        };
        async move {
            let mut emit = |l: &str| out(&format!("{prefix}{l}"));
            engine.logs(&c.id, tail, follow, &mut emit).await
        }
    }))
    .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub volumes: Vec<String>,
}

/// Stops and removes every container of `project` (each with its own stop
/// grace period), then its networks and, with `volumes`, its volumes.
pub async fn down<E: Engine>(
    engine: &E,
    project: &str,
    volumes: bool,
) -> Result<DownReport, StackError> {
    let label = project_label(project);
    let mut report = DownReport::default();
    let containers = engine.list_containers(&label).await?;
    let stops = futures_util::future::join_all(containers.iter().map(|c| async move {
        engine.stop_container(&c.id, None).await?;
        engine.remove_container(&c.id).await
    }))
    .await;
    for (c, r) in containers.iter().zip(stops) {
        match r {
            Ok(()) => report.containers.push(c.name.clone()),
            // Already gone (removed meanwhile): fine.
            Err(e) if e.status == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for n in engine.list_networks(&label).await? {
        engine.remove_network(&n.name).await?;
        report.networks.push(n.name);
    }
    if volumes {
        for v in engine.list_volumes(&label).await? {
            engine.remove_volume(&v.name).await?;
            report.volumes.push(v.name);
        }
    }
    report.containers.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::Fake;
    use crate::progress::Recorder;
    use crate::up::{UpOptions, up};
    use std::sync::Mutex;

    #[tokio::test]
    async fn status_logs_and_down_work_by_project_label() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = crate::up::tests::shipped(dir.path(), &[]);
        let engine = Fake::with_images(&[crate::up::tests::APP, crate::up::tests::REDIS]);
        let opts = UpOptions {
            poll: Duration::from_millis(1),
            ..UpOptions::default()
        };
        up(&engine, &p, &opts, &mut Recorder::default())
            .await
            .expect("up");

        let rows = status(&engine, "proj").await.expect("status");
        assert_eq!(
            rows.iter()
                .map(|r| r.container.as_str())
                .collect::<Vec<_>>(),
            [
                "proj_beat_1",
                "proj_redis_1",
                "proj_web_1",
                "proj_worker_1",
                "proj_worker_2"
            ]
        );
        let table = render(&rows);
        assert!(table.starts_with("SERVICE  CONTAINER"), "{table}");
        let web = table
            .lines()
            .find(|l| l.contains("proj_web_1"))
            .expect("web row");
        assert_eq!(
            web.split_whitespace().collect::<Vec<_>>()[..4],
            ["web", "proj_web_1", "running", "healthy"]
        );

        engine.set_logs("proj_worker_1", &["a", "b", "c"]);
        engine.set_logs("proj_worker_2", &["d"]);
        let lines = Mutex::new(Vec::new());
        let sink = |l: &str| lines.lock().expect("lock").push(l.to_owned());
        logs(&engine, "proj", "worker", Some(2), false, &sink)
            .await
            .expect("logs");
        assert_eq!(
            lines.into_inner().expect("lock"),
            [
                "proj_worker_1 | b",
                "proj_worker_1 | c",
                "proj_worker_2 | d"
            ]
        );
        assert!(
            logs(&engine, "proj", "nope", None, false, &|_| {})
                .await
                .is_err()
        );

        let r = down(&engine, "proj", false).await.expect("down");
        assert_eq!(r.containers.len(), 5);
        assert_eq!(r.networks.len(), 2);
        assert!(r.volumes.is_empty());
        assert_eq!(
            engine.resources().1,
            ["proj_redis-data"],
            "the volume stays without -v"
        );
        let r = down(&engine, "proj", true).await.expect("down -v");
        assert_eq!(r.volumes, ["proj_redis-data"]);
        assert_eq!(engine.resources(), (vec![], vec![]));
        assert!(engine.containers().is_empty());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
        assert_eq!(human(Duration::from_secs(90_000)), "1d01h");
    }
}
