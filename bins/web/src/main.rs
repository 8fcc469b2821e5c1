//! `taskstack-web`: the HTTP API (thin main; the service is the crate's library).

fn main() -> std::process::ExitCode {
    taskstack_web::cli::main_from(std::env::args_os())
}
