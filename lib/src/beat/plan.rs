//! What the leader publishes, and when.
//!
//! Per entry the planner keeps a cursor: every slot at or before it is
//! settled (published, skipped, or older than the entry's record). When a
//! leader takes over it resumes each cursor from the last published slot
//! in Redis; an entry with no record starts at the moment of the takeover.
//!
//! When slots came due since the cursor — one, normally; several after an
//! outage, a failover or a stall — each one that is at most the missed-slot
//! grace old is published once, oldest first; older ones are skipped,
//! logged and counted.

use super::schedule::{Due, Entry};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// What to do about one entry now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Publish `slot`, the entry's oldest unsettled slot (within the grace).
    Publish { entry: usize, slot: DateTime<Utc> },
    /// These due slots are older than the grace: give them up.
    Skip { entry: usize, skipped: Skipped },
}

/// Slots given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Skipped {
    /// How many (0: none).
    pub count: u64,
    /// Counting stopped at [`super::schedule::COUNT_CAP`]; there were more.
    pub at_least: bool,
    /// The latest of them, when there are any.
    pub latest: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Planned {
    /// Every slot at or before this is settled; `None` until resumed.
    cursor: Option<DateTime<Utc>>,
    next: Option<DateTime<Utc>>,
}

/// The leader's per-entry schedule state.
#[derive(Debug, Clone)]
pub struct Planner {
    entries: Vec<Entry>,
    state: Vec<Planned>,
    grace: Duration,
}

impl Planner {
    /// A planner for the enabled ones of `entries`.
    pub fn new(entries: &[Entry], grace: Duration) -> Self {
        let entries: Vec<Entry> = entries.iter().filter(|e| e.enabled).cloned().collect();
        let state = vec![
            Planned {
                cursor: None,
                next: None,
            };
            entries.len()
        ];
        Self {
            entries,
            state,
            grace,
        }
    }

    /// The entries planned (enabled ones), indexed as in [`Decision`].
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Starts (or restarts, after a takeover) from the last published slots
    /// recorded in Redis, one per entry in order (`None`: never published).
    pub fn resume(&mut self, last_ms: &[Option<i64>], now: DateTime<Utc>) {
        for (i, st) in self.state.iter_mut().enumerate() {
            let last = last_ms
                .get(i)
                .copied()
                .flatten()
                .and_then(DateTime::from_timestamp_millis);
            let cursor = last.unwrap_or(now);
            st.cursor = Some(cursor);
            st.next = self.entries[i].spec.next_after(cursor);
        }
    }

    /// Forgets the cursors (on losing leadership: another leader moves them).
    pub fn suspend(&mut self) {
        for st in &mut self.state {
            st.cursor = None;
            st.next = None;
        }
    }

    /// Whether [`Planner::resume`] ran since the last suspension.
    pub fn is_resumed(&self) -> bool {
        self.state.iter().all(|s| s.cursor.is_some())
    }

