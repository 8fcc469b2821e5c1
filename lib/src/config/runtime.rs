//! `worker_runtime_threads` and `web_threads`: how many threads run a
//! service's async work.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::num::NonZeroUsize;

/// Threads of a worker's async runtime (`worker_runtime_threads`) or of
/// the web's request serving (`web_threads`, where `auto` is one per CPU:
/// see `Config::web_thread_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeThreads {
    /// For a worker: one thread when every task the worker runs is built-in or declared
    /// (program and HTTP tasks: none of them blocks a thread); otherwise
    /// one per CPU, so a handler of the binary's own that blocks its
    /// thread leaves the others running. tokio's `TOKIO_WORKER_THREADS`,
    /// when set, is used instead.
    #[default]
    Auto,
    /// Exactly this many.
    Fixed(NonZeroUsize),
}

/// The environment variable tokio reads for its thread count.
pub const TOKIO_WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

impl RuntimeThreads {
    /// The thread count to build the runtime with (`None`: tokio's own
    /// choice, `TOKIO_WORKER_THREADS` or one per CPU). `own_tasks`: the
    /// binary registered handlers of its own, which may block a thread.
    /// `tokio_env`: whether `TOKIO_WORKER_THREADS` is set.
    pub fn resolve(self, own_tasks: bool, tokio_env: bool) -> Option<usize> {
        match self {
            Self::Fixed(n) => Some(n.get()),
            Self::Auto if own_tasks || tokio_env => None,
            Self::Auto => Some(1),
        }
    }
}

impl Serialize for RuntimeThreads {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Fixed(n) => s.serialize_u64(u64::try_from(n.get()).unwrap_or(u64::MAX)),
        }
    }
}

impl<'de> Deserialize<'de> for RuntimeThreads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Clone, Copy)]
        struct V;
        impl Visitor<'_> for V {
            type Value = RuntimeThreads;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a number of threads of at least 1")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RuntimeThreads, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(RuntimeThreads::Fixed)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RuntimeThreads, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RuntimeThreads, E> {
                let t = v.trim();
                if t.eq_ignore_ascii_case("auto") {
                    return Ok(RuntimeThreads::Auto);
                }
                t.parse::<u64>()
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
                    .and_then(|n| self.visit_u64(n))
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_one_thread_unless_own_tasks_or_tokios_variable_decide() {
        let auto = RuntimeThreads::Auto;
        assert_eq!(auto.resolve(false, false), Some(1));
        assert_eq!(auto.resolve(true, false), None);
        assert_eq!(auto.resolve(false, true), None);
        let three = RuntimeThreads::Fixed(NonZeroUsize::new(3).expect("3 > 0"));
        assert_eq!(three.resolve(true, true), Some(3));
        assert_eq!(three.resolve(false, false), Some(3));
    }
}
