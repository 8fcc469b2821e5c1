//! Start order for the stores a profile adds. The compose file cannot say
//! "web, worker and beat wait for RabbitMQ (or PostgreSQL) to be healthy"
//! because those services are not in a profile: a `depends_on` naming a
//! service whose profile is off is an error in Compose. So stackctl reads
//! it from the services' own settings instead: a service whose
//! `TASKSTACK_BROKER_URL` or `TASKSTACK_RESULT_BACKEND` names another
//! service of the project as its host starts once that service is healthy
//! (or started, when it has no healthcheck), unless its `depends_on`
//! already says how to wait for it.
//!
//! The Redis service is not started when no taskstack service keeps
//! anything on Redis (RabbitMQ broker and PostgreSQL results,
//! [`skip_unused_redis`]).

use super::{Condition, Service};
use crate::plan::Role;
use std::collections::BTreeMap;

/// The settings whose URL's host is a store the service needs at start.
const STORE_SETTINGS: [&str; 2] = ["TASKSTACK_BROKER_URL", "TASKSTACK_RESULT_BACKEND"];

/// The host of `url` (`scheme://[user[:pw]@]host[:port][/...]`), if it has
/// one; a Sentinel URL's comma-separated hosts give the first.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hostport.split(',').next()?;
    let host = if let Some(v6) = first.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        first.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Adds to each service the stores its settings name (see the module docs).
pub fn add_store_dependencies(services: &mut BTreeMap<String, Service>) {
    let has_check: BTreeMap<String, bool> = services
        .iter()
        .map(|(n, s)| (n.clone(), s.healthcheck.is_some()))
        .collect();
    for (name, svc) in services.iter_mut() {
        for key in STORE_SETTINGS {
            let Some(host) = svc.environment.get(key).and_then(|u| url_host(u)) else {
                continue;
            };
            let Some(checked) = has_check.get(host) else {
                continue;
            };
            if host == name || svc.depends_on.contains_key(host) {
                continue;
            }
            let condition = if *checked {
                Condition::Healthy
            } else {
                Condition::Started
            };
            svc.depends_on.insert(host.to_owned(), condition);
        }
    }
}

/// Whether the taskstack service `svc` keeps nothing on Redis: its broker
/// is RabbitMQ and its results are in PostgreSQL (`Config::uses_redis` of
/// the library, read from the compose environment; a service whose
/// environment does not set both may read them from its configuration
/// file, so it counts as using Redis).
fn keeps_nothing_on_redis(svc: &Service) -> bool {
    let env = |k: &str| svc.environment.get(k).map(String::as_str);
    let amqp = env("TASKSTACK_BROKER_URL").is_some_and(taskstack::config::is_amqp_url);
    let postgres = env("TASKSTACK_RESULT_BACKEND").is_some_and(taskstack::config::is_postgres_url);
    amqp && postgres
}

/// A taskstack service: web, worker or beat by its command, or any service
/// given a broker URL (e.g. the `app` profile's services).
fn is_taskstack(svc: &Service) -> bool {
    matches!(Role::of(svc), Role::Web | Role::Worker | Role::Beat)
        || svc.environment.contains_key("TASKSTACK_BROKER_URL")
}

/// Removes the Redis services (and every `depends_on` naming them) when
/// there are taskstack services and none of them keeps anything on Redis,
/// and no other service depends on Redis (the `ha` profile's replica and
/// sentinels do: then it stays). Returns the removed services with the
/// reason, for `up` to tell the user.
pub fn skip_unused_redis(services: &mut BTreeMap<String, Service>) -> BTreeMap<String, String> {
    let app: Vec<&Service> = services.values().filter(|s| is_taskstack(s)).collect();
    if app.is_empty() || !app.iter().all(|s| keeps_nothing_on_redis(s)) {
        return BTreeMap::new();
    }
    let unused: Vec<String> = services
        .values()
        .filter(|s| Role::of(s) == Role::Redis)
        .map(|s| s.name.clone())
        .collect();
    let needed = services
        .values()
        .any(|s| !is_taskstack(s) && unused.iter().any(|r| s.depends_on.contains_key(r)));
    if needed {
        return BTreeMap::new();
    }
    let mut skipped = BTreeMap::new();
    for name in unused {
        services.remove(&name);
        for s in services.values_mut() {
            s.depends_on.remove(&name);
        }
        skipped.insert(
            name,
            "no service keeps anything on Redis (broker_url amqp://..., result_backend \
             postgresql://...)"
                .to_owned(),
        );
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_are_read_past_users_ports_and_sentinel_lists() {
        assert_eq!(
            url_host("amqp://taskstack@rabbitmq:5672/%2F"),
            Some("rabbitmq")
        );
        assert_eq!(
            url_host("postgresql://taskstack:pw@postgres:5432/taskstack"),
            Some("postgres")
        );
        assert_eq!(url_host("redis://redis:6379/0"), Some("redis"));
        assert_eq!(
            url_host("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0"),
            Some("s1")
        );
        assert_eq!(url_host("redis://[::1]:6379"), Some("::1"));
        assert_eq!(url_host("redis:///tmp/redis.sock"), None);
        assert_eq!(url_host("not a url"), None);
    }
}
