//! Schedule entries and next-fire maths: when each slot of an entry is.
//!
//! Pure functions of the time they are given (the clock is injected as an
//! argument), so DST transitions and catch-up are tested without waiting.
//!
//! - `every` entries: slots are the multiples of the interval since the Unix
//!   epoch, so every instance agrees on them wherever and whenever it started.
//! - `cron` entries: read in the entry's IANA time zone. Fields are those of
//!   crontab(5) — day of week 0–7 with 0 and 7 Sunday, or names — optionally
//!   preceded by a seconds field. Local times that a DST transition makes
//!   special are handled deliberately:
//!   - *skipped* (spring forward, e.g. 02:30 on 2026-03-08 in New York):
//!     the slot fires once, at the instant the clocks jump (03:00 local);
//!     several skipped slots coalesce into that one;
//!   - *repeated* (fall back, e.g. 01:30 on 2026-11-01 in New York): the slot
//!     fires once, at the first occurrence. Each wall-clock time fires at
//!     most once per day.

use crate::config::ScheduleEntry;
use chrono::{DateTime, Duration as ChronoDuration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use cron::TimeUnitSpec as _;
use serde_json::{Map, Value};
use std::str::FromStr as _;
use std::time::Duration;

/// Shortest `every` interval accepted.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// How many missed slots a catch-up counts one by one before it stops
/// counting (a dense cron schedule over a long outage).
pub const COUNT_CAP: u64 = 100_000;

/// A source of the current time; the beat uses [`SystemClock`], tests pass
/// their own times.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A backend's clock (ms since the epoch) as a schedule clock, so a beat
/// on the in-memory backend follows paused test time.
#[derive(Debug, Clone)]
pub struct BackendClock(pub std::sync::Arc<dyn crate::backend::Clock>);

impl Clock for BackendClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0.now_ms()).unwrap_or_default()
    }
}

