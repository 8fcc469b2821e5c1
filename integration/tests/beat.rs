//! Real `taskstack-beat` processes against a real Redis: leader kills
//! (SIGKILL), a frozen leader (SIGSTOP/SIGCONT), graceful handover
//! (SIGTERM), a Redis restart, bad configuration and the healthcheck.
//!
//! The proof is always the queue itself: every message a beat published is
//! read back and counted by its `beat_slot` header.

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;
use redis::Commands as _;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use taskstack_integration::http::get_blocking;
use taskstack_integration::{
    BeatProcess, Prereq, RedisServer, free_port, namespace, require, run_to_exit, wait_until_sync,
};

const QUEUE: &str = "beat-q";

/// A schedule with one `every = "1s"` entry and the given lock TTL.
fn every_second(ttl: &str) -> String {
    format!(
        "beat_lock_ttl = \"{ttl}\"\n\
         [[schedule]]\nname = \"tick\"\ntask = \"proj.tick\"\nevery = \"1s\"\nqueue = \"{QUEUE}\"\n\
         args = [1]\n"
    )
}

/// One published message, as read back from the queue.
#[derive(Debug, Clone)]
struct Published {
    slot: DateTime<Utc>,
    origin: String,
}

/// Every message on the queue, oldest first; each must be a valid Celery
/// message of the entry.
fn published(redis: &RedisServer) -> Result<Vec<Published>> {
    let raw: Vec<String> = redis.conn()?.lrange(QUEUE, 0, -1)?;
    let mut out = Vec::with_capacity(raw.len());
    for payload in raw.iter().rev() {
        let msg = taskstack::proto::envelope::decode(payload)
            .map_err(|(e, _)| anyhow::anyhow!("not a valid task message: {e}"))?;
        assert_eq!(msg.task, "proj.tick");
        assert_eq!(msg.routing_key(), Some(QUEUE));
        let (entry, slot) = taskstack::beat::publish::beat_headers(payload)
            .context("beat_entry / beat_slot headers")?;
        assert_eq!(entry, "tick");
        let v: serde_json::Value = serde_json::from_str(payload)?;
        let origin = v["headers"]["origin"]
            .as_str()
            .context("origin")?
            .to_owned();
        out.push(Published { slot, origin });
    }
    Ok(out)
}

/// Slots published more than once, with their counts.
fn duplicates(msgs: &[Published]) -> BTreeMap<DateTime<Utc>, usize> {
    let mut counts = BTreeMap::new();
    for m in msgs {
        *counts.entry(m.slot).or_insert(0) += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}

/// The largest gap between consecutive published slots.
fn largest_gap(msgs: &[Published]) -> Duration {
    let mut slots: Vec<_> = msgs.iter().map(|m| m.slot).collect();
    slots.sort();
    slots
        .windows(2)
        .map(|w| (w[1] - w[0]).to_std().unwrap_or_default())
        .max()
        .unwrap_or_default()
}

/// Who holds the leader lock: (instance id, pid).
fn leader(redis: &RedisServer, ns: &str) -> Option<(String, u32)> {
    let raw: Option<String> = redis.conn().ok()?.get(format!("{ns}:beat:lock")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&raw?).ok()?;
    Some((
        v["id"].as_str()?.to_owned(),
        u32::try_from(v["pid"].as_u64()?).ok()?,
    ))
}

fn queue_len(redis: &RedisServer) -> usize {
    redis
        .conn()
        .and_then(|mut c| Ok(c.llen::<_, usize>(QUEUE)?))
        .unwrap_or(0)
}

/// Waits until `n` more messages than `from` are on the queue.
fn wait_published(redis: &RedisServer, from: usize, n: usize, deadline: Duration) -> Result<usize> {
    wait_until_sync(
        &format!("{n} more published slots (from {from})"),
        deadline,
        || {
            let len = queue_len(redis);
            (len >= from + n).then_some(len)
        },
    )
}

/// Slots the beats said they gave up (from their JSON logs).
fn skipped_in_logs(beats: &[BeatProcess]) -> u64 {
    beats
        .iter()
        .flat_map(|b| {
            b.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .filter_map(|v| {
            let f = &v["fields"];
            match f["message"].as_str()? {
                "skipping missed slots older than the grace" => f["count"].as_u64(),
                _ => None,
            }
        })
        .sum()
}

/// Watches the queue's length from a thread and measures the longest
/// stretch of wall-clock time in which no new message arrived.
struct ArrivalMonitor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl ArrivalMonitor {
    fn start(redis: &RedisServer) -> Result<Self> {
        let mut conn = redis.conn()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut last_len, mut last_change, mut longest) =
                (0usize, Instant::now(), Duration::ZERO);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let len: usize = conn.llen(QUEUE).unwrap_or(last_len);
                if len != last_len {
                    longest = longest.max(last_change.elapsed());
                    (last_len, last_change) = (len, Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            longest.max(last_change.elapsed())
        });
        Ok(Self { stop, thread })
    }

    /// Stops watching; the longest quiet stretch seen.
    fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(Duration::MAX)
    }
}

/// `healthcheck` of `beat` exits 0 and its verdict mentions `role`.
fn assert_healthy(beat: &BeatProcess, role: &str) -> Result<()> {
    let out = beat.healthcheck()?;
    let said = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said} {err}");
    assert!(said.contains(role), "{said}");
    Ok(())
}

