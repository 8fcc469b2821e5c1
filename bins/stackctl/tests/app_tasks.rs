//! Issue 12's third door, in containers and offline: a team's app image
//! (examples/python-app) carrying taskstack's worker, run by the compose
//! file's profile `app` as `app` (the web app serving an HTTP task) and
//! `app-worker` (taskstack-worker inside that image, running a program
//! task with the image's Python and the HTTP task against `app` over the
//! stack's network), both tasks sent through the web API.
//!
//! The app image is built without a registry the way stackctl builds the
//! Redis image: a `FROM scratch` base holding the host's Debian `python3`,
//! its standard library and the libraries `ldd` lists (a stand-in for
//! `python:3.12-slim`), then the example's Dockerfile lines that copy
//! `/taskstack` in, taken literally from examples/python-app/Dockerfile.
//! `docker-compose --profile app ps` must list the same containers healthy.
//! Its own project, secrets and tags; the project is taken down
//! (`docker-compose down -v`, then `stackctl down -v`) and the four images
//! removed, even after a failure.

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use stackctl::build::{APP_REPOSITORY, REDIS_REPOSITORY};
use stackctl::rootfs::{Rootfs, append_file};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use taskstack_integration::docker::{
    ComposeProject, StackctlDown, output_text as text, run_stackctl, unique, workspace_root,
};
use taskstack_integration::http::request;
use taskstack_integration::{Prereq, free_port, require, wait_until};

/// Debian's interpreter: its standard library is at a fixed place.
const PYTHON: &str = "/usr/bin/python3";
/// The lines of the example's Dockerfile between these markers are what a
/// team adds to its own Dockerfile.
const SNIPPET_START: &str = "# --- taskstack: copy these lines";
const SNIPPET_END: &str = "# -------";

fn stackctl(args: &[&str], env: &[(&str, String)]) -> Result<Output> {
    run_stackctl(env!("CARGO_BIN_EXE_stackctl"), args, env)
}

/// Where `python` keeps its standard library (with lib-dynload inside, as
/// on Debian).
fn stdlib_of(python: &str) -> Result<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('stdlib'))",
        ])
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    ensure!(out.status.success(), "{python}: {}", text(&out));
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Parts of the standard library the app never imports (and the 25 MB of
/// the static libpython for embedding).
fn skipped(name: &str) -> bool {
    name == "__pycache__"
        || name.starts_with("config-")
        || matches!(
            name,
            "test"
                | "idlelib"
                | "tkinter"
                | "turtledemo"
                | "lib2to3"
                | "ensurepip"
                | "pydoc_data"
                | "distutils"
                | "site-packages"
                | "dist-packages"
        )
}

/// Adds the tree `dir` at the same path; shared objects with their libraries.
fn add_tree(fs: &mut Rootfs, dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if skipped(&name) {
            continue;
        }
        let path = entry.path();
        // Links are followed (Debian's sitecustomize.py is one); a dangling
        // one is left out.
        let Ok(kind) = std::fs::metadata(&path) else {
            continue;
        };
        if kind.is_dir() {
            add_tree(fs, &path)?;
        } else if name.ends_with(".so") {
            fs.binary_with_libs(&path, &path.display().to_string())?;
        } else if kind.is_file() {
            fs.file(&path, std::fs::read(&path)?, 0o644);
        }
    }
    Ok(())
}

/// The example app's files (`app.py`, `reports/`) under `/app`.
fn add_app(fs: &mut Rootfs, example: &Path) -> Result<()> {
    for rel in ["app.py", "reports/__init__.py", "reports/render.py"] {
        let data = std::fs::read(example.join(rel)).with_context(|| rel.to_owned())?;
        fs.file(&Path::new("/app").join(rel), data, 0o644);
    }
    Ok(())
}

/// `localhost/...:<tag>` built from a context holding `dockerfile` and,
/// when given, `fs` as `rootfs/`.
async fn build(tag: &str, dockerfile: &str, fs: Option<&Rootfs>) -> Result<()> {
    let mut tar = tar::Builder::new(Vec::new());
    append_file(&mut tar, "Dockerfile", dockerfile.as_bytes(), 0o644)?;
    if let Some(fs) = fs {
        fs.append_to(&mut tar, "rootfs")?;
    }
    let docker = stackctl::docker::connect().await?;
    stackctl::docker::build_image(&docker, tag, tar.into_inner()?).await?;
    Ok(())
}

