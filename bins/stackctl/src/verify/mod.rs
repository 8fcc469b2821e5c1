//! `stackctl verify`: the production checklist of a running stack. Facts
//! are gathered through the engine (inspect; `redis-cli` run inside the
//! Redis container with the password passed in the exec's environment, so
//! nothing depends on reaching Redis's internal network from this host)
//! and through the web API's published port; [`checks::evaluate`] turns
//! them into pass/fail with reasons.

pub mod checks;

use crate::compose::{Project, parse_duration};
use crate::engine::{ContainerInfo, Engine, ExecOutput};
use crate::error::StackError;
use crate::plan::{Role, labels, project_label};
use checks::{
    Check, Facts, LockFacts, LockHolder, Probe, RedisFacts, ServiceFacts, SmokeFacts, WorkerRecord,
};
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;
use taskstack::http_client;
use taskstack::proto::{Keys, keys::result_key};

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
    let app_env = |role: Role, key: &str| -> Option<String> {
        project
            .services
            .values()
            .filter(|s| Role::of(s) == role)
            .find_map(|s| s.environment.get(key).cloned())
    };
    let any_app_env = |key: &str| {
        [Role::Worker, Role::Beat, Role::Web]
            .into_iter()
            .find_map(|r| app_env(r, key))
    };

    let namespace = any_app_env("TASKSTACK_NAMESPACE").unwrap_or_else(|| "taskstack".into());
    let keys = Keys::new(&namespace);
    // None: the services use no password (then neither does verify).
    let password = match (
        any_app_env("TASKSTACK_BROKER_PASSWORD"),
        any_app_env("TASKSTACK_BROKER_PASSWORD_FILE"),
    ) {
        (None, None) => Ok(None),
        (direct, file) => secret_value(project, direct, file).map(Some),
    };
    let queues: Vec<String> = app_env(Role::Worker, "TASKSTACK_QUEUES")
        .unwrap_or_else(|| "celery".into())
        .split(',')
        .map(|q| q.trim().to_owned())
        .filter(|q| !q.is_empty())
        .collect();
    let beat_lock_ttl = app_env(Role::Beat, "TASKSTACK_BEAT_LOCK_TTL")
        .and_then(|t| parse_duration(&t).ok())
        .unwrap_or(Duration::from_secs(10));

    // Redis, through redis-cli in its container.
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
    let redis = Redis {
        engine,
        container: redis_container.as_ref().map(|c| c.id.clone()),
        cli,
        password: password.clone(),
    };
    let redis_facts = match &redis_container {
        None => None,
        Some(c) => Some(RedisFacts {
            container: c.name.clone(),
            unauthenticated_ping: redis.exec(&["PING"], false).await,
            appendonly: redis.config_get("appendonly").await,
            maxmemory_policy: redis.config_get("maxmemory-policy").await,
            published: c.published.clone(),
        }),
    };

    let lock_key = keys.beat_lock();
    let beat_lock: Probe<Option<LockFacts>> = async {
        let raw = redis.cmd(&["GET", &lock_key]).await?;
        let raw = raw.trim_end_matches('\n').to_owned();
        if raw.is_empty() {
            return Ok(None);
        }
        let pttl = redis.cmd(&["PTTL", &lock_key]).await?;
        Ok(Some(LockFacts {
            holder: serde_json::from_str(&raw).ok(),
            pttl_ms: pttl
                .trim()
                .parse()
                .map_err(|_| format!("PTTL {lock_key}: {pttl:?}"))?,
            raw,
        }))
    }
    .await;

    let workers: Probe<Vec<WorkerRecord>> = async {
        let pattern = format!("{}*", keys.worker_prefix());
        let list = redis.cmd(&["KEYS", &pattern]).await?;
        let names: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["MGET"];
        args.extend(names.iter().copied());
        let values = redis.cmd(&args).await?;
        Ok(values
            .lines()
            .filter_map(|v| serde_json::from_str::<WorkerRecord>(v).ok())
            .collect())
    }
    .await;

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
    let token = secret_value(
        project,
        app_env(Role::Web, "TASKSTACK_API_TOKENS")
            .map(|t| t.split(',').next().unwrap_or("").to_owned()),
        app_env(Role::Web, "TASKSTACK_API_TOKENS_FILE"),
    )
    .map(|t| {
        t.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("")
            .to_owned()
    });
    let t = Duration::from_secs(5);
    let web_health: Probe<u16> = match &web {
        None => Err("no running web container publishes a port".into()),
        Some(addr) => http_client::request(addr, "GET", "/health", None, None, t)
            .await
            .map(|r| r.status)
            .map_err(|e| e.to_string()),
    };
    let smoke: Probe<SmokeFacts> = match (&web, &token) {
        (None, _) => Err("no running web container publishes a port".into()),
        (_, Err(e)) => Err(format!("no API token: {e}")),
        (Some(addr), Ok(token)) => smoke_task(addr, token, opts.smoke_timeout).await,
    };
    let result_pttl: Probe<i64> = match &smoke {
        Err(_) => Err("no smoke task result to look at".into()),
        Ok(s) => redis
            .cmd(&["PTTL", &result_key(&s.task_id)])
            .await
            .and_then(|v| v.trim().parse().map_err(|_| format!("PTTL: {v:?}"))),
    };

    let holder = beat_lock
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|l| l.holder.clone());
    let facts = Facts {
        allow_standby_beats: opts.allow_standby_beats,
        services,
        redis: redis_facts,
        beat_lock,
        beat_lock_ttl,
        workers,
        queues,
        web_health,
        smoke,
        result_pttl,
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

/// A secret's value: given directly, or from the file a `/run/secrets/<name>`
/// path names (read on this host from the project's secret file).
fn secret_value(
    project: &Project,
    direct: Option<String>,
    file: Option<String>,
) -> Result<String, String> {
    if let Some(v) = direct.filter(|v| !v.is_empty()) {
        return Ok(v);
    }
    let path = file.ok_or("neither the value nor a *_FILE is configured")?;
    let name = path
        .strip_prefix("/run/secrets/")
        .ok_or_else(|| format!("{path} is not a Docker secret (/run/secrets/...)"))?;
    let secret = project
        .secrets
        .get(name)
        .ok_or_else(|| format!("no secret `{name}` in the compose file"))?;
    std::fs::read_to_string(&secret.file)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|e| format!("{}: {e}", secret.file.display()))
}

