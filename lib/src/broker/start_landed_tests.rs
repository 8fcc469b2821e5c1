//! `fetch.lua` starting the message a blocking wait landed (see
//! `worker::prestart`), against a real `redis-server`.

use super::test_support::{calls, cmd, lane, record_pending, take};
use super::*;
use crate::test_redis::server;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(1);

/// A message naming task `id` (as a Celery message does, among much else).
fn message(id: &str) -> String {
    format!(r#"{{"headers":{{"id":"{id}"}},"body":"e30="}}"#)
}

/// Pushes `id`'s message and lets worker `w1`'s blocking wait land it.
async fn land(l: &mut Lane, keys: &Keys, id: &str) -> Vec<u8> {
    cmd::<()>(l, redis::cmd("LPUSH").arg("q").arg(message(id))).await;
    wait_for_message(l, keys, "w1", "q", WAIT)
        .await
        .expect("wait")
        .expect("a message landed")
}

async fn mark(l: &mut Lane, keys: &Keys, id: &str) -> Option<u64> {
    cmd(l, redis::cmd("HGET").arg(keys.running("w1")).arg(id)).await
}

async fn marks(l: &mut Lane, keys: &Keys) -> u64 {
    cmd(l, redis::cmd("HLEN").arg(keys.running("w1"))).await
}

#[tokio::test]
async fn the_take_starts_the_landed_message_in_the_same_step_as_its_hold() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];
    let ttl = Duration::from_secs(60);
    let revoked = r#"{"status":"REVOKED"}"#;

    // Landed and started: no start.lua (its SMISMEMBER), and the
    // mark names the hold, so a revocation is refused as for a started task.
    record_pending(&mut l, &["a"]).await;
    let bytes = land(&mut l, &keys, "a").await;
    cmd::<()>(&mut l, redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let start = StartLanded {
        task_id: "a",
        len: bytes.len(),
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 0), start)
        .await
        .expect("fetch");
    assert_eq!(verdict, Some(StartVerdict::Run));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, bytes);
    assert_eq!(calls(&mut l, "smismember").await, 0);
    assert_eq!(mark(&mut l, &keys, "a").await, Some(got[0].seq));
    let out = revoke(&mut l, &keys, "a", revoked, ttl, true).await;
    assert_eq!(
        out.expect("revoke"),
        RevokeOutcome::Refused(crate::proto::TaskState::Started)
    );
    // The acknowledgement takes the mark with the hold, as after start.lua.
    let done = [Settle {
        seq: got[0].seq,
        result: None,
        started: Some("a".into()),
    }];
    settle(&mut l, None, &keys, "w1", &done, &|_| None, ttl)
        .await
        .expect("settle");
    assert_eq!(mark(&mut l, &keys, "a").await, None);

    // Revoked before it landed: held (so the worker acknowledges it), not
    // marked.
    record_pending(&mut l, &["b"]).await;
    let out = revoke(&mut l, &keys, "b", revoked, ttl, true).await;
    assert_eq!(out.expect("revoke"), RevokeOutcome::Revoked);
    let bytes = land(&mut l, &keys, "b").await;
    let start = StartLanded {
        task_id: "b",
        len: bytes.len(),
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 10), start)
        .await
        .expect("fetch");
    assert_eq!(verdict, Some(StartVerdict::Revoked));
    assert_eq!(got.len(), 1);
    assert_eq!(mark(&mut l, &keys, "b").await, None);
    let held: bool = cmd(
        &mut l,
        redis::cmd("HEXISTS")
            .arg(keys.inflight("w1"))
            .arg(got[0].seq),
    )
    .await;
    assert!(held, "a revoked message stays held until acknowledged");
}

#[tokio::test]
async fn the_take_starts_nothing_unless_the_landing_list_holds_exactly_that_message() {
    let s = server();
    let mut l = lane(&s);
    let keys = Keys::new("ns");
    let qk = vec!["q".to_string()];

    // Two landed (a wait whose reply was lost, then another): neither is
    // started, both are taken.
    let _ = land(&mut l, &keys, "c").await;
    let bytes = land(&mut l, &keys, "d").await;
    let start = StartLanded {
        task_id: "d",
        len: bytes.len(),
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 0), start)
        .await
        .expect("fetch");
    assert_eq!(verdict, None);
    assert_eq!(got.len(), 2);
    assert_eq!(marks(&mut l, &keys).await, 0);

    // Another message's length, or another task's id: not started.
    let bytes = land(&mut l, &keys, "e").await;
    let start = StartLanded {
        task_id: "e",
        len: bytes.len() + 1,
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 10), start)
        .await
        .expect("fetch");
    assert_eq!((got.len(), verdict), (1, None));
    let bytes = land(&mut l, &keys, "f").await;
    let start = StartLanded {
        task_id: "g",
        len: bytes.len(),
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 20), start)
        .await
        .expect("fetch");
    assert_eq!((got.len(), verdict), (1, None));

    // Nothing landed (the message is on its queue): taken, not started.
    cmd::<()>(&mut l, redis::cmd("LPUSH").arg("q").arg(message("h"))).await;
    let start = StartLanded {
        task_id: "h",
        len: message("h").len(),
    };
    let (got, verdict) = fetch_starting(&mut l, &keys, take(&qk, 4, 30), start)
        .await
        .expect("fetch");
    assert_eq!((got.len(), verdict), (1, None));
    assert_eq!(marks(&mut l, &keys).await, 0);
}
