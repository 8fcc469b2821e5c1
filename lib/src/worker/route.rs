//! Where a decoded message goes first: run, park until its ETA, record
//! as expired, or dead-letter.

use super::registry::{Handler, Registry, TaskOptions};
use super::shared::Shared;
use crate::proto::envelope::TaskMessage;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// An ETA closer than this is treated as due (clock reads differ slightly).
const ETA_TOLERANCE: Duration = Duration::from_millis(100);

/// Where a decoded message goes first, decided without side effects:
/// its own path acts on the answer, and the prestart asks the same
/// question before the take (`Run` with no rate limit is "at once").
pub(super) enum Route {
    /// Expired before it ran: recorded REVOKED.
    Expired(DateTime<Utc>),
    /// An ETA more than `max_task_delay` ahead: dead-lettered.
    TooFar(DateTime<Utc>),
    /// Not due yet: parked in Redis until its ETA.
    NotDue(DateTime<Utc>),
    /// Not registered in this worker: dead-lettered.
    Unknown,
    /// Runs, once its rate limit (if any) admits it.
    Run(Handler, TaskOptions),
}

/// Where `msg` goes now (see [`Route`]).
pub(super) fn route(sh: &Shared, msg: &TaskMessage) -> Route {
    decide(msg, sh.now(), sh.settings.max_task_delay, &sh.registry)
}

fn decide(msg: &TaskMessage, now: DateTime<Utc>, max_delay: Duration, tasks: &Registry) -> Route {
    let ahead = |limit: Duration| {
        msg.eta
            .filter(|eta| *eta - now > chrono::Duration::from_std(limit).unwrap_or_default())
    };
    if let Some(exp) = msg.expires.filter(|exp| *exp <= now) {
        return Route::Expired(exp);
    }
    if let Some(eta) = ahead(max_delay) {
        return Route::TooFar(eta);
    }
    if let Some(eta) = ahead(ETA_TOLERANCE) {
        return Route::NotDue(eta);
    }
    match tasks.get(&msg.task) {
        Some((handler, options)) => Route::Run(handler, options),
        None => Route::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{MessageSpec, envelope};

    fn message(
        task: &str,
        eta_ms: Option<i64>,
        expires_ms: Option<i64>,
        now: DateTime<Utc>,
    ) -> TaskMessage {
        let at = |ms: i64| now + chrono::Duration::milliseconds(ms);
        let raw = envelope::encode(&MessageSpec {
            id: "t1",
            task,
            queue: "celery",
            origin: "test",
            eta: eta_ms.map(at),
            expires: expires_ms.map(at),
            ..Default::default()
        });
        envelope::decode_bytes(raw.as_bytes(), 1 << 20).expect("decodes")
    }

    fn kind(r: &Route) -> &'static str {
        match r {
            Route::Expired(_) => "expired",
            Route::TooFar(_) => "too far",
            Route::NotDue(_) => "not due",
            Route::Unknown => "unknown",
            Route::Run(..) => "run",
        }
    }

    #[test]
    fn each_message_gets_the_first_route_that_applies() {
        let mut tasks = Registry::new();
        tasks.register("t.ok", |_| async { Ok(serde_json::Value::Null) });
        let now = "2026-01-01T00:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        let day = Duration::from_secs(86_400);
        let cases = [
            // (task, eta ms ahead, expires ms ahead, max delay, route)
            ("t.ok", None, None, day, "run"),
            ("t.ok", Some(50), None, day, "run"),
            ("t.ok", Some(-5_000), None, day, "run"),
            ("t.ok", Some(150), None, day, "not due"),
            ("t.ok", Some(2_000), None, Duration::from_secs(1), "too far"),
            // A delay limit below the tolerance still refuses first.
            ("t.ok", Some(50), None, Duration::from_millis(10), "too far"),
            ("t.ok", None, Some(0), day, "expired"),
            ("t.ok", Some(150), Some(-1), day, "expired"),
            ("t.ok", None, Some(1_000), day, "run"),
            ("t.missing", None, None, day, "unknown"),
            ("t.missing", Some(150), None, day, "not due"),
        ];
        for (task, eta, expires, max_delay, want) in cases {
            let msg = message(task, eta, expires, now);
            let got = decide(&msg, now, max_delay, &tasks);
            assert_eq!(
                kind(&got),
                want,
                "{task} eta {eta:?} expires {expires:?} max {max_delay:?}"
            );
        }
    }
}
