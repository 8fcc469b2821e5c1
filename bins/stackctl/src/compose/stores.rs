//! Start order for the stores a profile adds. The compose file cannot say
//! "web, worker and beat wait for RabbitMQ (or PostgreSQL) to be healthy"
//! because those services are not in a profile: a `depends_on` naming a
//! service whose profile is off is an error in Compose. So stackctl reads
//! it from the services' own settings instead: a service whose
//! `TASKSTACK_BROKER_URL` or `TASKSTACK_RESULT_BACKEND` names another
//! service of the project as its host starts once that service is healthy
//! (or started, when it has no healthcheck), unless its `depends_on`
//! already says how to wait for it.

use super::{Condition, Service};
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