fn logs(beats: &[BeatProcess]) -> String {
    beats
        .iter()
        .map(|b| format!("--- beat pid {}\n{}", b.pid(), b.log()))
        .collect()
}

#[test]
fn leader_killed_three_times_every_slot_published_once() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("beat-kill");
    let toml = every_second("3s");
    let mut beats: Vec<BeatProcess> = (0..3)
        .map(|_| BeatProcess::spawn(&redis.url(), &ns, &toml, &[]))
        .collect::<Result<_>>()?;
    let first =
        wait_published(&redis, 0, 1, Duration::from_secs(30)).with_context(|| logs(&beats))?;
    let started = Instant::now();
    let arrivals = ArrivalMonitor::start(&redis)?;
    let mut leaders = Vec::new();
    let mut graveyard = Vec::new();
    for kill in 0..3 {
        // Let the current leader publish a few slots, then kill it right
        // after one of its publishes (the phase of the lock is independent
        // of the slots', so this is as hard a moment as any).
        let len = wait_published(&redis, queue_len(&redis), 3, Duration::from_secs(30))
            .with_context(|| logs(&beats))?;
        wait_published(&redis, len, 1, Duration::from_secs(5))?;
        let (id, pid) = leader(&redis, &ns).context("a leader holds the lock")?;
        let i = beats
            .iter()
            .position(|b| b.pid() == pid)
            .with_context(|| format!("leader pid {pid} is one of ours"))?;
        beats[i].kill()?;
        leaders.push(id);
        eprintln!(
            "kill {kill}: SIGKILLed leader pid {pid} at {:?}",
            started.elapsed()
        );
        // A replacement joins as a standby, as an orchestrator would restart
        // it; the dead one's log is kept for the accounting below.
        let replacement = BeatProcess::spawn(&redis.url(), &ns, &toml, &[])?;
        graveyard.push(std::mem::replace(&mut beats[i], replacement));
    }
    // Keep going until the run covers at least 30 s and the last leader has
    // published a few slots.
    let len = wait_published(&redis, queue_len(&redis), 3, Duration::from_secs(30))
        .with_context(|| logs(&beats))?;
    wait_until_sync("30 s of publishing", Duration::from_secs(40), || {
        (started.elapsed() >= Duration::from_secs(30)).then_some(())
    })?;
    wait_published(&redis, len, 1, Duration::from_secs(5))?;
    for b in &mut beats {
        b.kill()?;
    }
    graveyard.extend(beats);

    let quiet = arrivals.stop();

    let msgs = published(&redis)?;
    let dups = duplicates(&msgs);
    assert!(dups.is_empty(), "slots published twice: {dups:?}");
    let span = msgs.last().context("messages")?.slot - msgs.first().context("messages")?.slot;
    assert!(span >= chrono::Duration::seconds(30), "window {span}");
    // Every slot of the window was published exactly once: the ones missed
    // while no one led were caught up by the next leader.
    let slots_in_window = usize::try_from(span.num_seconds())? + 1;
    let gap = largest_gap(&msgs);
    assert_eq!(
        (msgs.len(), gap),
        (slots_in_window, Duration::from_secs(1)),
        "every one-second slot of the window, once"
    );
    let skipped = skipped_in_logs(&graveyard);
    assert_eq!(skipped, 0, "no slot was old enough to be skipped");
    // Failover is quick: the queue never went without a new message for
    // longer than the lock TTL (3 s) plus 2 s.
    assert!(
        quiet <= Duration::from_secs(3 + 2),
        "the longest stretch without a publication was {quiet:?}, over TTL + 2 s"
    );
    let origins: std::collections::BTreeSet<_> = msgs.iter().map(|m| &m.origin).collect();
    assert!(origins.len() >= 4, "four leaders in turn: {origins:?}");
    for l in &leaders {
        assert!(origins.contains(l), "killed leader {l} had published");
    }
    eprintln!(
        "{} slots published over {span} (first after {first} message(s)), longest \
         stretch without a publication {quiet:?}, {} leaders",
        msgs.len(),
        origins.len()
    );
    Ok(())
}

