use super::*;
use chrono::{Datelike as _, NaiveDate, Timelike as _};

fn entry_with(f: impl FnOnce(&mut ScheduleEntry)) -> Result<Entry, EntryError> {
    let mut c = ScheduleEntry {
        name: "e".into(),
        task: "proj.tick".into(),
        args: vec![],
        kwargs: Map::new(),
        queue: "celery".into(),
        cron: None,
        every: None,
        timezone: "UTC".into(),
        enabled: true,
        expires: None,
    };
    f(&mut c);
    Entry::compile(&c)
}

fn cron(expr: &str, tz: &str) -> Spec {
    entry_with(|c| {
        c.cron = Some(expr.into());
        c.timezone = tz.into();
    })
    .expect("compiles")
    .spec
}

fn every(d: &str) -> Spec {
    entry_with(|c| c.every = Some(humantime::parse_duration(d).expect("duration")))
        .expect("compiles")
        .spec
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

/// Every slot in [from, to), in order.
fn slots(spec: &Spec, from: &str, to: &str) -> Vec<DateTime<Utc>> {
    let (mut t, to) = (at(from) - ChronoDuration::milliseconds(1), at(to));
    let mut out = Vec::new();
    while let Some(n) = spec.next_after(t).filter(|n| *n < to) {
        assert!(n > t, "slots strictly increase");
        out.push(n);
        t = n;
    }
    out
}

/// A clock that answers a fixed time: what the beat's loop would see.
#[derive(Debug)]
struct Fixed(DateTime<Utc>);
impl Clock for Fixed {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

#[test]
fn intervals_are_aligned_to_the_epoch() {
    let s = every("30s");
    let clock = Fixed(at("2026-05-01T10:00:12.345Z"));
    assert_eq!(s.next_after(clock.now()), Some(at("2026-05-01T10:00:30Z")));
    assert_eq!(
        s.next_after(at("2026-05-01T10:00:30Z")),
        Some(at("2026-05-01T10:01:00Z")),
        "strictly after"
    );
    let s = every("1s");
    assert_eq!(
        slots(&s, "2026-05-01T10:00:00Z", "2026-05-01T10:00:03Z"),
        [
            at("2026-05-01T10:00:00Z"),
            at("2026-05-01T10:00:01Z"),
            at("2026-05-01T10:00:02Z")
        ]
    );
}

#[test]
fn due_summarises_a_window() {
    let s = every("1s");
    assert_eq!(
        s.due(at("2026-05-01T10:00:00Z"), at("2026-05-01T10:00:00.999Z")),
        None
    );
    assert_eq!(
        s.due(at("2026-05-01T10:00:00Z"), at("2026-05-01T10:00:05.2Z")),
        Some(Due {
            latest: at("2026-05-01T10:00:05Z"),
            earlier: 4,
            capped: false
        })
    );
    let c = cron("*/10 * * * *", "UTC");
    assert_eq!(
        c.due(at("2026-05-01T10:00:00Z"), at("2026-05-01T11:05:00Z")),
        Some(Due {
            latest: at("2026-05-01T11:00:00Z"),
            earlier: 5,
            capped: false
        })
    );
}

#[test]
fn five_field_cron_is_read_in_its_time_zone() {
    let s = cron("30 2 * * *", "Europe/Paris");
    // 02:30 in Paris in winter is 01:30 UTC.
    assert_eq!(
        s.next_after(at("2026-01-10T00:00:00Z")),
        Some(at("2026-01-10T01:30:00Z"))
    );
    let s = cron("0 9 * * *", "UTC");
    assert_eq!(
        s.next_after(at("2026-01-10T09:00:00Z")),
        Some(at("2026-01-11T09:00:00Z"))
    );
}

#[test]
fn six_field_cron_has_seconds() {
    let s = cron("*/15 * * * * *", "UTC");
    assert_eq!(
        slots(&s, "2026-01-10T00:00:00Z", "2026-01-10T00:01:00Z"),
        [
            at("2026-01-10T00:00:00Z"),
            at("2026-01-10T00:00:15Z"),
            at("2026-01-10T00:00:30Z"),
            at("2026-01-10T00:00:45Z")
        ]
    );
    let s = cron("5 0 12 * * *", "UTC");
    assert_eq!(
        s.next_after(at("2026-01-10T00:00:00Z")),
        Some(at("2026-01-10T12:00:05Z"))
    );
}

#[test]
fn day_of_week_follows_crontab_numbering() {
    // 2026-01-03 is a Saturday; crontab's 1-5 is Monday to Friday.
    let s = cron("0 9 * * 1-5", "UTC");
    assert_eq!(
        s.next_after(at("2026-01-03T00:00:00Z")),
        Some(at("2026-01-05T09:00:00Z"))
    );
    for sunday in ["0 9 * * 0", "0 9 * * 7", "0 9 * * sun", "0 9 * * SUN"] {
        assert_eq!(
            cron(sunday, "UTC").next_after(at("2026-01-03T00:00:00Z")),
            Some(at("2026-01-04T09:00:00Z")),
            "{sunday}"
        );
    }
    // 5-7: Friday, Saturday, Sunday.
    let fri_to_sun = slots(
        &cron("0 9 * * 5-7", "UTC"),
        "2026-01-05T00:00:00Z",
        "2026-01-12T00:00:00Z",
    );
    assert_eq!(
        fri_to_sun,
        [
            at("2026-01-09T09:00:00Z"),
            at("2026-01-10T09:00:00Z"),
            at("2026-01-11T09:00:00Z")
        ]
    );
    // */2 from Sunday: Sunday, Tuesday, Thursday, Saturday.
    let every_other = slots(
        &cron("0 9 * * */2", "UTC"),
        "2026-01-04T00:00:00Z",
        "2026-01-11T00:00:00Z",
    );
    let days: Vec<u32> = every_other.iter().map(|t| t.day()).collect();
    assert_eq!(days, [4, 6, 8, 10]);
    assert_eq!(
        slots(
            &cron("@daily", "UTC"),
            "2026-01-04T00:00:00Z",
            "2026-01-06T00:00:00Z"
        ),
        [at("2026-01-04T00:00:00Z"), at("2026-01-05T00:00:00Z")]
    );
}

/// Slots of `spec` whose local date in `tz` is `date`.
fn on_local_date(spec: &Spec, tz: Tz, date: NaiveDate) -> Vec<DateTime<Utc>> {
    let from = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc() - ChronoDuration::days(1);
    slots(
        spec,
        &from.to_rfc3339(),
        &(from + ChronoDuration::days(3)).to_rfc3339(),
    )
    .into_iter()
    .filter(|s| s.with_timezone(&tz).date_naive() == date)
    .collect()
}

#[test]
fn spring_forward_fires_a_skipped_time_once_when_the_clocks_jump() {
    let tz: Tz = "America/New_York".parse().expect("zone");
    let s = cron("30 2 * * *", "America/New_York");
    let day = NaiveDate::from_ymd_opt(2026, 3, 8).expect("date");
    // 02:30 does not exist on 2026-03-08: clocks go from 02:00 EST to 03:00 EDT.
    assert_eq!(
        on_local_date(&s, tz, day),
        [at("2026-03-08T07:00:00Z")],
        "once, at 03:00 EDT"
    );
    // The days around it are ordinary.
    assert_eq!(
        s.next_after(at("2026-03-06T12:00:00Z")),
        Some(at("2026-03-07T07:30:00Z")),
        "02:30 EST"
    );
    assert_eq!(
        s.next_after(at("2026-03-08T07:00:00Z")),
        Some(at("2026-03-09T06:30:00Z")),
        "02:30 EDT"
    );
    // Several skipped times coalesce into the jump: per-minute in the gap.
    let m = cron("* 2 * * *", "America/New_York");
    assert_eq!(on_local_date(&m, tz, day), [at("2026-03-08T07:00:00Z")]);
    // An hourly job keeps its other hours.
    let h = cron("30 * * * *", "America/New_York");
    let around: Vec<_> = slots(&h, "2026-03-08T05:00:00Z", "2026-03-08T08:00:00Z");
    assert_eq!(
        around,
        [
            at("2026-03-08T05:30:00Z"), // 00:30 EST
            at("2026-03-08T06:30:00Z"), // 01:30 EST
            at("2026-03-08T07:00:00Z"), // 02:30 skipped: fires at the jump
            at("2026-03-08T07:30:00Z"), // 03:30 EDT
        ]
    );
}

#[test]
fn fall_back_fires_a_repeated_time_once_at_its_first_occurrence() {
    let tz: Tz = "America/New_York".parse().expect("zone");
    let day = NaiveDate::from_ymd_opt(2026, 11, 1).expect("date");
    // 02:30 exists once on 2026-11-01 (after the repeat), as EST.
    let s = cron("30 2 * * *", "America/New_York");
    assert_eq!(on_local_date(&s, tz, day), [at("2026-11-01T07:30:00Z")]);
    // 01:30 happens twice (EDT, then EST): it fires at the first.
    let s = cron("30 1 * * *", "America/New_York");
    assert_eq!(on_local_date(&s, tz, day), [at("2026-11-01T05:30:00Z")]);
    // Asked during the second pass, the next 01:30 is tomorrow's.
    assert_eq!(
        s.next_after(at("2026-11-01T06:10:00Z")),
        Some(at("2026-11-02T06:30:00Z"))
    );
    // A per-minute job in the repeated hour fires each wall-clock minute once.
    let m = cron("* 1 * * *", "America/New_York");
    let fired = on_local_date(&m, tz, day);
    assert_eq!(fired.len(), 60);
    assert_eq!(fired.first(), Some(&at("2026-11-01T05:00:00Z")));
    assert_eq!(fired.last(), Some(&at("2026-11-01T05:59:00Z")));
}

#[test]
fn a_daily_job_fires_once_every_local_day_of_a_year_in_dst_zones() {
    for zone in ["America/New_York", "Europe/London", "Australia/Lord_Howe"] {
        let tz: Tz = zone.parse().expect("zone");
        for time in ["30 2 * * *", "30 1 * * *", "0 0 * * *"] {
            let s = cron(time, zone);
            let all = slots(&s, "2026-01-01T12:00:00Z", "2027-01-01T12:00:00Z");
            let mut days: Vec<NaiveDate> = all
                .iter()
                .map(|t| t.with_timezone(&tz).date_naive())
                .collect();
            let n = days.len();
            days.dedup();
            assert_eq!(days.len(), n, "{zone} {time}: at most once a day");
            assert!((365..=366).contains(&n), "{zone} {time}: {n} days");
        }
    }
    // Lord Howe moves by 30 minutes: 02:15 is skipped on 2026-10-04.
    let s = cron("15 2 * * *", "Australia/Lord_Howe");
    let t = s.next_after(at("2026-10-03T12:00:00Z")).expect("slot");
    let local = t.with_timezone(&"Australia/Lord_Howe".parse::<Tz>().expect("zone"));
    assert_eq!(
        (local.hour(), local.minute()),
        (2, 30),
        "at the jump, 02:30"
    );
}

type Edit = Box<dyn Fn(&mut ScheduleEntry)>;

#[test]
fn entries_are_validated_field_by_field() {
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|c| c.cron = Some("61 * * * *".into())),
            "cron",
            "61 * * * *",
        ),
        (
            Box::new(|c| c.cron = Some("* * * *".into())),
            "cron",
            "4 fields",
        ),
        (
            Box::new(|c| c.cron = Some("0 0 0 * * * 2026".into())),
            "cron",
            "7 fields",
        ),
        (
            Box::new(|c| c.cron = Some("0 9 * * funday".into())),
            "cron",
            "funday",
        ),
        (
            Box::new(|c| c.cron = Some("0 9 1 * MON".into())),
            "cron",
            "both day-of-month",
        ),
        (
            Box::new(|c| c.cron = Some("0 0 30 2 *".into())),
            "cron",
            "never fires",
        ),
        (
            Box::new(|c| {
                c.cron = Some("0 9 * * *".into());
                c.timezone = "Mars/Olympus_Mons".into();
            }),
            "timezone",
            "Mars/Olympus_Mons",
        ),
        (
            Box::new(|c| {
                c.cron = Some("0 9 * * *".into());
                c.every = Some(Duration::from_secs(5));
            }),
            "cron",
            "not both",
        ),
        (Box::new(|_| {}), "cron", "either"),
        (
            Box::new(|c| {
                c.every = Some(Duration::from_secs(5));
                c.task = String::new();
            }),
            "task",
            "required",
        ),
        (
            Box::new(|c| {
                c.every = Some(Duration::from_secs(5));
                c.name = String::new();
            }),
            "name",
            "needs a name",
        ),
        (
            Box::new(|c| c.every = Some(Duration::from_millis(500))),
            "every",
            "at least 1s",
        ),
        (
            Box::new(|c| {
                c.every = Some(Duration::from_secs(5));
                c.timezone = "Europe/Paris".into();
            }),
            "timezone",
            "cron` entries only",
        ),
        (
            Box::new(|c| {
                c.every = Some(Duration::from_secs(5));
                c.queue = "a b".into();
            }),
            "queue",
            "a b",
        ),
    ];
    for (f, field, needle) in cases {
        let e = entry_with(f).expect_err(needle);
        assert_eq!(e.field, field, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle:?}"
        );
    }
}

#[test]
fn slot_headers_are_rfc3339_utc() {
    assert_eq!(
        format_slot(at("2026-03-08T07:00:00Z")),
        "2026-03-08T07:00:00Z"
    );
    assert_eq!(
        format_slot(at("2026-03-08T07:00:00.250Z")),
        "2026-03-08T07:00:00.250Z"
    );
}
