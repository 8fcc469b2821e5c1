//! `stackctl verify`: the production checklist of a running stack. Facts
//! are gathered through the engine (inspect; an unauthenticated
//! `redis-cli PING` in the Redis container), through Redis with each
//! service's own configuration ([`config`]) and the library's queries
//! (`store`: what `/health` reads), and through the web API's published
//! port; with a RabbitMQ broker, through `rabbitmqctl` in its container
//! ([`rabbitmq`]); [`checks::evaluate`] turns them into pass/fail with
//! reasons.

pub mod checks;
pub mod config;
pub mod ha;
pub mod rabbitmq;
pub mod results;
mod store;
pub mod swarm;
pub mod swarm_checks;

use crate::compose::Project;
use crate::engine::{ContainerInfo, Engine};
use crate::error::StackError;
use crate::plan::{Role, labels, project_label};
use checks::{Check, Facts, LockHolder, Probe, RedisFacts, ServiceFacts, SmokeFacts};
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;
use taskstack::config::Config;
use taskstack::http_client;

/// How `verify` runs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// More than one beat container is acceptable.
    pub allow_standby_beats: bool,
    /// How long the smoke task may take.
    pub smoke_timeout: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            allow_standby_beats: false,
            smoke_timeout: Duration::from_secs(30),
        }
    }
}

/// The checklist's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub project: String,
    pub ok: bool,
    pub checks: Vec<Check>,
    /// Who holds the beat lock (and in which container), when someone does.
    pub beat_lock_holder: Option<HolderReport>,
}

/// The lock holder with the container it runs in.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HolderReport {
    #[serde(flatten)]
    pub holder: LockHolder,
    pub container: Option<String>,
}

impl VerifyReport {
    /// The checks that failed.
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// The check with id `id`.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// A table for humans.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let w = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        for c in &self.checks {
            s.push_str(&format!(
                "{} {:<w$}  {}\n",
                if c.ok { "PASS" } else { "FAIL" },
                c.id,
                c.reason
            ));
        }
        let failed = self.failed().len();
        s.push_str(&if failed == 0 {
            format!(
                "all {} checks passed (project {})\n",
                self.checks.len(),
                self.project
            )
        } else {
            format!(
                "{failed} of {} checks FAILED (project {})\n",
                self.checks.len(),
                self.project
            )
        });
        s
    }
}

