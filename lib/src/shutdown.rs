//! SIGTERM and SIGINT, fed into one cancellation token.

use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal ends the process at once.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Listens for SIGTERM and SIGINT. The first cancels the returned token
/// (graceful shutdown); a second ends the process at once with
/// [`FORCED_EXIT_CODE`] (nothing is lost: held messages return when the
/// lease expires).
pub fn install() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    // Lives as long as the process: it is what ends a stuck shutdown.
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested; send it again to stop at once"
        );
        t.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = name,
            "second signal: exiting now; held messages return when the lease expires"
        );
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(token)
}
