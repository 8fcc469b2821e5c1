//! The broker checks when the services use RabbitMQ (`broker_url =
//! "amqp://..."`, profile `rabbitmq`), as a pure function of what was
//! observed ([`BrokerFacts`]), plus how those facts are gathered: through
//! `rabbitmqctl` run in the RabbitMQ container by the engine's exec (no
//! port is published, and the image has no management plugin).
//!
//! * `broker.kind`: web, worker and beat name the same kind of broker, and
//!   a RabbitMQ service of the project is the broker of some service;
//! * `rabbitmq.auth`: RabbitMQ accepts the services' user and password
//!   (`rabbitmqctl authenticate_user`; the password travels in the exec's
//!   environment, never on the engine's command line);
//! * `rabbitmq.guest`: no `guest` user (its well-known password);
//! * `rabbitmq.not_published`: no port on a non-loopback address;
//! * `rabbitmq.queues`: each queue the web expects a worker on exists on
//!   the services' vhost and is durable (its type and arguments shown);
//! * `rabbitmq.consumers`: each of them has at least one consumer per
//!   running worker container whose `queues` list it (and at least one).
//!
//! With a Redis broker and no RabbitMQ service none of these is reported.

use super::checks::{Check, Probe};
use crate::compose::is_loopback;
use crate::engine::{ContainerInfo, Engine, ExecOutput, Published};
use serde::Deserialize;
use serde_json::Value;

/// The environment variable the exec of `authenticate_user` gets the
/// password in.
const PASSWORD_ENV: &str = "TASKSTACK_VERIFY_PASSWORD";

/// One row of `rabbitmqctl list_queues --formatter json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueueRow {
    pub name: String,
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub consumers: u64,
    #[serde(default)]
    pub messages_ready: u64,
    #[serde(default)]
    pub messages_unacknowledged: u64,
    /// `classic`, `quorum`, `stream`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// As rabbitmqctl prints them (`{"x-max-priority": 10}`, or `[]`).
    #[serde(default)]
    pub arguments: Value,
}

/// What RabbitMQ answered (through `rabbitmqctl` in its container).
#[derive(Debug, Clone)]
pub struct RabbitFacts {
    pub container: String,
    pub published: Vec<Published>,
    /// The services' user and vhost (from their `broker_url`).
    pub user: String,
    pub vhost: String,
    /// `rabbitmqctl authenticate_user` with the services' credentials.
    pub auth: Probe<ExecOutput>,
    /// The vhost's queues.
    pub queues: Probe<Vec<QueueRow>>,
    /// The broker's users.
    pub users: Probe<Vec<String>>,
}

/// What verify saw about the broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerFacts {
    /// Each of web, worker and beat with the kind of broker its
    /// configuration names (`redis`, `amqp`).
    pub brokers: Vec<(String, &'static str)>,
    /// The project's RabbitMQ service (profile `rabbitmq`), if it has one.
    pub rabbitmq_service: Option<String>,
    /// When the web's broker is RabbitMQ: what it answered (Err: why it
    /// could not be asked).
    pub rabbitmq: Option<Probe<RabbitFacts>>,
    /// The queues the web expects a live worker on.
    pub queues: Vec<String>,
    /// For each queue, the running worker containers whose configuration
    /// lists it.
    pub workers: std::collections::BTreeMap<String, usize>,
}

impl BrokerFacts {
    /// Whether the web's broker is RabbitMQ.
    pub fn uses_rabbitmq(&self) -> bool {
        self.rabbitmq.is_some()
    }
}

/// `amqp` for an `amqp://` or `amqps://` URL, else `redis`.
pub fn broker_kind(url: &str) -> &'static str {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if scheme.eq_ignore_ascii_case("amqp") || scheme.eq_ignore_ascii_case("amqps") {
        "amqp"
    } else {
        "redis"
    }
}

