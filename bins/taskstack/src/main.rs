//! `taskstack`: the three services in one binary, for the app image. Run
//! under the name `taskstack-web`, `taskstack-worker` or `taskstack-beat`
//! (a link to this file) it is that service, with exactly the stand-alone
//! binary's command line, healthcheck and exit codes; run as `taskstack`,
//! its first argument names the service (`taskstack worker -Q celery`).
//! One copy of the library instead of three keeps the image small.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// mimalloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: taskstack <web|worker|beat> [ARGS...]
   or: run it as taskstack-web, taskstack-worker or taskstack-beat (a link)

Each service's own help: taskstack <service> --help";

/// Which service a program name or first argument names.
fn service(name: &str) -> Option<&'static str> {
    match name {
        "taskstack-web" | "web" => Some("taskstack-web"),
        "taskstack-worker" | "worker" => Some("taskstack-worker"),
        "taskstack-beat" | "beat" => Some("taskstack-beat"),
        _ => None,
    }
}

fn run(service: &'static str, args: Vec<OsString>) -> ExitCode {
    match service {
        "taskstack-web" => taskstack_web::cli::main_from(args),
        "taskstack-beat" => taskstack_beat::cli::main_from(args),
        _ => taskstack::worker::WorkerMain::new(service, env!("CARGO_PKG_VERSION"), |_| {})
            .run_from(args),
    }
}

/// The service to run and its command line (program name first), or why
/// none was named.
fn dispatch(mut args: Vec<OsString>) -> Result<(&'static str, Vec<OsString>), String> {
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("taskstack")
        .to_owned();
    if let Some(s) = service(&program) {
        args[0] = s.into();
        return Ok((s, args));
    }
    let Some(first) = args.get(1).map(|a| a.to_string_lossy().into_owned()) else {
        return Err("no service named".into());
    };
    match service(&first) {
        Some(s) => {
            args.remove(0);
            args[0] = s.into();
            Ok((s, args))
        }
        None if first == "--help" || first == "-h" => Err(String::new()),
        None => Err(format!("unknown service {first:?}")),
    }
}

fn main() -> ExitCode {
    match dispatch(std::env::args_os().collect()) {
        Ok((service, args)) => run(service, args),
        Err(why) if why.is_empty() => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("taskstack: {why}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_program_name_or_the_first_argument_picks_the_service() {
        let (s, a) = dispatch(args(&["/taskstack-web", "healthcheck"])).expect("web");
        assert_eq!(
            (s, a),
            ("taskstack-web", args(&["taskstack-web", "healthcheck"]))
        );
        let (s, a) = dispatch(args(&["/usr/bin/taskstack", "worker", "-Q", "q"])).expect("worker");
        assert_eq!(
            (s, a),
            ("taskstack-worker", args(&["taskstack-worker", "-Q", "q"]))
        );
        let (s, a) = dispatch(args(&["taskstack", "beat"])).expect("beat");
        assert_eq!((s, a), ("taskstack-beat", args(&["taskstack-beat"])));
    }

    #[test]
    fn no_or_an_unknown_service_is_refused_by_name() {
        assert_eq!(
            dispatch(args(&["taskstack"])),
            Err("no service named".into())
        );
        assert_eq!(
            dispatch(args(&["taskstack", "flower"])),
            Err("unknown service \"flower\"".into())
        );
        assert_eq!(dispatch(args(&["taskstack", "--help"])), Err(String::new()));
    }
}
