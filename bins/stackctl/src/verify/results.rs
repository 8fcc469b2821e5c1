//! Where results are kept, as a pure function of what was observed: on
//! Redis, the smoke task's record must expire; in PostgreSQL
//! (`result_backend = "postgresql://..."`), the web's `/health` must
//! report the store reachable (`checks.postgresql`) and `result_expires`
//! must be set (the cleaner deletes rows past it). Web, worker and beat
//! must keep results in the same store, and a PostgreSQL service no result
//! goes to is reported rather than left running unused.

use super::checks::{Check, Probe};
use serde_json::Value;
use std::time::Duration;

/// The store the services' configuration names.
#[derive(Debug, Clone)]
pub enum Store {
    /// Results on Redis: the PTTL (ms) of the smoke task's record.
    Redis { pttl: Probe<i64> },
    /// Results in PostgreSQL.
    Postgres {
        /// `result_expires`.
        expires: Duration,
        /// `checks.postgresql` of the web's `/health` body (Err: no body,
        /// or why it could not be read).
        health: Probe<Value>,
    },
}

/// What verify saw about results.
#[derive(Debug, Clone)]
pub struct ResultsFacts {
    /// The store of the web's configuration (the one `/health` reads).
    pub store: Store,
    /// Each of web, worker and beat with the kind of store its
    /// configuration names (`redis`, `postgresql`).
    pub backends: Vec<(String, &'static str)>,
    /// The project's PostgreSQL service (profile `postgres`), if it has one.
    pub postgres_service: Option<String>,
}

impl ResultsFacts {
    /// Results on Redis with the smoke record's PTTL, one store for all.
    pub fn redis(pttl: Probe<i64>) -> Self {
        Self {
            store: Store::Redis { pttl },
            backends: Vec::new(),
            postgres_service: None,
        }
    }
}

fn check(id: &str, ok: bool, reason: impl Into<String>) -> Check {
    Check {
        id: id.to_owned(),
        ok,
        reason: reason.into(),
    }
}

/// The results checks (see the module docs).
pub fn evaluate(f: &ResultsFacts) -> Vec<Check> {
    let mut out = Vec::new();
    let kinds: std::collections::BTreeSet<&str> = f.backends.iter().map(|(_, k)| *k).collect();
    let store_kind = match f.store {
        Store::Redis { .. } => "redis",
        Store::Postgres { .. } => "postgresql",
    };
    let list = || {
        f.backends
            .iter()
            .map(|(s, k)| format!("{s}: {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if kinds.len() > 1 {
        out.push(check(
            "results.store",
            false,
            format!(
                "the services keep results in different stores ({}): a result written by a worker \
                 would not be where the web reads it",
                list()
            ),
        ));
    } else if let (Some(pg), "redis") = (&f.postgres_service, store_kind) {
        out.push(check(
            "results.store",
            false,
            format!(
                "service {pg} runs, but results go to Redis (RESULT_BACKEND is set to a redis:// \
                 URL): unset it (`stackctl up --profile postgres` then points the services at \
                 {pg}) or leave the profile off"
            ),
        ));
    } else if !f.backends.is_empty() {
        out.push(check(
            "results.store",
            true,
            format!("every service keeps results in {store_kind} ({})", list()),
        ));
    }
    match &f.store {
        Store::Redis { pttl } => out.push(match pttl {
            Err(e) => check("results.expiry", false, e.clone()),
            Ok(ms) if *ms > 0 => check(
                "results.expiry",
                true,
                format!("the result expires in {} s", ms / 1000),
            ),
            Ok(-1) => check(
                "results.expiry",
                false,
                "the result has no expiry: Redis would fill up",
            ),
            Ok(_) => check("results.expiry", false, "the result record is gone"),
        }),
        Store::Postgres { expires, health } => {
            out.push(match health {
                Err(e) => check("results.postgresql", false, e.clone()),
                Ok(Value::Null) => check(
                    "results.postgresql",
                    false,
                    "the web's /health has no `checks.postgresql`: the running web does not use \
                     the PostgreSQL result store",
                ),
                Ok(c) if c["ok"].as_bool() == Some(true) => check(
                    "results.postgresql",
                    true,
                    match c["latency_ms"].as_f64() {
                        Some(ms) => {
                            format!("the web reaches the PostgreSQL result store ({ms:.1} ms)")
                        }
                        None => "the web reaches the PostgreSQL result store".to_owned(),
                    },
                ),
                Ok(c) => check(
                    "results.postgresql",
                    false,
                    format!(
                        "the web cannot reach the PostgreSQL result store: {}",
                        c["error"].as_str().unwrap_or("no reason given")
                    ),
                ),
            });
            out.push(if expires.is_zero() {
                check(
                    "results.expiry",
                    false,
                    "result_expires is 0: rows would never be deleted",
                )
            } else {
                check(
                    "results.expiry",
                    true,
                    format!(
                        "result_expires {}: the cleaner deletes rows older than that",
                        humantime::format_duration(*expires)
                    ),
                )
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pg(health: Probe<Value>) -> ResultsFacts {
        ResultsFacts {
            store: Store::Postgres {
                expires: Duration::from_secs(3600),
                health,
            },
            backends: ["web", "worker", "beat"]
                .map(|s| (s.to_owned(), "postgresql"))
                .to_vec(),
            postgres_service: Some("postgres".into()),
        }
    }

    fn ids(checks: &[Check]) -> Vec<String> {
        checks
            .iter()
            .map(|c| {
                format!(
                    "{} {}: {}",
                    if c.ok { "PASS" } else { "FAIL" },
                    c.id,
                    c.reason
                )
            })
            .collect()
    }

    #[test]
    fn postgres_results_need_a_reachable_store_and_an_expiry() {
        let good = evaluate(&pg(Ok(
            json!({"ok": true, "latency_ms": 1.25, "error": null}),
        )));
        assert_eq!(
            ids(&good),
            [
                "PASS results.store: every service keeps results in postgresql (web: postgresql, worker: postgresql, beat: postgresql)",
                "PASS results.postgresql: the web reaches the PostgreSQL result store (1.2 ms)",
                "PASS results.expiry: result_expires 1h: the cleaner deletes rows older than that",
            ]
        );
        let down = evaluate(&pg(Ok(
            json!({"ok": false, "latency_ms": null, "error": "connection refused"}),
        )));
        assert_eq!(
            ids(&down)[1],
            "FAIL results.postgresql: the web cannot reach the PostgreSQL result store: connection refused"
        );
        let absent = evaluate(&pg(Ok(Value::Null)));
        assert!(ids(&absent)[1].starts_with("FAIL results.postgresql: the web's /health has no"));
        let mut zero = pg(Ok(json!({"ok": true})));
        zero.store = Store::Postgres {
            expires: Duration::ZERO,
            health: Ok(json!({"ok": true})),
        };
        assert_eq!(
            ids(&evaluate(&zero))[2],
            "FAIL results.expiry: result_expires is 0: rows would never be deleted"
        );
    }

    #[test]
    fn an_unused_postgres_or_split_stores_fail() {
        let mut unused = ResultsFacts::redis(Ok(3_599_000));
        unused.backends = vec![("web".into(), "redis"), ("worker".into(), "redis")];
        unused.postgres_service = Some("postgres".into());
        let out = ids(&evaluate(&unused));
        assert!(
            out[0]
                .starts_with("FAIL results.store: service postgres runs, but results go to Redis"),
            "{out:?}"
        );
        assert_eq!(out[1], "PASS results.expiry: the result expires in 3599 s");

        let mut split = pg(Ok(json!({"ok": true})));
        split.backends[1].1 = "redis";
        let out = ids(&evaluate(&split));
        assert!(
            out[0].starts_with(
                "FAIL results.store: the services keep results in different stores (web: postgresql, worker: redis, beat: postgresql)"
            ),
            "{out:?}"
        );
    }
}