/// Runs the checklist against `project`'s running stack.
pub async fn verify<E: Engine>(
    engine: &E,
    project: &Project,
    opts: &VerifyOptions,
) -> Result<VerifyReport, StackError> {
    let listed = engine
        .list_containers(&project_label(&project.name))
        .await?;
    // A running container of a service the loader left out (Redis, when
    // no service keeps anything on it): plain docker-compose starts it.
    let skipped_running = listed
        .iter()
        .filter(|c| c.state == "running")
        .find(|c| {
            c.label(labels::SERVICE)
                .is_some_and(|s| project.skipped.contains_key(s))
        })
        .map(|c| c.name.clone());
    let mut services = Vec::new();
    for (name, svc) in &project.services {
        let mut containers = Vec::new();
        for c in listed
            .iter()
            .filter(|c| c.label(labels::SERVICE) == Some(name.as_str()))
        {
            containers.push(engine.inspect_container(&c.id).await?);
        }
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        services.push(ServiceFacts {
            name: name.clone(),
            role: Role::of(svc),
            expected: svc.replicas,
            containers,
        });
    }
    let running = |role: Role| -> Vec<&ContainerInfo> {
        services
            .iter()
            .filter(|s| s.role == role)
            .flat_map(|s| s.containers.iter())
            .filter(|c| c.running)
            .collect()
    };
    // Each service's configuration as it loads it (its running container's
    // environment); Redis through the library, with the configuration the
    // web uses (the one `/health` reads).
    let containers_of = |name: &str| -> Vec<&ContainerInfo> {
        services
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.containers.iter())
            .collect()
    };
    let config_of = |role: Role| {
        project
            .services
            .values()
            .find(|s| Role::of(s) == role)
            .map(|s| {
                config::service_config(project, &config::as_running(s, &containers_of(&s.name)))
            })
    };
    let web_config = config_of(Role::Web);
    let main_config: Probe<Config> = [
        web_config.clone(),
        config_of(Role::Worker),
        config_of(Role::Beat),
    ]
    .into_iter()
    .flatten()
    .next()
    .unwrap_or_else(|| Err("no web, worker or beat service in the compose file".into()));
    // What `/health` requires a live worker on (the web's `queues`).
    let queues: Vec<String> = main_config
        .as_ref()
        .map(|c| c.queues.clone())
        .unwrap_or_default();
    let beat_lock_ttl = match config_of(Role::Beat) {
        Some(Ok(c)) => c.beat_lock_ttl,
        _ => Config::default().beat_lock_ttl,
    };
    // Which store each service keeps results in; the web's decides what
    // is checked (its `/health` reads it).
    let backends: Vec<(String, &'static str)> = [Role::Web, Role::Worker, Role::Beat]
        .into_iter()
        .filter_map(|role| {
            let svc = project.services.values().find(|s| Role::of(s) == role)?;
            let c = config_of(role)?.ok()?;
            Some((svc.name.clone(), store_kind(&c)))
        })
        .collect();
    // Which broker each service sends and takes tasks through; the web's
    // decides whether RabbitMQ is asked.
    let brokers: Vec<(String, &'static str)> = [Role::Web, Role::Worker, Role::Beat]
        .into_iter()
        .filter_map(|role| {
            let svc = project.services.values().find(|s| Role::of(s) == role)?;
            let c = config_of(role)?.ok()?;
            Some((
                svc.name.clone(),
                rabbitmq::broker_kind(c.broker_url.expose()),
            ))
        })
        .collect();
    let amqp_config = main_config
        .as_ref()
        .ok()
        .filter(|c| rabbitmq::broker_kind(c.broker_url.expose()) == "amqp")
        .cloned();
    let pg_expires = main_config
        .as_ref()
        .ok()
        .filter(|c| store_kind(c) == "postgresql")
        .map(|c| c.result_expires);
    let all_running: Vec<&ContainerInfo> = services
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter(|c| c.running)
        .collect();
    // A stack on RabbitMQ with PostgreSQL results keeps nothing on Redis:
    // its records are read through the backend the services open.
    let uses_redis = main_config.as_ref().map_or(true, Config::uses_redis);
    let backend = match (&main_config, uses_redis) {
        (Ok(c), false) => Some(store::open_backend(engine, project, &all_running, c.clone()).await),
        _ => None,
    };
    // Behind Sentinel, the Redis checks below read the master the
    // sentinels name.
    let (broker, ha_facts) = if uses_redis {
        ha::connect(engine, project, &all_running, main_config).await
    } else {
        (Err("no service keeps anything on Redis".to_owned()), None)
    };

    // Unauthenticated PING through redis-cli in the Redis container: it
    // must be refused.
    let redis_container = running(Role::Redis).first().map(|c| (*c).clone());
    let cli = project
        .services
        .values()
        .find(|s| Role::of(s) == Role::Redis)
        .and_then(|s| s.healthcheck.as_ref())
        .and_then(|h| h.test.get(1))
        .filter(|p| p.ends_with("redis-cli"))
        .cloned()
        .unwrap_or_else(|| "redis-cli".into());
    let redis_facts = match &redis_container {
        None => None,
        Some(_) if !uses_redis => None,
        Some(c) => {
            let cmd = [cli, "--no-auth-warning".into(), "-e".into(), "PING".into()];
            Some(RedisFacts {
                container: c.name.clone(),
                unauthenticated_ping: engine
                    .exec(&c.id, &cmd, &[])
                    .await
                    .map_err(|e| e.to_string()),
                appendonly: store::config_get(&broker, "appendonly").await,
                maxmemory_policy: store::config_get(&broker, "maxmemory-policy").await,
                published: c.published.clone(),
            })
        }
    };
    let rabbit = match &amqp_config {
        None => None,
        Some(c) => Some(ask_rabbitmq(engine, &all_running, c).await),
    };
    let broker_facts = rabbitmq::BrokerFacts {
        brokers,
        rabbitmq_service: project
            .services
            .contains_key(crate::rabbitmq::SERVICE)
            .then(|| crate::rabbitmq::SERVICE.to_owned()),
        rabbitmq: rabbit,
        queues: queues.clone(),
        workers: workers_per_queue(project, &services),
    };
    let records = match backend {
        Some(b) => store::Records(b),
        None => store::Records::on_redis(&broker),
    };
    let beat_lock = records.beat_lock().await;
    let workers = records.workers().await;
    let queue_counts = records.queues(&queues).await;

    // The web API, through its published port.
    let web = running(Role::Web).first().and_then(|c| {
        c.published
            .iter()
            .find(|p| p.container_port == 8000)
            .or(c.published.first())
            .map(|p| {
                let ip = match p.host_ip.as_str() {
                    "" | "0.0.0.0" => "127.0.0.1",
                    "::" => "[::1]",
                    ip => ip,
                };
                format!("{ip}:{}", p.host_port)
            })
    });
    let token: Probe<String> = match web_config {
        None => Err("no web service in the compose file".into()),
        Some(Err(e)) => Err(e),
        Some(Ok(c)) => c
            .load_api_tokens()
            .map_err(|e| e.to_string())
            .and_then(|t| {
                t.into_iter()
                    .next()
                    .map(|s| s.expose().to_owned())
                    .ok_or_else(|| "the web service has no API token".into())
            }),
    };
    let t = Duration::from_secs(5);
    let health: Probe<(u16, Value)> = match &web {
        None => Err("no running web container publishes a port".into()),
        Some(addr) => http_client::request(addr, "GET", "/health", None, None, t)
            .await
            .map(|r| (r.status, r.json()))
            .map_err(|e| e.to_string()),
    };
    let web_health: Probe<u16> = health.as_ref().map(|(s, _)| *s).map_err(Clone::clone);
    let smoke: Probe<SmokeFacts> = match (&web, &token) {
        (None, _) => Err("no running web container publishes a port".into()),
        (_, Err(e)) => Err(format!("no API token: {e}")),
        (Some(addr), Ok(token)) => smoke_task(addr, token, opts.smoke_timeout).await,
    };
    let store = match pg_expires {
        Some(expires) => results::Store::Postgres {
            expires,
            health: health
                .as_ref()
                .map(|(_, body)| body["checks"]["postgresql"].clone())
                .map_err(|e| format!("GET /health: {e}")),
        },
        None => results::Store::Redis {
            pttl: match &smoke {
                Err(_) => Err("no smoke task result to look at".into()),
                Ok(s) => store::result_pttl(&broker, &s.task_id).await,
            },
        },
    };
    let results = results::ResultsFacts {
        store,
        backends,
        postgres_service: project
            .services
            .contains_key(crate::postgres::SERVICE)
            .then(|| crate::postgres::SERVICE.to_owned()),
    };

    let holder = beat_lock
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|l| l.holder.clone());
    let facts = Facts {
        allow_standby_beats: opts.allow_standby_beats,
        redis: redis_facts,
        uses_redis,
        unused_redis: match (&redis_container, uses_redis) {
            (_, true) => None,
            (Some(c), false) => Some(c.name.clone()),
            (None, false) => skipped_running,
        },
        services,
        beat_lock,
        beat_lock_ttl,
        workers,
        queues,
        queue_counts,
        web_health,
        smoke,
        results,
        broker: broker_facts,
        ha: ha_facts,
    };
    let beat_lock_holder = holder.map(|h| HolderReport {
        container: facts
            .services
            .iter()
            .filter(|s| s.role == Role::Beat)
            .flat_map(|s| s.containers.iter())
            .find(|c| c.running && c.hostname == h.host)
            .map(|c| c.name.clone()),
        holder: h,
    });
    let checks = checks::evaluate(&facts);
    Ok(VerifyReport {
        project: project.name.clone(),
        ok: checks.iter().all(|c| c.ok),
        checks,
        beat_lock_holder,
    })
}

