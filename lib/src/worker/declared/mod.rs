//! Declared tasks (`[tasks."name"]` in the worker's TOML file): programs
//! run per task and HTTP endpoints POSTed per task, registered like any
//! handler, so concurrency, retries, time limits, dead letters and metrics
//! are the engine's.
//!
//! Both receive the same JSON object: `{"id", "task", "args", "kwargs",
//! "retries", "eta", "expires", "root_id", "parent_id"}`.

mod exec;
mod http;
mod output;

pub use exec::KILL_GRACE;
pub use output::{EX_TEMPFAIL, MAX_OUTPUT, STDERR_TAIL};

use super::{Registry, TaskContext, TaskLimits, TaskOptions};
use crate::config::{ConfigError, DeclaredTasks, TaskDecl, TaskKind};
use crate::proto::envelope::format_time;
use serde_json::json;
use std::sync::Arc;

/// The JSON object a declared task receives.
pub fn payload(ctx: &TaskContext) -> Vec<u8> {
    json!({
        "id": ctx.id,
        "task": ctx.name,
        "args": ctx.args,
        "kwargs": ctx.kwargs,
        "retries": ctx.retries,
        "eta": ctx.eta.map(format_time),
        "expires": ctx.expires.map(format_time),
        "root_id": ctx.root_id,
        "parent_id": ctx.parent_id,
    })
    .to_string()
    .into_bytes()
}

fn options(decl: &TaskDecl) -> TaskOptions {
    let d = TaskOptions::default();
    TaskOptions {
        max_retries: decl.max_retries.unwrap_or(d.max_retries),
        retry_backoff: decl.retry_backoff.unwrap_or(d.retry_backoff),
        retry_backoff_max: d.retry_backoff_max,
    }
}

/// Adds the declared `tasks` to `registry`, checking what depends on this
/// machine (programs, working directories, secret files). A declared task
/// named like one already registered is refused by name.
pub fn register(registry: &mut Registry, tasks: &DeclaredTasks) -> Result<(), ConfigError> {
    let mut declared = Registry::new();
    let client = http::Client::new();
    for (name, decl) in tasks.iter() {
        let mut limits = TaskLimits {
            rate_limit: decl.rate_limit.clone(),
            ..TaskLimits::default()
        };
        match &decl.kind {
            TaskKind::Exec(e) => {
                let prog = Arc::new(exec::Program::resolve(name, e)?);
                declared.register_with(name, options(decl), move |ctx: TaskContext| {
                    let input = payload(&ctx);
                    exec::run(Arc::clone(&prog), ctx, input)
                });
                // The program's group is terminated at the hard limit by
                // `exec::run` itself, whichever limit applies.
                declared.enforces_own_hard_limit(name);
                limits.time_limit = e.time_limit;
                limits.soft_time_limit = e.soft_time_limit;
            }
            TaskKind::Http(h) => {
                let endpoint = Arc::new(http::Endpoint::resolve(name, h, client.clone())?);
                declared.register_with(name, options(decl), move |ctx: TaskContext| {
                    let input = payload(&ctx);
                    http::run(Arc::clone(&endpoint), ctx, input)
                });
            }
        }
        declared.set_limits(name, limits);
    }
    registry.absorb(declared).map_err(|name| {
        ConfigError::Load(format!(
            "task `{name}` is declared in [tasks] but this worker already has a task of that \
             name (built in or its own); give the declared one another name"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ExecDecl, HttpDecl};
    use serde_json::{Map, Value};
    use std::collections::BTreeMap;

    fn exec(argv: &[&str]) -> TaskDecl {
        TaskDecl {
            kind: TaskKind::Exec(ExecDecl {
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                time_limit: None,
                soft_time_limit: None,
                env: BTreeMap::new(),
                cwd: None,
            }),
            max_retries: None,
            retry_backoff: None,
            rate_limit: None,
        }
    }

    fn tasks(list: &[(&str, TaskDecl)]) -> DeclaredTasks {
        DeclaredTasks(
            list.iter()
                .map(|(n, d)| ((*n).to_owned(), d.clone()))
                .collect(),
        )
    }

    #[test]
    fn the_payload_has_every_field() {
        let mut ctx = TaskContext::new("a.b", vec![json!(1)], Map::new());
        ctx.parent_id = Some("p".into());
        let v: Value = serde_json::from_slice(&payload(&ctx)).expect("json");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = [
            "id",
            "task",
            "args",
            "kwargs",
            "retries",
            "eta",
            "expires",
            "root_id",
            "parent_id",
        ];
        want.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(
            (v["task"].clone(), v["parent_id"].clone(), v["eta"].clone()),
            (json!("a.b"), json!("p"), Value::Null)
        );
    }

    #[test]
    fn programs_are_resolved_or_refused_by_task_and_key() {
        let mut r = Registry::new();
        register(&mut r, &tasks(&[("t.sh", exec(&["sh", "-c", "true"]))])).expect("sh is in PATH");
        assert!(r.contains("t.sh"));
        let e = register(
            &mut Registry::new(),
            &tasks(&[("t.x", exec(&["./no-such-program"]))]),
        )
        .expect_err("missing")
        .to_string();
        assert!(
            e.contains("task `t.x`") && e.contains("key `exec`") && e.contains("no-such-program"),
            "{e}"
        );
        let e = register(
            &mut Registry::new(),
            &tasks(&[("t.y", exec(&["no-such-program-xyz"]))]),
        )
        .expect_err("missing")
        .to_string();
        assert!(e.contains("PATH"), "{e}");
        let mut d = exec(&["sh"]);
        if let TaskKind::Exec(e) = &mut d.kind {
            e.cwd = Some("/no/such/dir".into());
        }
        let e = register(&mut Registry::new(), &tasks(&[("t.z", d)]))
            .expect_err("cwd")
            .to_string();
        assert!(e.contains("key `cwd`"), "{e}");
    }

    #[test]
    fn a_declared_task_named_like_a_registered_one_is_refused() {
        let mut r = Registry::new();
        crate::worker::builtin::register(&mut r);
        let e = register(&mut r, &tasks(&[("taskstack.echo", exec(&["sh"]))]))
            .expect_err("clash")
            .to_string();
        assert!(e.contains("`taskstack.echo`"), "{e}");
    }

    #[test]
    fn an_unreadable_secret_file_is_refused() {
        let d = TaskDecl {
            kind: TaskKind::Http(HttpDecl {
                url: "http://127.0.0.1:9/x".parse().expect("url"),
                timeout: None,
                secret_file: Some("/no/such/secret".into()),
            }),
            max_retries: None,
            retry_backoff: None,
            rate_limit: None,
        };
        let e = register(&mut Registry::new(), &tasks(&[("h", d)]))
            .expect_err("secret")
            .to_string();
        assert!(
            e.contains("task `h`") && e.contains("key `secret_file`"),
            "{e}"
        );
    }
}
