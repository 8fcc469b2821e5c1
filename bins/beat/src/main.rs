//! `taskstack-beat`: publishes the configured periodic tasks; run several
//! for availability, exactly one leads (thin main; see the library).

/// mimalloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    taskstack_beat::cli::main_from(std::env::args_os())
}
