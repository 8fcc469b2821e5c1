//! `taskstack-worker`: runs registered tasks from Celery-protocol queues.
//! The whole program is the library's worker main with no tasks of its own
//! (a team's worker binary is the same call with its tasks added).

/// mimalloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    taskstack::worker::WorkerMain::new("taskstack-worker", env!("CARGO_PKG_VERSION"), |_| {}).run()
}