#[test]
fn frozen_leader_is_replaced_and_publishes_nothing_after_waking() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("beat-stop");
    let toml = every_second("3s");
    let beats: Vec<BeatProcess> = (0..2)
        .map(|_| BeatProcess::spawn(&redis.url(), &ns, &toml, &[]))
        .collect::<Result<_>>()?;
    wait_published(&redis, 0, 2, Duration::from_secs(30)).with_context(|| logs(&beats))?;
    let (old_id, old_pid) = leader(&redis, &ns).context("a leader")?;
    let old = beats
        .iter()
        .find(|b| b.pid() == old_pid)
        .context("the leader is ours")?;
    let other = beats
        .iter()
        .find(|b| b.pid() != old_pid)
        .context("the standby")?;
    old.signal(Signal::SIGSTOP)?;
    let frozen_at = Utc::now();
    let frozen = Instant::now();

    // The standby takes over once the frozen leader's lease lapses.
    let new_id = wait_until_sync("the standby to take over", Duration::from_secs(15), || {
        leader(&redis, &ns).filter(|(id, _)| *id != old_id)
    })
    .with_context(|| logs(&beats))?
    .0;
    // The leader renews its 3 s lock every second, so the lock lapses 2 to
    // 3 s after the freeze (a little sooner after a late renewal): a
    // takeover well before that would not have waited for it.
    let took_over = frozen.elapsed();
    assert!(
        took_over > Duration::from_millis(1500),
        "the standby took over {took_over:?} after the freeze, before the frozen leader's lock could lapse"
    );
    let len = wait_published(&redis, queue_len(&redis), 3, Duration::from_secs(10))?;
    old.signal(Signal::SIGCONT)?;
    old.wait_log("lost leadership", Duration::from_secs(10))?;
    // The woken one had every chance to publish; the new leader goes on.
    wait_published(&redis, len, 3, Duration::from_secs(10)).with_context(|| logs(&beats))?;
    assert_eq!(
        leader(&redis, &ns).map(|l| l.0).as_deref(),
        Some(new_id.as_str()),
        "the woken leader did not take the lock back"
    );

    let msgs = published(&redis)?;
    let dups = duplicates(&msgs);
    assert!(dups.is_empty(), "slots published twice: {dups:?}");
    let late: Vec<_> = msgs
        .iter()
        .filter(|m| m.origin == old_id && m.slot > frozen_at)
        .collect();
    assert!(
        late.is_empty(),
        "the frozen leader published after it was frozen: {late:?}"
    );
    assert!(msgs.iter().any(|m| m.origin == new_id));
    assert!(other.log().contains("became leader"), "{}", other.log());
    Ok(())
}