/// Why an entry of the configuration does not compile; the configuration
/// loader adds the entry's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` has invalid value {value:?}: {reason}")]
pub struct EntryError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn entry_err(field: &'static str, value: &str, reason: impl Into<String>) -> EntryError {
    EntryError {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// When an entry's slots are.
#[derive(Debug, Clone)]
pub enum Spec {
    /// Multiples of this many milliseconds since the Unix epoch.
    Every { period_ms: i64 },
    /// A cron schedule read in a time zone.
    Cron {
        schedule: Box<cron::Schedule>,
        tz: Tz,
        /// The expression as configured.
        source: String,
    },
}

/// A compiled, validated schedule entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub queue: String,
    pub expires: Option<Duration>,
    pub enabled: bool,
    pub spec: Spec,
}

impl Entry {
    /// Compiles a configured entry; the error names the field at fault.
    pub fn compile(c: &ScheduleEntry) -> Result<Self, EntryError> {
        if c.name.trim().is_empty() {
            return Err(entry_err("name", &c.name, "every entry needs a name"));
        }
        if c.name.chars().any(char::is_control) {
            return Err(entry_err(
                "name",
                &c.name,
                "control characters are not allowed",
            ));
        }
        if c.task.trim().is_empty() {
            return Err(entry_err("task", &c.task, "the task name is required"));
        }
        if c.queue.is_empty()
            || c.queue
                .chars()
                .any(|ch| ch.is_control() || ch.is_whitespace() || ch == ':')
        {
            return Err(entry_err(
                "queue",
                &c.queue,
                "queue names must be non-empty, without spaces, control characters or ':'",
            ));
        }
        if let Some(e) = c.expires
            && e.is_zero()
        {
            return Err(entry_err("expires", "0s", "must be longer than zero"));
        }
        let spec = match (&c.cron, c.every) {
            (Some(_), Some(_)) => {
                return Err(entry_err(
                    "cron",
                    c.cron.as_deref().unwrap_or_default(),
                    "give either `cron` or `every`, not both",
                ));
            }
            (None, None) => {
                return Err(entry_err(
                    "cron",
                    "",
                    "give either `cron` (an expression) or `every` (an interval such as \"30s\")",
                ));
            }
            (None, Some(every)) => {
                if every < MIN_EVERY || every.subsec_nanos() % 1_000_000 != 0 {
                    return Err(entry_err(
                        "every",
                        &humantime::format_duration(every).to_string(),
                        "must be at least 1s, in whole milliseconds",
                    ));
                }
                if c.timezone != "UTC" {
                    return Err(entry_err(
                        "timezone",
                        &c.timezone,
                        "applies to `cron` entries only: `every` slots are multiples of the \
                         interval since the Unix epoch",
                    ));
                }
                Spec::Every {
                    period_ms: i64::try_from(every.as_millis()).map_err(|_| {
                        entry_err(
                            "every",
                            &humantime::format_duration(every).to_string(),
                            "too long",
                        )
                    })?,
                }
            }
            (Some(expr), None) => {
                let tz = Tz::from_str(c.timezone.trim()).map_err(|_| {
                    entry_err(
                        "timezone",
                        &c.timezone,
                        "not an IANA time zone name such as UTC or Europe/Paris",
                    )
                })?;
                let schedule =
                    parse_cron(expr).map_err(|reason| entry_err("cron", expr, reason))?;
                Spec::Cron {
                    schedule: Box::new(schedule),
                    tz,
                    source: expr.clone(),
                }
            }
        };
        Ok(Self {
            name: c.name.clone(),
            task: c.task.clone(),
            args: c.args.clone(),
            kwargs: c.kwargs.clone(),
            queue: c.queue.clone(),
            expires: c.expires,
            enabled: c.enabled,
            spec,
        })
    }
}

/// Parses a crontab(5) expression (5 fields, or 6 with seconds first) into
/// the `cron` crate's form, whose day-of-week numbering differs (1 = Sunday)
/// and which ANDs the two day fields where crontab ORs them.
fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let expr = expr.trim();
    let macro_form = match expr {
        "@yearly" | "@annually" => Some("0 0 1 1 *"),
        "@monthly" => Some("0 0 1 * *"),
        "@weekly" => Some("0 0 * * 0"),
        "@daily" | "@midnight" => Some("0 0 * * *"),
        "@hourly" => Some("0 * * * *"),
        _ => None,
    };
    let expr = macro_form.unwrap_or(expr);
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let (seconds, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        n => {
            return Err(format!(
                "has {n} fields; expected 5 (minute hour day-of-month month day-of-week) \
                 or 6 (seconds first)"
            ));
        }
    };
    let dow = unix_dow_to_crate(rest[4])?;
    let translated = format!(
        "{seconds} {} {} {} {} {dow}",
        rest[0], rest[1], rest[2], rest[3]
    );
    let schedule = cron::Schedule::from_str(&translated).map_err(|e| e.to_string())?;
    if !schedule.days_of_month().is_all() && !schedule.days_of_week().is_all() {
        return Err(
            "restricts both day-of-month and day-of-week; crontab fires when either \
                    matches, other tools when both do: restrict one of them (use two entries \
                    for the other)"
                .into(),
        );
    }
    // The crate knows the years 1970-2100; one that never fires there
    // (February 30th) never fires at all.
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    if schedule.after(&epoch).next().is_none() {
        return Err("never fires".into());
    }
    Ok(schedule)
}

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Rewrites a crontab day-of-week field (0–7, 0 and 7 = Sunday, names,
/// ranges, lists, steps) as an explicit list of day names.
fn unix_dow_to_crate(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_owned());
    }
    let day = |s: &str| -> Result<u32, String> {
        if let Ok(n) = s.parse::<u32>() {
            return if n <= 7 {
                Ok(n % 7)
            } else {
                Err(format!("day of week {n} is outside 0-7"))
            };
        }
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(s))
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| format!("{s:?} is not a day of week (0-7 or SUN-SAT)"))
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((b, s)) => (
                b,
                s.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("step {s:?} is not a positive number"))?,
            ),
            None => (item, 1),
        };
        let (from, to) = if base == "*" {
            (0, 6)
        } else if let Some((a, b)) = base.split_once('-') {
            // 7 as a range end means Sunday at the end of the week.
            let to = if b == "7" { 7 } else { day(b)? };
            (day(a)?, to)
        } else if item.contains('/') {
            (day(base)?, 6)
        } else {
            let d = day(base)?;
            (d, d)
        };
        if from > to {
            return Err(format!(
                "range {base:?} runs backwards; write it as two ranges"
            ));
        }
        let mut d = from;
        while d <= to {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    let names: Vec<&str> = days
        .iter()
        .zip(DAY_NAMES)
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
    Ok(names.join(","))
}

/// Slots that came due in a window: the latest one and how many came
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub latest: DateTime<Utc>,
    /// Slots in the window before `latest`.
    pub earlier: u64,
    /// `earlier` stopped counting at [`COUNT_CAP`].
    pub capped: bool,
}

