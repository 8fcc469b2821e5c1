//! Redis with a replica and three sentinels (compose profile `ha`): the
//! services `redis` and `redis-replica` start through
//! `compose/redis-ha/node.sh` (each the master or a replica of the node the
//! sentinels name), `sentinel-1..3` through `compose/redis-ha/sentinel.sh`
//! (quorum 2, master name `taskstack`).
//!
//! [`profile_env`]: with the profile on, web, worker and beat reach the
//! master through the sentinels (`redis+sentinel://` for the broker and
//! the result backend, each unless the user chose it) and `redis` starts
//! through `node.sh` (`REDIS_START`). `stackctl verify` then checks the
//! sentinels and the replica ([`crate::verify::ha`]).

use crate::compose::{Env, dotenv};
use std::path::Path;

/// The compose profile.
pub const PROFILE: &str = "ha";
/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "taskstack";
/// The sentinel services, and the replica's.
pub const SENTINELS: [&str; 3] = ["sentinel-1", "sentinel-2", "sentinel-3"];
pub const REPLICA: &str = "redis-replica";
/// What `BROKER_URL` and `RESULT_BACKEND` become when the user set neither:
/// the master the sentinels name, database 0 (its password is the
/// services' `*_PASSWORD_FILE`, the Redis password).
pub const SENTINEL_URL: &str =
    "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/taskstack/0";
/// The sentinels' password: the Redis password (one secret for all).
pub const SENTINEL_PASSWORD_FILE: &str = "/run/secrets/redis_password";
/// How the `redis` service starts with the profile.
pub const REDIS_START: &str = "/usr/local/etc/redis/ha/node.sh";

/// With the profile `ha` enabled in `env` (`COMPOSE_PROFILES`): sets
/// `BROKER_URL` and `RESULT_BACKEND` to [`SENTINEL_URL`], each unless the
/// environment or the `.env` beside `compose_file` sets it (another
/// profile's choice, made before, counts as set); `REDIS_START` to
/// `node.sh` unless set; and, when a URL the services use is then a
/// Sentinel URL, `SENTINEL_PASSWORD_FILE` unless set. Returns a note for
/// the user naming what it set.
pub fn profile_env(env: &mut Env, compose_file: &Path) -> Option<String> {
    if !crate::rabbitmq::profile_enabled(env, PROFILE) {
        return None;
    }
    let dot = dotenv::beside(compose_file);
    let chosen = |env: &Env, key: &str| env.get(key).or_else(|| dot.get(key)).cloned();
    let mut set = Vec::new();
    for (key, value) in [
        ("BROKER_URL", SENTINEL_URL),
        ("RESULT_BACKEND", SENTINEL_URL),
        ("REDIS_START", REDIS_START),
    ] {
        if chosen(env, key).is_none() {
            env.insert(key.into(), value.into());
            set.push(key);
        }
    }
    let through_sentinels = ["BROKER_URL", "RESULT_BACKEND"]
        .iter()
        .any(|k| chosen(env, k).is_some_and(|u| taskstack::config::is_sentinel_url(&u)));
    if through_sentinels && chosen(env, "SENTINEL_PASSWORD_FILE").is_none() {
        env.insert(
            "SENTINEL_PASSWORD_FILE".into(),
            SENTINEL_PASSWORD_FILE.into(),
        );
        set.push("SENTINEL_PASSWORD_FILE");
    }
    if set.is_empty() {
        return None;
    }
    Some(format!(
        "profile {PROFILE}: Redis master `{MASTER_NAME}` through three sentinels \
         ({} set; the sentinels' URL is {SENTINEL_URL})",
        set.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(profiles: &str) -> Env {
        Env::from([("COMPOSE_PROFILES".to_owned(), profiles.to_owned())])
    }

    #[test]
    fn the_profile_points_broker_and_results_at_the_sentinels_unless_chosen() {
        let file = std::env::temp_dir()
            .join(format!("ha-profile-{}", std::process::id()))
            .join("docker-compose.yml");
        let mut off = env("postgres");
        assert_eq!(profile_env(&mut off, &file), None);
        assert!(!off.contains_key("BROKER_URL"));

        let mut on = env("monitoring,ha");
        let note = profile_env(&mut on, &file).expect("a note");
        assert_eq!(on["BROKER_URL"], SENTINEL_URL);
        assert_eq!(on["RESULT_BACKEND"], SENTINEL_URL);
        assert_eq!(on["REDIS_START"], REDIS_START);
        assert_eq!(on["SENTINEL_PASSWORD_FILE"], SENTINEL_PASSWORD_FILE);
        assert!(note.contains("BROKER_URL, RESULT_BACKEND"), "{note}");

        // With RabbitMQ as the broker (its profile set BROKER_URL first),
        // only the results go through the sentinels.
        let mut with_rabbit = env("rabbitmq,ha");
        crate::rabbitmq::profile_env(&mut with_rabbit, &file);
        profile_env(&mut with_rabbit, &file);
        assert!(with_rabbit["BROKER_URL"].starts_with("amqp://"));
        assert_eq!(with_rabbit["RESULT_BACKEND"], SENTINEL_URL);
        assert_eq!(
            with_rabbit["SENTINEL_PASSWORD_FILE"],
            SENTINEL_PASSWORD_FILE
        );

        // Both URLs chosen, neither a Sentinel URL: no sentinel password
        // (the services would refuse one that nothing uses).
        let mut chosen = env("ha");
        chosen.insert("BROKER_URL".into(), "redis://elsewhere:6379/0".into());
        chosen.insert("RESULT_BACKEND".into(), "redis://elsewhere:6379/1".into());
        profile_env(&mut chosen, &file);
        assert_eq!(chosen["BROKER_URL"], "redis://elsewhere:6379/0");
        assert!(!chosen.contains_key("SENTINEL_PASSWORD_FILE"));
        assert_eq!(chosen["REDIS_START"], REDIS_START);
    }
}