#[test]
fn graceful_stop_hands_the_lock_over_at_once() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("beat-term");
    // The default 10 s TTL: a handover by expiry would take 10 s or more.
    let toml = every_second("10s");
    let mut beats: Vec<BeatProcess> = (0..2)
        .map(|_| BeatProcess::spawn(&redis.url(), &ns, &toml, &[]))
        .collect::<Result<_>>()?;
    wait_published(&redis, 0, 2, Duration::from_secs(30)).with_context(|| logs(&beats))?;
    let (old_id, old_pid) = leader(&redis, &ns).context("a leader")?;
    let i = beats
        .iter()
        .position(|b| b.pid() == old_pid)
        .context("ours")?;
    let stopped = Instant::now();
    beats[i].signal(Signal::SIGTERM)?;
    let status = beats[i].wait_exit(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", beats[i].log());
    assert!(beats[i].log().contains("released the leader lock"));
    wait_until_sync("the standby to take over", Duration::from_secs(5), || {
        leader(&redis, &ns).filter(|(id, _)| *id != old_id)
    })
    .with_context(|| logs(&beats))?;
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "handover took {took:?}; the TTL is 10 s"
    );
    let len = queue_len(&redis);
    wait_published(&redis, len, 2, Duration::from_secs(10))?;
    let msgs = published(&redis)?;
    assert!(duplicates(&msgs).is_empty());
    assert!(
        largest_gap(&msgs) <= Duration::from_secs(3),
        "{:?}",
        largest_gap(&msgs)
    );
    eprintln!("handover after SIGTERM took {took:?}");
    Ok(())
}

#[test]
fn redis_restart_keeps_one_leader_and_no_duplicate() -> Result<()> {
    let mut redis = RedisServer::start_persistent()?;
    let ns = namespace("beat-redis");
    let toml = every_second("3s");
    let beats: Vec<BeatProcess> = (0..2)
        .map(|_| BeatProcess::spawn(&redis.url(), &ns, &toml, &[]))
        .collect::<Result<_>>()?;
    wait_published(&redis, 0, 3, Duration::from_secs(30)).with_context(|| logs(&beats))?;
    let before = queue_len(&redis);
    redis.restart()?;
    wait_published(&redis, before, 5, Duration::from_secs(30)).with_context(|| logs(&beats))?;
    assert!(leader(&redis, &ns).is_some(), "the lock is re-established");
    let msgs = published(&redis)?;
    let dups = duplicates(&msgs);
    assert!(dups.is_empty(), "slots published twice: {dups:?}");
    Ok(())
}

fn run_beat(toml: &str, args: &[&str]) -> Result<std::process::Output> {
    run_beat_env(toml, &[], args)
}

fn run_beat_env(toml: &str, env: &[(&str, &str)], args: &[&str]) -> Result<std::process::Output> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("beat.toml");
    std::fs::write(&config, toml)?;
    let mut cmd = BeatProcess::command(
        "redis://127.0.0.1:1/0",
        &namespace("beat-cli"),
        &dir.path().join("beat.json"),
        &config,
    )?;
    cmd.envs(env.iter().copied()).args(args);
    run_to_exit(cmd, Duration::from_secs(20))
}