impl Spec {
    /// The first slot strictly after `t`, or `None` when there is none.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Spec::Every { period_ms } => {
                let ms = t.timestamp_millis();
                let next = ms.div_euclid(*period_ms).checked_add(1)? * period_ms;
                DateTime::from_timestamp_millis(next)
            }
            Spec::Cron { schedule, tz, .. } => cron_next_after(schedule, *tz, t),
        }
    }

    /// The slots `s` with `after < s <= now`, summarised; `None` when none.
    pub fn due(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<Due> {
        let first = self.next_after(after)?;
        if first > now {
            return None;
        }
        match self {
            Spec::Every { period_ms } => {
                let latest_ms = now.timestamp_millis().div_euclid(*period_ms) * period_ms;
                let earlier = (latest_ms - first.timestamp_millis()) / period_ms;
                Some(Due {
                    latest: DateTime::from_timestamp_millis(latest_ms)?,
                    earlier: u64::try_from(earlier).unwrap_or(0),
                    capped: false,
                })
            }
            Spec::Cron { schedule, tz, .. } => {
                let mut latest = first;
                let mut earlier = 0u64;
                while let Some(next) = self.next_after(latest).filter(|n| *n <= now) {
                    latest = next;
                    earlier += 1;
                    if earlier >= COUNT_CAP {
                        // Too many to count one by one: find the latest directly.
                        let latest = cron_latest_at_or_before(schedule, *tz, now)
                            .filter(|l| *l > latest)
                            .unwrap_or(latest);
                        return Some(Due {
                            latest,
                            earlier,
                            capped: true,
                        });
                    }
                }
                Some(Due {
                    latest,
                    earlier,
                    capped: false,
                })
            }
        }
    }
}

/// Most candidates [`cron_next_after`] looks at before giving up (one
/// repeated hour of a per-second schedule is 3,600).
const MAX_STEPS: u32 = 100_000;

/// The first slot of a cron schedule in `tz` strictly after `t`.
///
/// The `cron` crate walks wall-clock (naive) times; each candidate is mapped
/// to an instant by [`to_instant`]. That mapping never decreases as wall
/// time increases, and no wall time at or before `t`'s maps after `t`, so
/// the first candidate that maps after `t` is the answer.
fn cron_next_after(schedule: &cron::Schedule, tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut from = t.with_timezone(&tz).naive_local();
    let mut steps = 0u32;
    'walk: loop {
        for candidate in schedule.after(&from.and_utc()) {
            steps += 1;
            if steps > MAX_STEPS {
                return None;
            }
            let (instant, gap_end) = to_instant(tz, candidate.naive_utc())?;
            if instant > t {
                return Some(instant);
            }
            if let Some(end) = gap_end {
                // Every candidate left inside the gap maps to this same instant.
                from = end - ChronoDuration::seconds(1);
                continue 'walk;
            }
        }
        return None;
    }
}

/// The latest slot of a cron schedule in `tz` at or before `now`: walks
/// wall-clock candidates backwards from a little after `now`'s wall time
/// (a fall-back can put later wall times at earlier instants).
fn cron_latest_at_or_before(
    schedule: &cron::Schedule,
    tz: Tz,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let start = now.with_timezone(&tz).naive_local() + ChronoDuration::hours(3);
    schedule
        .after(&start.and_utc())
        .rev()
        .take(usize::try_from(MAX_STEPS).unwrap_or(usize::MAX))
        .filter_map(|c| to_instant(tz, c.naive_utc()).map(|(i, _)| i))
        .find(|i| *i <= now)
}

/// The instant a wall-clock time in `tz` stands for: its only occurrence;
/// the first one when a fall-back repeats it; the end of the gap (when the
/// clocks jump) when a spring-forward skips it, returned too as a wall time.
fn to_instant(tz: Tz, naive: NaiveDateTime) -> Option<(DateTime<Utc>, Option<NaiveDateTime>)> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(d) => Some((d.with_timezone(&Utc), None)),
        LocalResult::Ambiguous(a, b) => Some((a.min(b).with_timezone(&Utc), None)),
        LocalResult::None => {
            // Gaps are whole minutes long in every zone in use (at most a few
            // hours): step to the first wall-clock minute that exists.
            let mut m = naive.date().and_hms_opt(
                chrono::Timelike::hour(&naive),
                chrono::Timelike::minute(&naive),
                0,
            )?;
            for _ in 0..(48 * 60) {
                m += ChronoDuration::minutes(1);
                match tz.from_local_datetime(&m) {
                    LocalResult::Single(d) => return Some((d.with_timezone(&Utc), Some(m))),
                    LocalResult::Ambiguous(a, b) => {
                        return Some((a.min(b).with_timezone(&Utc), Some(m)));
                    }
                    LocalResult::None => {}
                }
            }
            None
        }
    }
}

/// The time a slot stands for, as it travels in the `beat_slot` header:
/// RFC 3339 in UTC, with milliseconds only when they are not zero.
pub fn format_slot(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests;
