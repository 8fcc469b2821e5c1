//! Built-in tasks for smoke tests and benchmarks.

use super::registry::{Registry, TaskContext, TaskError, TaskOutcome};
use serde_json::{Value, json};
use std::time::Duration;

/// `taskstack.echo`: returns `{"args": [...], "kwargs": {...}}`.
pub const ECHO: &str = "taskstack.echo";
/// `taskstack.add`: the sum of its numeric arguments.
pub const ADD: &str = "taskstack.add";
/// `taskstack.sleep`: sleeps `args[0]` seconds without blocking the worker.
pub const SLEEP: &str = "taskstack.sleep";
/// `taskstack.fail`: fails with `args[0]` as the message.
pub const FAIL: &str = "taskstack.fail";

/// Adds the built-in tasks to `registry`.
pub fn register(registry: &mut Registry) {
    registry
        .register(ECHO, |ctx: TaskContext| async move {
            Ok(json!({ "args": ctx.args, "kwargs": ctx.kwargs }))
        })
        .register(ADD, |ctx: TaskContext| async move { add(&ctx.args) })
        .register(SLEEP, sleep)
        .register(FAIL, |ctx: TaskContext| async move {
            let msg = ctx
                .args
                .first()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_else(|| "taskstack.fail called".into());
            Err(TaskError::fail("RuntimeError", msg))
        });
}

fn add(args: &[Value]) -> TaskOutcome {
    let mut int_sum: i64 = 0;
    let mut float_sum = 0.0;
    let mut any_float = false;
    for (i, a) in args.iter().enumerate() {
        if let Some(n) = a.as_i64() {
            int_sum = int_sum
                .checked_add(n)
                .ok_or_else(|| TaskError::fail("OverflowError", "sum does not fit in 64 bits"))?;
        } else if let Some(f) = a.as_f64() {
            any_float = true;
            float_sum += f;
        } else {
            return Err(TaskError::fail(
                "TypeError",
                format!("argument {i} is {a}, not a number"),
            ));
        }
    }
    Ok(if any_float {
        json!(int_sum as f64 + float_sum)
    } else {
        json!(int_sum)
    })
}

async fn sleep(ctx: TaskContext) -> TaskOutcome {
    let secs = ctx.args.first().and_then(Value::as_f64).unwrap_or(1.0);
    let d = Duration::try_from_secs_f64(secs)
        .map_err(|_| TaskError::fail("ValueError", format!("cannot sleep {secs} seconds")))?;
    tokio::select! {
        () = tokio::time::sleep(d) => Ok(json!(secs)),
        () = ctx.soft_time_limit() => Err(TaskError::Fail(crate::proto::ExceptionInfo::celery(
            "SoftTimeLimitExceeded",
            "soft time limit exceeded while sleeping",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[test]
    fn add_sums_ints_and_floats_and_refuses_the_rest() {
        assert_eq!(add(&[json!(2), json!(3)]), Ok(json!(5)));
        assert_eq!(add(&[json!(2), json!(0.5)]), Ok(json!(2.5)));
        assert_eq!(add(&[]), Ok(json!(0)));
        assert!(matches!(add(&[json!("x")]), Err(TaskError::Fail(e)) if e.exc_type == "TypeError"));
        assert!(
            matches!(add(&[json!(i64::MAX), json!(1)]), Err(TaskError::Fail(e)) if e.exc_type == "OverflowError")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_honours_the_soft_limit() {
        let mut ctx = TaskContext::new(SLEEP, vec![json!(60)], Map::new());
        ctx.soft_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        let out = sleep(ctx).await;
        assert!(matches!(out, Err(TaskError::Fail(e)) if e.exc_type == "SoftTimeLimitExceeded"));
        let ctx = TaskContext::new(SLEEP, vec![json!(0.5)], Map::new());
        assert_eq!(sleep(ctx).await, Ok(json!(0.5)));
    }
}
