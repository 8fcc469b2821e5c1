//! Starting the message an idle worker's wait brought, in the take itself.
//!
//! An idle worker's round trip was four waits on Redis in a row: the
//! blocking wait that moves a message to its landing list, the take that
//! records the hold, the start (revocation check and running mark, see
//! [`super::starter`]), and the result with the acknowledgement. The wait's
//! reply carries the message, so when the worker can tell from it that it
//! will run the task at once, the take starts it too
//! ([`crate::backend::Consume::take_starting`]): one wait fewer, and the
//! same atomic exclusion with a revocation as the starter's.
//!
//! "At once" is what the message's own path would find: the same
//! [`super::route::route`] answering `Run` (due, not expired, a registered
//! task), no rate limit, a free concurrency slot (taken here, so nothing
//! else takes it), and no STARTED record to write (`task_track_started`
//! off, starts marked on the broker). Anything else takes the usual path.

use super::handle::{Go, execute, task_span};
use super::registry::{Handler, TaskOptions};
use super::route::{Route, route};
use super::shared::{Held, Shared};
use crate::broker::StartVerdict;
use crate::proto::envelope::{self, TaskMessage};
use crate::proto::keys::queue_of_key;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;

/// A landed message the worker will run at once, decoded, with its task
/// and the concurrency slot it runs in.
pub(super) struct Prestart {
    pub msg: TaskMessage,
    /// The message's length in bytes (how the take recognizes it).
    pub len: usize,
    pub handler: Handler,
    pub options: TaskOptions,
    pub permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Prestart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prestart")
            .field("task_id", &self.msg.id)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The landed message `bytes` as a [`Prestart`], when the worker would run
/// it the moment it holds it; `None` sends it the usual way.
pub(super) fn plan(sh: &Shared, bytes: &[u8]) -> Option<Prestart> {
    if sh.settings.track_started || !sh.backend.marks_starts() || sh.stop.is_cancelled() {
        return None;
    }
    let msg = envelope::decode_bytes(bytes, sh.settings.max_message_size).ok()?;
    let Route::Run(handler, options) = route(sh, &msg) else {
        return None;
    };
    if sh.limits.rate(&msg.task).is_some() {
        return None;
    }
    // Free only when no message waits for a slot (released slots go to
    // waiters first), so this does not jump the line.
    let permit = Arc::clone(&sh.exec).try_acquire_owned().ok()?;
    Some(Prestart {
        msg,
        len: bytes.len(),
        handler,
        options,
        permit,
    })
}

/// Runs a message the take already started: `verdict` is the take's
/// answer for it.
pub(super) async fn run(sh: Arc<Shared>, d: Held, pre: Prestart, verdict: StartVerdict) {
    let queue = queue_of_key(&d.queue_key).to_owned();
    let Prestart {
        msg,
        handler,
        options,
        permit,
        ..
    } = pre;
    let span = task_span(&msg, &queue);
    let track = sh.monitor.received(&msg, &queue);
    let go = Go {
        permit,
        verdict: Some(verdict),
    };
    // Boxed, as in `handle`'s path, and as a trait object: the compiler's
    // proof that the spawned future is `Send` would otherwise nest past
    // its recursion limit.
    let run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(execute(sh, d, queue, msg, handler, options, go, track));
    run.instrument(span).await;
}
