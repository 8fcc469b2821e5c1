//! `taskstack-beat`: publishes the configured periodic tasks; run several
//! for availability, exactly one leads (thin main; see the library).

fn main() -> std::process::ExitCode {
    taskstack_beat::cli::main_from(std::env::args_os())
}