/// The user, password and vhost of an AMQP URL (RabbitMQ's defaults
/// where it names none: `guest`, no password, vhost `/`).
pub fn credentials(url: &str) -> Result<(String, Option<String>, String), String> {
    let u = url::Url::parse(url).map_err(|e| format!("broker_url: {e}"))?;
    let decode = |s: &str| {
        percent_decode(s).map_err(|()| format!("broker_url: bad percent-encoding in {s:?}"))
    };
    let user = if u.username().is_empty() {
        "guest".to_owned()
    } else {
        decode(u.username())?
    };
    let password = u.password().map(decode).transpose()?;
    let path = u.path().strip_prefix('/').unwrap_or(u.path());
    let vhost = if path.is_empty() {
        "/".to_owned()
    } else {
        decode(path)?
    };
    Ok((user, password, vhost))
}

fn percent_decode(s: &str) -> Result<String, ()> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ())
}

/// Asks RabbitMQ in `container` about `vhost` and the services' `user` /
/// `password`.
pub async fn gather<E: Engine>(
    engine: &E,
    container: &ContainerInfo,
    user: &str,
    password: Option<&str>,
    vhost: &str,
) -> RabbitFacts {
    let ctl = |args: &[&str]| {
        std::iter::once("rabbitmqctl")
            .chain(args.iter().copied())
            .map(String::from)
            .collect::<Vec<String>>()
    };
    let run = |cmd: Vec<String>, env: Vec<String>| async move {
        engine
            .exec(&container.id, &cmd, &env)
            .await
            .map_err(|e| e.to_string())
    };
    let json = |out: Probe<ExecOutput>, what: &str| -> Probe<Value> {
        let out = out?;
        if out.exit_code != Some(0) {
            return Err(format!(
                "rabbitmqctl {what} exited with {:?}: {}{}",
                out.exit_code,
                out.stdout.trim(),
                out.stderr.trim()
            ));
        }
        serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("rabbitmqctl {what}: not JSON ({e}): {}", out.stdout.trim()))
    };
    let auth = match password {
        None => Err(format!(
            "the services' broker_url names no password for {user} (broker_password_file?)"
        )),
        Some(pw) => {
            // The shell passes the password from the environment as an
            // argument inside the container only.
            let cmd = [
                "sh",
                "-c",
                &format!("exec rabbitmqctl -q authenticate_user \"$0\" \"${PASSWORD_ENV}\""),
                user,
            ]
            .map(String::from)
            .to_vec();
            run(cmd, vec![format!("{PASSWORD_ENV}={pw}")]).await
        }
    };
    let queues = json(
        run(
            ctl(&[
                "-q",
                "list_queues",
                "-p",
                vhost,
                "name",
                "durable",
                "auto_delete",
                "consumers",
                "messages_ready",
                "messages_unacknowledged",
                "type",
                "arguments",
                "--formatter",
                "json",
            ]),
            Vec::new(),
        )
        .await,
        "list_queues",
    )
    .and_then(|v| {
        serde_json::from_value::<Vec<QueueRow>>(v).map_err(|e| format!("list_queues: {e}"))
    });
    let users = json(
        run(
            ctl(&["-q", "list_users", "--formatter", "json"]),
            Vec::new(),
        )
        .await,
        "list_users",
    )
    .map(|v| {
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r["user"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    });
    RabbitFacts {
        container: container.name.clone(),
        published: container.published.clone(),
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        auth,
        queues,
        users,
    }
}

fn check(id: &str, ok: bool, reason: impl Into<String>) -> Check {
    Check {
        id: id.to_owned(),
        ok,
        reason: reason.into(),
    }
}

fn probe<T>(id: &str, p: &Probe<T>, f: impl FnOnce(&T) -> (bool, String)) -> Check {
    match p {
        Ok(v) => {
            let (ok, reason) = f(v);
            check(id, ok, reason)
        }
        Err(e) => check(id, false, e.clone()),
    }
}

