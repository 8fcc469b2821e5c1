//! Everything that crosses a process boundary: the Celery message envelope,
//! the result record, and every Redis key name.

mod encode;
pub mod envelope;
pub mod json;
pub mod keys;
pub mod result;

pub use envelope::{DecodeError, MessageSpec, TaskMessage};
pub use keys::Keys;
pub use result::{ARGS_BOUND, ExceptionInfo, Provenance, TaskResult, TaskState};