/// `redis-cli` run in the Redis container.
struct Redis<'a, E: Engine> {
    engine: &'a E,
    container: Option<String>,
    cli: String,
    password: Result<Option<String>, String>,
}

impl<E: Engine> Redis<'_, E> {
    /// Runs `redis-cli -e <args>`, authenticated (REDISCLI_AUTH in the
    /// exec's environment) or not.
    async fn exec(&self, args: &[&str], auth: bool) -> Probe<ExecOutput> {
        let id = self
            .container
            .as_ref()
            .ok_or("no running Redis container")?;
        let mut cmd = vec![self.cli.clone(), "--no-auth-warning".into(), "-e".into()];
        cmd.extend(args.iter().map(|a| (*a).to_owned()));
        let password = if auth {
            self.password
                .as_ref()
                .map_err(|e| format!("no Redis password: {e}"))?
                .as_ref()
        } else {
            None
        };
        let env: Vec<String> = password
            .map(|p| format!("REDISCLI_AUTH={p}"))
            .into_iter()
            .collect();
        self.engine
            .exec(id, &cmd, &env)
            .await
            .map_err(|e| e.to_string())
    }

    /// An authenticated command's output; Err with its error reply.
    async fn cmd(&self, args: &[&str]) -> Probe<String> {
        let out = self.exec(args, true).await?;
        if out.exit_code == Some(0) {
            Ok(out.stdout)
        } else {
            Err(format!(
                "redis-cli {}: {}{}",
                args[0],
                out.stdout.trim(),
                out.stderr.trim()
            ))
        }
    }

    async fn config_get(&self, key: &str) -> Probe<String> {
        let out = self.cmd(&["CONFIG", "GET", key]).await?;
        out.lines()
            .nth(1)
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| format!("CONFIG GET {key}: {out:?}"))
    }
}

/// Enqueues `taskstack.add` through the API and polls its result until
/// the deadline.
async fn smoke_task(addr: &str, token: &str, deadline: Duration) -> Probe<SmokeFacts> {
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