/// The broker checks (see the module docs).
pub fn evaluate(f: &BrokerFacts) -> Vec<Check> {
    let mut out = Vec::new();
    let kinds: std::collections::BTreeSet<&str> = f.brokers.iter().map(|(_, k)| *k).collect();
    if f.rabbitmq.is_none() && f.rabbitmq_service.is_none() && !kinds.contains("amqp") {
        return out;
    }
    let list = || {
        f.brokers
            .iter()
            .map(|(s, k)| format!("{s}: {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push(if kinds.len() > 1 {
        check(
            "broker.kind",
            false,
            format!(
                "the services use different brokers ({}): a task sent by the web would not reach \
                 the workers",
                list()
            ),
        )
    } else if let (Some(svc), None) = (&f.rabbitmq_service, &f.rabbitmq) {
        check(
            "broker.kind",
            false,
            format!(
                "service {svc} runs but no service's broker_url is amqp://... ({}); unset \
                 BROKER_URL to let the profile rabbitmq point them at it, or drop the profile",
                list()
            ),
        )
    } else {
        check("broker.kind", true, format!("RabbitMQ ({})", list()))
    });
    let Some(rabbit) = &f.rabbitmq else {
        return out;
    };
    let r = match rabbit {
        Ok(r) => r,
        Err(e) => {
            for id in [
                "rabbitmq.auth",
                "rabbitmq.guest",
                "rabbitmq.not_published",
                "rabbitmq.queues",
                "rabbitmq.consumers",
            ] {
                out.push(check(id, false, e.clone()));
            }
            return out;
        }
    };
    out.push(probe("rabbitmq.auth", &r.auth, |o| {
        let text = format!("{}{}", o.stdout, o.stderr);
        if o.exit_code == Some(0) {
            (
                true,
                format!(
                    "user {} authenticates (vhost {}, {})",
                    r.user, r.vhost, r.container
                ),
            )
        } else {
            (
                false,
                format!(
                    "RabbitMQ refuses the services' credentials for user {} (exit {:?}): {}",
                    r.user,
                    o.exit_code,
                    text.trim()
                ),
            )
        }
    }));
    out.push(probe("rabbitmq.guest", &r.users, |users| {
        if users.iter().any(|u| u == "guest") {
            (
                false,
                "the user guest exists (its password is public): `rabbitmqctl delete_user guest`"
                    .into(),
            )
        } else {
            (true, format!("users: {}", users.join(", ")))
        }
    }));
    let public: Vec<String> = r
        .published
        .iter()
        .filter(|p| !is_loopback(&p.host_ip))
        .map(|p| {
            let ip = if p.host_ip.is_empty() {
                "0.0.0.0"
            } else {
                &p.host_ip
            };
            format!("{ip}:{} → {}", p.host_port, p.container_port)
        })
        .collect();
    out.push(if public.is_empty() {
        check(
            "rabbitmq.not_published",
            true,
            "no port published on a non-loopback address",
        )
    } else {
        check(
            "rabbitmq.not_published",
            false,
            format!(
                "{} published on a public address: {}",
                r.container,
                public.join(", ")
            ),
        )
    });
    out.push(probe("rabbitmq.queues", &r.queues, |rows| {
        let mut problems = Vec::new();
        let mut each = Vec::new();
        for q in &f.queues {
            match rows.iter().find(|row| &row.name == q) {
                None => problems.push(format!("queue {q} is not declared on vhost {}", r.vhost)),
                Some(row) if !row.durable || row.auto_delete => problems.push(format!(
                    "queue {q} is not durable (durable {}, auto_delete {}): it is lost when \
                     RabbitMQ restarts",
                    row.durable, row.auto_delete
                )),
                Some(row) => each.push(format!(
                    "{q}: durable {}{}, {} ready, {} unacknowledged",
                    row.kind,
                    args(&row.arguments),
                    row.messages_ready,
                    row.messages_unacknowledged
                )),
            }
        }
        if f.queues.is_empty() {
            problems.push("the web expects no queue".into());
        }
        if problems.is_empty() {
            (true, each.join("; "))
        } else {
            (false, problems.join("; "))
        }
    }));
    out.push(probe("rabbitmq.consumers", &r.queues, |rows| {
        let mut problems = Vec::new();
        let mut each = Vec::new();
        for q in &f.queues {
            let consumers = rows
                .iter()
                .find(|row| &row.name == q)
                .map_or(0, |row| row.consumers);
            let workers = f.workers.get(q).copied().unwrap_or(0);
            if consumers < workers.max(1) as u64 {
                problems.push(format!(
                    "queue {q} has {consumers} consumer(s) for {workers} running worker \
                     container(s) serving it"
                ));
            } else {
                each.push(format!(
                    "{q}: {consumers} consumer(s), {workers} worker container(s)"
                ));
            }
        }
        if problems.is_empty() {
            (true, each.join("; "))
        } else {
            (false, problems.join("; "))
        }
    }));
    out
}

/// A queue's arguments for a reason (` [x-max-priority=10]`), empty when
/// it has none.
fn args(v: &Value) -> String {
    match v {
        Value::Object(m) if !m.is_empty() => format!(
            " [{}]",
            m.iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    v => format!("{k}={v}"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, consumers: u64) -> QueueRow {
        QueueRow {
            name: name.into(),
            durable: true,
            auto_delete: false,
            consumers,
            messages_ready: 3,
            messages_unacknowledged: 1,
            kind: "classic".into(),
            arguments: serde_json::json!([]),
        }
    }

    fn good() -> BrokerFacts {
        BrokerFacts {
            brokers: vec![
                ("web".into(), "amqp"),
                ("worker".into(), "amqp"),
                ("beat".into(), "amqp"),
            ],
            rabbitmq_service: Some("rabbitmq".into()),
            rabbitmq: Some(Ok(RabbitFacts {
                container: "p_rabbitmq_1".into(),
                published: Vec::new(),
                user: "taskstack".into(),
                vhost: "/".into(),
                auth: Ok(ExecOutput {
                    exit_code: Some(0),
                    stdout: String::new(),
                    stderr: String::new(),
                }),
                queues: Ok(vec![row("celery", 2), row("celery.dead", 0)]),
                users: Ok(vec!["taskstack".into()]),
            })),
            queues: vec!["celery".into()],
            workers: [("celery".to_owned(), 2)].into(),
        }
    }

    fn rabbit(f: &mut BrokerFacts) -> &mut RabbitFacts {
        f.rabbitmq
            .as_mut()
            .and_then(|r| r.as_mut().ok())
            .expect("rabbit facts")
    }

    fn failed(f: &BrokerFacts) -> Vec<String> {
        evaluate(f)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.id, c.reason))
            .collect()
    }

    #[test]
    fn a_healthy_rabbitmq_broker_passes_every_check() {
        let checks = evaluate(&good());
        assert_eq!(
            checks.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            [
                "broker.kind",
                "rabbitmq.auth",
                "rabbitmq.guest",
                "rabbitmq.not_published",
                "rabbitmq.queues",
                "rabbitmq.consumers"
            ]
        );
        assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
        assert_eq!(
            checks[4].reason,
            "celery: durable classic, 3 ready, 1 unacknowledged"
        );
        assert_eq!(
            checks[5].reason,
            "celery: 2 consumer(s), 2 worker container(s)"
        );
    }

    #[test]
    fn a_redis_broker_without_rabbitmq_reports_nothing() {
        let f = BrokerFacts {
            brokers: vec![("web".into(), "redis"), ("worker".into(), "redis")],
            ..BrokerFacts::default()
        };
        assert!(evaluate(&f).is_empty());
    }

    #[test]
    fn each_fault_fails_its_own_check() {
        let mut f = good();
        rabbit(&mut f).auth = Ok(ExecOutput {
            exit_code: Some(75),
            stdout: String::new(),
            stderr: "Error: failed to authenticate user \"taskstack\"\n".into(),
        });
        assert_eq!(
            failed(&f),
            [
                "rabbitmq.auth: RabbitMQ refuses the services' credentials for user taskstack \
                 (exit Some(75)): Error: failed to authenticate user \"taskstack\""
            ]
        );

        let mut f = good();
        rabbit(&mut f).users = Ok(vec!["guest".into(), "taskstack".into()]);
        assert_eq!(failed(&f).len(), 1);
        assert!(failed(&f)[0].starts_with("rabbitmq.guest: the user guest exists"));

        let mut f = good();
        rabbit(&mut f).published = vec![Published {
            host_ip: "0.0.0.0".into(),
            host_port: 5672,
            container_port: 5672,
        }];
        assert_eq!(
            failed(&f),
            [
                "rabbitmq.not_published: p_rabbitmq_1 published on a public address: 0.0.0.0:5672 → 5672"
            ]
        );
        rabbit(&mut f).published[0].host_ip = "127.0.0.1".into();
        assert!(failed(&f).is_empty());

        // A transient queue (a Celery client with other options declared it).
        let mut f = good();
        if let Ok(rows) = &mut rabbit(&mut f).queues {
            rows[0].durable = false;
        }
        assert_eq!(
            failed(&f),
            [
                "rabbitmq.queues: queue celery is not durable (durable false, auto_delete false): \
              it is lost when RabbitMQ restarts"
            ]
        );

        // One worker container not consuming.
        let mut f = good();
        f.workers.insert("celery".into(), 3);
        assert_eq!(
            failed(&f),
            [
                "rabbitmq.consumers: queue celery has 2 consumer(s) for 3 running worker \
              container(s) serving it"
            ]
        );

        // The queue is missing altogether.
        let mut f = good();
        f.queues = vec!["reports".into()];
        assert_eq!(
            failed(&f),
            [
                "rabbitmq.queues: queue reports is not declared on vhost /",
                "rabbitmq.consumers: queue reports has 0 consumer(s) for 0 running worker \
                 container(s) serving it"
            ]
        );

        // RabbitMQ could not be asked at all.
        let mut f = good();
        f.rabbitmq = Some(Err("no running container of service rabbitmq".into()));
        let fails = failed(&f);
        assert_eq!(fails.len(), 5, "{fails:?}");
        assert!(
            fails
                .iter()
                .all(|l| l.ends_with("no running container of service rabbitmq"))
        );
    }

    #[test]
    fn the_services_must_agree_and_use_the_rabbitmq_service() {
        let mut f = good();
        f.brokers[2].1 = "redis";
        assert_eq!(
            failed(&f),
            [
                "broker.kind: the services use different brokers (web: amqp, worker: amqp, beat: \
              redis): a task sent by the web would not reach the workers"
            ]
        );

        let f = BrokerFacts {
            brokers: vec![("web".into(), "redis"), ("worker".into(), "redis")],
            rabbitmq_service: Some("rabbitmq".into()),
            ..BrokerFacts::default()
        };
        let fails = failed(&f);
        assert_eq!(fails.len(), 1, "{fails:?}");
        assert!(
            fails[0].starts_with(
                "broker.kind: service rabbitmq runs but no service's broker_url is amqp"
            ),
            "{fails:?}"
        );
    }

    #[test]
    fn queue_arguments_are_shown() {
        assert_eq!(args(&serde_json::json!([])), "");
        assert_eq!(
            args(&serde_json::json!({"x-queue-type": "quorum", "x-max-priority": 10})),
            " [x-max-priority=10, x-queue-type=quorum]"
        );
    }

    #[test]
    fn amqp_urls_give_user_password_and_vhost() {
        assert_eq!(broker_kind("amqp://u@h/%2F"), "amqp");
        assert_eq!(broker_kind("AMQPS://h"), "amqp");
        assert_eq!(broker_kind("redis://redis:6379/0"), "redis");
        assert_eq!(
            credentials("amqp://taskstack:p%40ss@rabbitmq:5672/%2F").expect("url"),
            ("taskstack".into(), Some("p@ss".into()), "/".into())
        );
        assert_eq!(
            credentials("amqp://rabbitmq").expect("url"),
            ("guest".into(), None, "/".into())
        );
        assert_eq!(
            credentials("amqp://u@rabbitmq:5672/jobs").expect("url"),
            ("u".into(), None, "jobs".into())
        );
        assert!(credentials("amqp://u@rabbitmq/%FF").is_err());
    }
}