    /// What is due at `now`, at most one decision per entry (call again
    /// after settling it: a catch-up publishes one slot per call).
    pub fn decide(&self, now: DateTime<Utc>) -> Vec<Decision> {
        let grace = chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX);
        let mut out = Vec::new();
        for (i, st) in self.state.iter().enumerate() {
            let (Some(cursor), Some(next)) = (st.cursor, st.next) else {
                continue;
            };
            if next > now {
                continue;
            }
            let horizon = now - grace;
            if next >= horizon {
                out.push(Decision::Publish {
                    entry: i,
                    slot: next,
                });
                continue;
            }
            // Slots before the horizon are too old; the ones after it are
            // published one by one by the next decisions.
            let Some(Due {
                latest,
                earlier,
                capped,
            }) = self.entries[i]
                .spec
                .due(cursor, horizon - chrono::Duration::milliseconds(1))
            else {
                continue;
            };
            out.push(Decision::Skip {
                entry: i,
                skipped: Skipped {
                    count: earlier + 1,
                    at_least: capped,
                    latest: Some(latest),
                },
            });
        }
        out
    }

    /// Marks every slot of `entry` up to `through` as settled.
    pub fn settled(&mut self, entry: usize, through: DateTime<Utc>) {
        let Some(st) = self.state.get_mut(entry) else {
            return;
        };
        let cursor = st.cursor.map_or(through, |c| c.max(through));
        st.cursor = Some(cursor);
        st.next = self.entries[entry].spec.next_after(cursor);
    }

    /// The earliest next slot of any entry.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.state.iter().filter_map(|s| s.next).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScheduleEntry;

    fn entry(name: &str, every: Option<&str>, cron: Option<&str>) -> Entry {
        Entry::compile(&ScheduleEntry {
            name: name.into(),
            task: "t".into(),
            args: vec![],
            kwargs: serde_json::Map::new(),
            queue: "celery".into(),
            cron: cron.map(str::to_owned),
            every: every.map(|e| humantime::parse_duration(e).expect("duration")),
            timezone: "UTC".into(),
            enabled: true,
            expires: None,
        })
        .expect("compiles")
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_fresh_entry_starts_after_the_takeover() {
        let mut p = Planner::new(&[entry("e", Some("10s"), None)], Duration::from_secs(60));
        let now = at("2026-01-01T00:00:05Z");
        p.resume(&[None], now);
        assert!(
            p.decide(now).is_empty(),
            "the slot at :00 came before we knew"
        );
        assert_eq!(p.next_due(), Some(at("2026-01-01T00:00:10Z")));
        let d = p.decide(at("2026-01-01T00:00:10.003Z"));
        assert_eq!(
            d,
            vec![Decision::Publish {
                entry: 0,
                slot: at("2026-01-01T00:00:10Z"),
            }]
        );
        p.settled(0, at("2026-01-01T00:00:10Z"));
        assert_eq!(p.next_due(), Some(at("2026-01-01T00:00:20Z")));
        assert!(p.decide(at("2026-01-01T00:00:19Z")).is_empty());
    }

    #[test]
    fn missed_slots_within_grace_are_each_published_once_in_order() {
        let mut p = Planner::new(&[entry("e", Some("1s"), None)], Duration::from_secs(60));
        // Last published at :10; the new leader looks at :14.5.
        p.resume(
            &[Some(at("2026-01-01T00:00:10Z").timestamp_millis())],
            at("2026-01-01T00:00:14.5Z"),
        );
        let now = at("2026-01-01T00:00:14.5Z");
        let mut published = Vec::new();
        while let [Decision::Publish { entry: 0, slot }] = p.decide(now)[..] {
            published.push(slot);
            p.settled(0, slot);
        }
        assert_eq!(
            published,
            ["11", "12", "13", "14"].map(|s| at(&format!("2026-01-01T00:00:{s}Z")))
        );
        assert!(p.decide(now).is_empty());
    }

    #[test]
    fn only_slots_older_than_the_grace_are_skipped() {
        let mut p = Planner::new(&[entry("e", Some("1s"), None)], Duration::from_secs(2));
        p.resume(
            &[Some(at("2026-01-01T00:00:10Z").timestamp_millis())],
            at("2026-01-01T00:00:15.5Z"),
        );
        let now = at("2026-01-01T00:00:15.5Z");
        // :11 and :12 are older than 2 s; :14 and :15 are not; :13.5 is the horizon.
        assert_eq!(
            p.decide(now),
            vec![Decision::Skip {
                entry: 0,
                skipped: Skipped {
                    count: 3,
                    at_least: false,
                    latest: Some(at("2026-01-01T00:00:13Z")),
                },
            }]
        );
        p.settled(0, at("2026-01-01T00:00:13Z"));
        assert_eq!(
            p.decide(now),
            vec![Decision::Publish {
                entry: 0,
                slot: at("2026-01-01T00:00:14Z"),
            }]
        );
    }

    #[test]
    fn slots_older_than_the_grace_are_skipped() {
        let mut p = Planner::new(
            &[entry("daily", None, Some("0 3 * * *"))],
            Duration::from_secs(300),
        );
        // Down from before 03:00 until 03:10: the 03:00 slot is 10 minutes old.
        p.resume(
            &[Some(at("2026-01-01T03:00:00Z").timestamp_millis())],
            at("2026-01-02T03:10:00Z"),
        );
        assert_eq!(
            p.decide(at("2026-01-02T03:10:00Z")),
            vec![Decision::Skip {
                entry: 0,
                skipped: Skipped {
                    count: 1,
                    at_least: false,
                    latest: Some(at("2026-01-02T03:00:00Z")),
                },
            }]
        );
        // Down only until 03:04: within the 5-minute grace, published once.
        p.resume(
            &[Some(at("2026-01-01T03:00:00Z").timestamp_millis())],
            at("2026-01-02T03:04:00Z"),
        );
        assert_eq!(
            p.decide(at("2026-01-02T03:04:00Z")),
            vec![Decision::Publish {
                entry: 0,
                slot: at("2026-01-02T03:00:00Z"),
            }]
        );
        p.settled(0, at("2026-01-02T03:00:00Z"));
        assert!(p.decide(at("2026-01-02T03:04:01Z")).is_empty(), "once only");
        assert_eq!(p.next_due(), Some(at("2026-01-03T03:00:00Z")));
    }

    #[test]
    fn a_record_ahead_of_our_clock_is_respected() {
        let mut p = Planner::new(&[entry("e", Some("1s"), None)], Duration::from_secs(60));
        // Another host's clock ran ahead and published :20 already.
        p.resume(
            &[Some(at("2026-01-01T00:00:20Z").timestamp_millis())],
            at("2026-01-01T00:00:18Z"),
        );
        assert!(p.decide(at("2026-01-01T00:00:20Z")).is_empty());
        assert_eq!(p.next_due(), Some(at("2026-01-01T00:00:21Z")));
    }

    #[test]
    fn disabled_entries_are_not_planned_and_suspend_forgets() {
        let mut off = entry("off", Some("1s"), None);
        off.enabled = false;
        let mut p = Planner::new(
            &[off, entry("on", Some("1s"), None)],
            Duration::from_secs(60),
        );
        assert_eq!(p.entries().len(), 1);
        assert_eq!(p.entries()[0].name, "on");
        assert!(!p.is_resumed());
        p.resume(&[None], at("2026-01-01T00:00:00Z"));
        assert!(p.is_resumed());
        p.suspend();
        assert!(!p.is_resumed());
        assert!(p.decide(at("2026-01-01T00:01:00Z")).is_empty());
    }
}
