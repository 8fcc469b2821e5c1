//! The in-process fixture: the router on a real `redis-server` of its own,
//! driven without a socket (`tower::ServiceExt::oneshot`).

#![allow(dead_code)] // each test file uses a different part

use anyhow::Result;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::Value;
use std::time::Duration;
use taskstack_integration::{InProcessWorker, RedisServer, TEST_TOKEN, namespace, wait_until};
use taskstack_web::{AppState, WebSettings};
use tower::ServiceExt as _;

pub const ADD: &str = "taskstack.add";

pub fn settings(queues: &[&str], tasks: &[&str]) -> WebSettings {
    WebSettings {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        tasks: tasks.iter().map(|t| (*t).to_owned()).collect(),
        expect_beat: false,
        result_expires: Duration::from_secs(600),
        max_task_delay: Duration::from_secs(3600),
        send_sent_event: false,
        body_limit: 64 * 1024,
        tokens: vec![TEST_TOKEN.into()],
        limits: taskstack_web::serve::Limits::default(),
        threads: 1,
    }
}

/// The router of `state`, driven without a socket.
pub struct Api {
    pub state: AppState,
    pub router: Router,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        let (router, _) = taskstack_web::router(state.clone());
        Self { state, router }
    }

    /// Sends `req` and returns status, headers and body text.
    pub async fn raw(&self, req: Request<Body>) -> Result<(StatusCode, HeaderMap, String)> {
        let resp = self.router.clone().oneshot(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    }

    /// A JSON request with the test token; the JSON answer (Null when none).
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TEST_TOKEN}"));
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let (status, _, text) = self.raw(b.body(body)?).await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// POSTs a task and returns its id, asserting 202.
    pub async fn enqueue(&self, body: Value) -> Result<String> {
        let (status, v) = self.call(Method::POST, "/api/v1/tasks", Some(body)).await?;
        anyhow::ensure!(status == StatusCode::ACCEPTED, "enqueue: {status} {v}");
        Ok(v["id"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until GET of task `id` reports `state`; returns the task.
    pub async fn wait_state(&self, id: &str, state: &str) -> Result<Value> {
        let uri = format!("/api/v1/tasks/{id}");
        wait_until(
            &format!("task {id} to be {state}"),
            Duration::from_secs(15),
            || async {
                let (s, v) = self.call(Method::GET, &uri, None).await?;
                Ok((s == StatusCode::OK && v["state"] == state).then_some(v))
            },
        )
        .await
    }
}

/// [`Api`] on a real `redis-server` of its own.
pub struct App {
    pub redis: RedisServer,
    pub ns: String,
    pub api: Api,
}

impl std::ops::Deref for App {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl App {
    pub fn new(test: &str, settings: WebSettings) -> Result<Self> {
        let redis = RedisServer::start()?;
        let ns = namespace(test);
        let broker = taskstack_integration::broker(&redis.url(), &ns)?;
        Ok(Self {
            redis,
            ns,
            api: Api::new(AppState::new(broker, settings)),
        })
    }

    /// A worker engine in this process with the built-in tasks (or `registry`).
    pub fn worker(
        &self,
        queues: &[&str],
        registry: Option<taskstack::worker::Registry>,
    ) -> Result<InProcessWorker> {
        let registry = registry.unwrap_or_else(|| {
            let mut r = taskstack::worker::Registry::new();
            taskstack::worker::builtin::register(&mut r);
            r
        });
        // These tests watch tasks go through STARTED.
        let mut settings = taskstack_integration::settings(queues);
        settings.track_started = true;
        InProcessWorker::start(&self.redis.url(), &self.ns, registry, settings)
    }

    /// The length of a Redis list.
    pub fn llen(&self, key: &str) -> Result<u64> {
        let mut c = self.redis.conn()?;
        Ok(redis::cmd("LLEN").arg(key).query(&mut c)?)
    }

    /// How many task records exist.
    pub fn task_records(&self) -> Result<usize> {
        let mut c = self.redis.conn()?;
        let keys: Vec<String> = redis::cmd("KEYS").arg("celery-task-meta-*").query(&mut c)?;
        Ok(keys.len())
    }
}
