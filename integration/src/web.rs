//! `taskstack-web` processes on free loopback ports.

use crate::process::{ServiceProcess, clean_command};
use crate::{free_port, wait_until};
use anyhow::Result;
use std::process::Command;
use std::time::Duration;

/// The API token test web processes accept.
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// A `taskstack-web` process, killed on drop.
#[derive(Debug)]
pub struct WebProcess {
    process: ServiceProcess,
    /// `127.0.0.1:<port>` it serves on.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for WebProcess {
    type Target = ServiceProcess;
    fn deref(&self) -> &ServiceProcess {
        &self.process
    }
}

impl std::ops::DerefMut for WebProcess {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.process
    }
}

impl WebProcess {
    /// Starts a web process against `redis_url` in `namespace` accepting
    /// [`TEST_TOKEN`], with extra `TASKSTACK_*` variables, and waits until
    /// it answers `/health/live`.
    pub async fn spawn(redis_url: &str, namespace: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_under(&[], redis_url, namespace, env).await
    }

    /// Like [`WebProcess::spawn`], run through `wrapper` (a program and its
    /// arguments that execs the rest, such as `prlimit --nofile=100:100`).
    pub async fn spawn_under(
        wrapper: &[&str],
        redis_url: &str,
        namespace: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Self::command(redis_url, namespace, &addr)?;
        if let [program, args @ ..] = wrapper {
            let mut wrapped = Command::new(program);
            wrapped
                .args(args)
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => wrapped.env(k, v),
                    None => wrapped.env_remove(k),
                };
            }
            cmd = wrapped;
        }
        let process = ServiceProcess::spawn("web", cmd, env, dir.path().join("web.log"))?;
        let web = Self {
            process,
            addr,
            _dir: dir,
        };
        wait_until(
            "taskstack-web to serve",
            Duration::from_secs(20),
            || async {
                if !web.is_running() {
                    anyhow::bail!("taskstack-web exited:\n{}", web.log());
                }
                Ok(
                    crate::http::request(&web.addr, "GET", "/health/live", None, None)
                        .await
                        .ok()
                        .filter(|(s, _)| *s == 200),
                )
            },
        )
        .await?;
        Ok(web)
    }

    /// The command with a clean environment for this test.
    pub fn command(redis_url: &str, namespace: &str, addr: &str) -> Result<Command> {
        let mut cmd = clean_command("taskstack-web", redis_url, namespace)?;
        cmd.env("TASKSTACK_WEB_LISTEN", addr)
            .env("TASKSTACK_API_TOKENS", TEST_TOKEN);
        Ok(cmd)
    }

    /// A request with the test token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        crate::http::request(&self.addr, method, path, Some(TEST_TOKEN), body).await
    }

    /// Enqueues `taskstack.add(a, b)` (expecting `202`) and waits until it
    /// is `SUCCESS`; returns that answer (its `id`, `result`, ...).
    pub async fn run_add(&self, a: i64, b: i64) -> Result<serde_json::Value> {
        let task = serde_json::json!({"task": "taskstack.add", "args": [a, b]});
        let (s, v) = self.call("POST", "/api/v1/tasks", Some(&task)).await?;
        anyhow::ensure!(s == 202, "POST /api/v1/tasks answered {s}: {v}");
        self.wait_state(v["id"].as_str().unwrap_or_default(), "SUCCESS")
            .await
    }

    /// Waits (30 s at most) until `GET /api/v1/tasks/{id}` reports `state`;
    /// returns that answer.
    pub async fn wait_state(&self, id: &str, state: &str) -> Result<serde_json::Value> {
        let path = format!("/api/v1/tasks/{id}");
        wait_until(
            &format!("task {id} to be {state}"),
            Duration::from_secs(30),
            || async {
                let (s, v) = self.call("GET", &path, None).await?;
                Ok((s == 200 && v["state"] == state).then_some(v))
            },
        )
        .await
    }
}
