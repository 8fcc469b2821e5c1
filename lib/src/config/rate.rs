//! Celery's rate-limit syntax (`celery.utils.time.rate`): `"10/s"`,
//! `"100/m"`, `"5/h"`, a plain number (per second); `"0"`, `0` or an empty
//! string mean no limit.

use serde_json::Value;
use std::time::Duration;

/// A task rate limit: at most `per_second` starts a second on one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    text: String,
}

impl RateLimit {
    /// Parses Celery's syntax; `Ok(None)` is "no limit". The error says
    /// what is wrong with `s` (the caller names the task and key).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let t = s.trim();
        if t.is_empty() {
            return Ok(None);
        }
        let (ops, unit) = t.split_once('/').unwrap_or((t, "s"));
        let per = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?}; write \"10/s\", \"100/m\" or \"5/h\""
                ));
            }
        };
        let n: f64 = ops.trim().parse().map_err(|_| {
            format!("{s:?}: {:?} is not a number; write \"10/s\", \"100/m\", \"5/h\" or a number per second", ops.trim())
        })?;
        if !n.is_finite() || n < 0.0 {
            return Err(format!(
                "{s:?}: the rate must be a finite number, 0 or more"
            ));
        }
        if n == 0.0 {
            return Ok(None);
        }
        Ok(Some(Self {
            per_second: n / per,
            text: t.to_owned(),
        }))
    }

    /// A JSON value as Celery accepts it: a string in the syntax above, a
    /// number (per second), or `null` (no limit).
    pub fn from_value(v: &Value) -> Result<Option<Self>, String> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Self::parse(s),
            Value::Number(n) => Self::parse(&n.to_string()),
            other => Err(format!(
                "{other} is not a rate such as \"10/s\", \"100/m\" or \"5/h\""
            )),
        }
    }

    /// Starts allowed a second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The time between two starts.
    pub fn interval(&self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.per_second).unwrap_or(Duration::MAX)
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn per_second(s: &str) -> Option<f64> {
        RateLimit::parse(s).expect("valid").map(|r| r.per_second())
    }

    #[test]
    fn celery_syntax_is_read_as_celery_reads_it() {
        assert_eq!(per_second("10/s"), Some(10.0));
        assert_eq!(per_second("120/m"), Some(2.0));
        assert_eq!(per_second("7200/h"), Some(2.0));
        assert_eq!(per_second("0.5/s"), Some(0.5));
        assert_eq!(per_second("3"), Some(3.0));
        assert_eq!(per_second(" 4 / s "), Some(4.0));
        assert_eq!(per_second("0"), None);
        assert_eq!(per_second("0/m"), None);
        assert_eq!(per_second(""), None);
        let r = RateLimit::parse("2/s").expect("valid").expect("a limit");
        assert_eq!(r.interval(), Duration::from_millis(500));
        assert_eq!(r.to_string(), "2/s");
    }

    #[test]
    fn json_values_as_the_remote_command_sends_them() {
        let ps = |v: Value| RateLimit::from_value(&v).map(|r| r.map(|r| r.per_second()));
        assert_eq!(ps(json!("100/m")), Ok(Some(100.0 / 60.0)));
        assert_eq!(ps(json!(5)), Ok(Some(5.0)));
        assert_eq!(ps(json!(0.25)), Ok(Some(0.25)));
        assert_eq!(ps(json!(null)), Ok(None));
        assert_eq!(ps(json!(0)), Ok(None));
        assert!(ps(json!([1])).is_err());
    }

    #[test]
    fn bad_syntax_says_what_is_wrong() {
        let e = RateLimit::parse("10/d").expect_err("bad unit");
        assert!(e.contains("unknown unit \"d\""), "{e}");
        let e = RateLimit::parse("ten/s").expect_err("bad number");
        assert!(e.contains("\"ten\" is not a number"), "{e}");
        assert!(RateLimit::parse("-1/s").is_err());
        assert!(RateLimit::parse("inf").is_err());
        assert!(RateLimit::parse("NaN/s").is_err());
    }
}
