//! `taskstack-web`: the HTTP API (thin main; the service is the crate's library).

/// mimalloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    taskstack_web::cli::main_from(std::env::args_os())
}