/// For each queue, the running containers of the worker services whose
/// configuration (as they run it) lists it.
fn workers_per_queue(
    project: &Project,
    services: &[ServiceFacts],
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for s in services.iter().filter(|s| s.role == Role::Worker) {
        let Some(svc) = project.services.get(&s.name) else {
            continue;
        };
        let containers: Vec<&ContainerInfo> = s.containers.iter().collect();
        let Ok(c) = config::service_config(project, &config::as_running(svc, &containers)) else {
            continue;
        };
        let running = s.containers.iter().filter(|c| c.running).count();
        for q in c.queues {
            *out.entry(q).or_insert(0) += running;
        }
    }
    out
}

/// RabbitMQ as `config`'s `broker_url` names it: the running container of
/// the project's service its host names, asked with the services' user,
/// password (`broker_password(_file)` or the URL's) and vhost.
async fn ask_rabbitmq<E: Engine>(
    engine: &E,
    running: &[&ContainerInfo],
    config: &Config,
) -> checks::Probe<rabbitmq::RabbitFacts> {
    let raw = config.broker_url.expose();
    let (user, in_url, vhost) = rabbitmq::credentials(raw)?;
    let password = match (&config.broker_password, &config.broker_password_file) {
        (Some(p), _) => Some(p.expose().to_owned()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| format!("broker_password_file {}: {e}", file.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => in_url,
    };
    let host = url::Url::parse(raw)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let c = running
        .iter()
        .find(|c| c.label(labels::SERVICE) == Some(host.as_str()))
        .ok_or_else(|| {
            format!("no running container of service {host} (the services' broker_url host)")
        })?;
    Ok(rabbitmq::gather(engine, c, &user, password.as_deref(), &vhost).await)
}

/// `postgresql` when `config` keeps results in PostgreSQL, else `redis`.
fn store_kind(config: &Config) -> &'static str {
    match &config.result_backend {
        Some(u) if taskstack::config::is_postgres_url(u.expose()) => "postgresql",
        _ => "redis",
    }
}

/// Enqueues `taskstack.add` through the API and polls its result until
/// the deadline.
pub(crate) async fn smoke_task(addr: &str, token: &str, deadline: Duration) -> Probe<SmokeFacts> {
    let t = Duration::from_secs(5);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let (a, b) = (i64::from(nanos % 1000), i64::from(nanos / 1000 % 1000));
    let start = tokio::time::Instant::now();
    let body = json!({"task": "taskstack.add", "args": [a, b]});
    let call = |method: &'static str, path: String, body: Option<Value>| async move {
        http_client::request(addr, method, &path, Some(token), body.as_ref(), t)
            .await
            .map(|r| (r.status, r.json()))
            .map_err(|e| e.to_string())
    };
    let (status, reply) = call("POST", "/api/v1/tasks".into(), Some(body)).await?;
    if status != 202 {
        return Err(format!("POST /api/v1/tasks answered {status}: {reply}"));
    }
    let id = reply["id"]
        .as_str()
        .ok_or_else(|| format!("no task id in {reply}"))?
        .to_owned();
    let path = format!("/api/v1/tasks/{id}");
    loop {
        let (status, reply) = call("GET", path.clone(), None).await?;
        let state = reply["state"].as_str().unwrap_or_default().to_owned();
        if status == 200 && matches!(state.as_str(), "SUCCESS" | "FAILURE" | "REVOKED")
            || start.elapsed() > deadline
        {
            if state.is_empty() || (state != "SUCCESS" && start.elapsed() > deadline) {
                return Err(format!(
                    "task {id} not done within {deadline:?}: GET {path} answered {status} {reply}"
                ));
            }
            return Ok(SmokeFacts {
                task_id: id,
                expected: a + b,
                state,
                result: reply.get("result").cloned().unwrap_or(Value::Null),
                elapsed: start.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests;