/// The example Dockerfile's taskstack lines, with the app image's tag.
fn snippet(example: &Path, app_image: &str) -> Result<String> {
    let dockerfile = std::fs::read_to_string(example.join("Dockerfile"))?;
    let lines: Vec<&str> = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with(SNIPPET_START))
        .skip(1)
        .take_while(|l| !l.starts_with(SNIPPET_END))
        .collect();
    ensure!(
        lines.iter().any(|l| l.starts_with("COPY --from=")),
        "no COPY --from between the markers of examples/python-app/Dockerfile"
    );
    Ok(lines
        .join("\n")
        .replace("localhost/taskstack:local", app_image))
}

/// Sends `body` through the web API and waits for the task's end.
async fn run_task(addr: &str, token: &str, body: Value) -> Result<Value> {
    let (status, reply) = request(addr, "POST", "/api/v1/tasks", Some(token), Some(&body)).await?;
    ensure!(status == 202, "POST /api/v1/tasks {body}: {status} {reply}");
    let id = reply["id"].as_str().context("no task id")?.to_owned();
    let path = format!("/api/v1/tasks/{id}");
    let path = path.as_str();
    wait_until(
        "the task to finish",
        Duration::from_secs(60),
        || async move {
            let (status, reply) = request(addr, "GET", path, Some(token), None).await?;
            ensure!(status == 200, "GET {path}: {status} {reply}");
            Ok(matches!(reply["state"].as_str(), Some("SUCCESS" | "FAILURE")).then_some(reply))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_apps_http_and_program_tasks_run_in_the_stack() -> Result<()> {
    require(Prereq::File {
        path: PYTHON,
        package: "python3",
    });
    require(Prereq::Program {
        name: "docker-compose",
        package: "docker-compose",
    });
    let root = workspace_root()?;
    let example = root.join("examples/python-app");
    let tag = unique("apptasks");
    let app = format!("{APP_REPOSITORY}:{tag}");
    let redis = format!("{REDIS_REPOSITORY}:{tag}");
    let base = format!("localhost/taskstack-test-python:{tag}");
    let user_image = format!("localhost/taskstack-test-app:{tag}");
    let secrets = tempfile::tempdir()?;
    let port = free_port()?;
    let env = vec![
        (
            "TASKSTACK_SECRETS_DIR",
            secrets.path().display().to_string(),
        ),
        ("WEB_PORT", port.to_string()),
        ("HEALTHCHECK_INTERVAL", "1s".to_owned()),
        ("TASKSTACK_IMAGE", app.clone()),
        ("REDIS_IMAGE", redis.clone()),
        ("APP_IMAGE", user_image.clone()),
    ];
    let project = unique("apptasks").replace('-', "");
    let _cleanup = StackctlDown {
        exe: env!("CARGO_BIN_EXE_stackctl"),
        project: project.clone(),
        env: env.clone(),
        images: vec![app.clone(), redis.clone(), base.clone(), user_image.clone()],
    };

    // taskstack's images (debug binaries: the size limit is the release
    // image's), as a team makes them.
    let args = [
        "build",
        "--profile",
        "debug",
        "--tag",
        &tag,
        "--redis",
        "build",
    ];
    let built = stackctl(&args, &[])?;
    ensure!(built.status.success(), "stackctl build: {}", text(&built));

    // The team's base image: Python and the app, nothing of taskstack.
    // Debian images hold glibc and libgcc_s (priority "required"); this
    // scratch stand-in gets them from the host like the rest.
    let mut fs = Rootfs::new();
    fs.binary_with_libs(Path::new(PYTHON), PYTHON)?;
    add_tree(&mut fs, &stdlib_of(PYTHON)?)?;
    let this_test = std::env::current_exe()?;
    for lib in stackctl::rootfs::shared_libraries(&this_test)? {
        if lib.to_string_lossy().contains("libgcc_s") {
            fs.file(&lib, std::fs::read(&lib)?, 0o644);
        }
    }
    add_app(&mut fs, &example)?;
    fs.dir("/tmp", 0o1777, 0, 0);
    let base_dockerfile = "FROM scratch\n\
         COPY rootfs/ /\n\
         ENV PATH=/usr/local/bin:/usr/bin:/bin\n\
         WORKDIR /app\n\
         USER 65534:65534\n\
         EXPOSE 8000\n\
         CMD [\"python3\", \"/app/app.py\"]\n";
    build(&base, base_dockerfile, Some(&fs)).await?;
    // The team's image: the base plus the example's taskstack lines.
    let user_dockerfile = format!("FROM {base}\n{}\n", snippet(&example, &app)?);
    build(&user_image, &user_dockerfile, None)
        .await
        .with_context(|| format!("building {user_image} from:\n{user_dockerfile}"))?;

    let up = stackctl(
        &["up", "-p", &project, "--profile", "app", "--timeout", "180"],
        &env,
    )?;
    ensure!(
        up.status.success(),
        "stackctl up --profile app: {}",
        text(&up)
    );

    // verify passes with the profile's services, and reports the tasks
    // each worker announces: the stock ones, and the app worker's.
    let verify = stackctl(
        &["verify", "-p", &project, "--profile", "app", "--json"],
        &env,
    )?;
    let report: Value = serde_json::from_slice(&verify.stdout)
        .with_context(|| format!("stackctl verify --json: {}", text(&verify)))?;
    ensure!(verify.status.success(), "stackctl verify: {report:#}");
    let checks = report["checks"].as_array().context("no checks")?;
    let reason = |id: &str| -> String {
        checks
            .iter()
            .find(|c| c["id"] == id)
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    for svc in ["service.app", "service.app-worker"] {
        ensure!(
            reason(svc).contains("running and healthy"),
            "{svc}: {}",
            reason(svc)
        );
    }
    // docker-compose v1 reads the same profile and sees what stackctl made.
    let compose = ComposeProject::new(&project, &env)?;
    let ps = compose.run(&["--profile", "app", "ps"])?;
    for svc in ["app_1", "app-worker_1"] {
        let line = ps
            .lines()
            .find(|l| l.starts_with(&format!("{project}_{svc}")))
            .with_context(|| format!("docker-compose ps does not list {svc}:\n{ps}"))?;
        ensure!(line.contains("Up (healthy)"), "{line}");
    }
    let tasks = reason("workers.tasks");
    ensure!(
        tasks.contains("billing.charge, reports.render, taskstack.add"),
        "workers.tasks: {tasks}"
    );
    ensure!(
        tasks.matches("taskstack.add").count() == 2,
        "the stock workers and the app worker: {tasks}"
    );
    println!("verify: workers.tasks: {tasks}");

    let token = std::fs::read_to_string(secrets.path().join("api_token"))?;
    let (addr, token) = (format!("127.0.0.1:{port}"), token.trim().to_owned());

    // (a) The HTTP task: app-worker POSTs it to http://app:8000.
    let done = run_task(
        &addr,
        &token,
        json!({"task": "billing.charge", "args": ["c-7", 1250], "queue": "app"}),
    )
    .await?;
    ensure!(done["state"] == "SUCCESS", "{done}");
    ensure!(
        done["result"] == json!({"customer": "c-7", "charged": 1250, "currency": "EUR"}),
        "{done}"
    );
    // The app's 422 is the task's failure, with the app's answer.
    let done = run_task(
        &addr,
        &token,
        json!({"task": "billing.charge", "args": ["c-7", 0], "queue": "app"}),
    )
    .await?;
    ensure!(done["state"] == "FAILURE", "{done}");
    ensure!(done["error"]["type"] == "HTTPError", "{done}");
    ensure!(
        done["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("422") && t.contains("cannot charge 0 cents")),
        "{done}"
    );

    // (b) The program task: python3 -m reports.render in the app image.
    let done = run_task(
        &addr,
        &token,
        json!({"task": "reports.render", "args": ["Q3", {"orders": 12, "refunds": 1}],
               "queue": "app"}),
    )
    .await?;
    ensure!(done["state"] == "SUCCESS", "{done}");
    ensure!(done["result"]["title"] == "Q3", "{done}");
    ensure!(done["result"]["lines"] == 4, "{done}");
    ensure!(
        done["result"]["text"] == "Q3\n==\norders: 12\nrefunds: 1",
        "{done}"
    );
    Ok(())
}
