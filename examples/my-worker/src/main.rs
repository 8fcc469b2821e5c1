//! `my-worker`: taskstack's worker with this crate's tasks added. It has the
//! stock `taskstack-worker`'s whole command line (`--help`, `healthcheck`,
//! `config`, `tasks`), configuration, metrics, signals and exit codes.

/// The allocator of taskstack's own binaries (optional: remove these lines
/// and the dependency to keep the system's).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    taskstack::worker::WorkerMain::new(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        my_worker::register,
    )
    .run()
}