#[test]
fn bad_schedule_exits_2_naming_entry_and_field() -> Result<()> {
    let entry = |name: &str, rest: &str| {
        format!("[[schedule]]\nname = \"{name}\"\ntask = \"proj.t\"\n{rest}\n")
    };
    let cases = [
        (entry("nightly", "cron = \"61 3 * * *\""), "nightly", "cron"),
        (
            entry(
                "paris",
                "cron = \"0 3 * * *\"\ntimezone = \"Europe/Pariss\"",
            ),
            "paris",
            "timezone",
        ),
        (
            format!(
                "{}{}",
                entry("twice", "every = \"1m\""),
                entry("twice", "every = \"2m\"")
            ),
            "twice",
            "name",
        ),
        (
            "[[schedule]]\nname = \"notask\"\nevery = \"1m\"\n".to_owned(),
            "notask",
            "task",
        ),
        (
            entry("both", "every = \"1m\"\ncron = \"* * * * *\""),
            "both",
            "cron",
        ),
        (entry("neither", ""), "neither", "cron"),
        (entry("slow", "every = \"someday\""), "slow", "every"),
    ];
    for (toml, name, field) in cases {
        let out = run_beat(&toml, &[])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        assert!(
            err.contains(&format!("`{name}`")) && err.contains(&format!("field `{field}`")),
            "{toml}: {err:?} should name entry {name:?} and field {field:?}"
        );
    }
    // A good file loads; `config` shows the entries.
    let out = run_beat(&entry("ok", "cron = \"*/5 * * * *\""), &["config"])?;
    assert_eq!(out.status.code(), Some(0));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["schedule"][0]["cron"], "*/5 * * * *");
    assert_eq!(shown["beat_lock_ttl"], "10s");
    Ok(())
}

#[test]
fn refuses_to_run_as_root_unless_allowed() -> Result<()> {
    require(Prereq::Root);
    let out = run_beat_env("", &[("TASKSTACK_ALLOW_ROOT", "0")], &[])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to run as root"), "{err}");
    Ok(())
}

/// GET /metrics (its body).
fn scrape(port: u16) -> Result<String> {
    let (status, body) = get_blocking(&format!("127.0.0.1:{port}"), "/metrics")?;
    if status != 200 {
        bail!("metrics answered {status}: {body:?}");
    }
    Ok(body)
}

#[test]
fn healthcheck_and_metrics_tell_leader_from_standby() -> Result<()> {
    let redis = RedisServer::start()?;
    let ns = namespace("beat-health");
    let toml = every_second("3s");
    let ports = [free_port()?, free_port()?];
    let listen: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut beats: Vec<BeatProcess> = listen
        .iter()
        .map(|l| {
            BeatProcess::spawn(
                &redis.url(),
                &ns,
                &toml,
                &[("TASKSTACK_BEAT_METRICS_LISTEN", l.as_str())],
            )
        })
        .collect::<Result<_>>()?;
    for b in &beats {
        b.wait_log("beat ready", Duration::from_secs(30))?;
    }
    wait_published(&redis, 0, 1, Duration::from_secs(30))?;
    let (_, leader_pid) = leader(&redis, &ns).context("a leader")?;
    let l = beats
        .iter()
        .position(|b| b.pid() == leader_pid)
        .context("ours")?;
    let s = 1 - l;

    assert_healthy(&beats[l], "leader")?;
    assert_healthy(&beats[s], "standby")?;

    let m = scrape(ports[l])?;
    assert!(m.contains("\ntaskstack_beat_leader 1\n"), "{m}");
    assert!(
        m.contains("taskstack_beat_slots_published_total{entry=\"tick\"}"),
        "{m}"
    );
    let m = scrape(ports[s])?;
    assert!(m.contains("\ntaskstack_beat_leader 0\n"), "{m}");
    assert!(m.contains("taskstack_beat_lock_renewals_total 0\n"), "{m}");

    // The leader gone: its healthcheck fails at once, the standby leads.
    beats[l].kill()?;
    let out = beats[l].healthcheck()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
    wait_until_sync(
        "the standby to report leading",
        Duration::from_secs(15),
        || {
            let out = beats[s].healthcheck().ok()?;
            (out.status.code() == Some(0)
                && String::from_utf8_lossy(&out.stdout).contains("leader:"))
            .then_some(())
        },
    )
    .with_context(|| logs(&beats))?;
    Ok(())
}
