//! Fuzzing the HTTP API with schemathesis (PyPI) against its own
//! `/openapi.json`, with a real Redis and a real worker behind it: no 5xx,
//! every status, content type, header and body as the document says,
//! invalid input rejected, the API's auth not ignorable.
//!
//! Two checks are left out on purpose: `positive_data_acceptance` (the API
//! rightly refuses schema-valid requests for semantic reasons the document
//! cannot express: a task name no live worker announces, `countdown`
//! together with `eta`, an `expires` already past) and `use_after_free`
//! (DELETE revokes a task; the task stays readable, as REVOKED).
//!
//! The seed is fixed so a CI run is reproducible; set
//! `TASKSTACK_FUZZ_SEED=random` (or a number) to explore further.

use anyhow::{Result, ensure};
use std::time::Duration;
use taskstack_integration::python::Venv;
use taskstack_integration::{
    RedisServer, TEST_TOKEN, WebProcess, WorkerProcess, namespace, wait_until,
};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
const DEFAULT_SEED: &str = "20261124";

#[tokio::test(flavor = "multi_thread")]
async fn the_api_matches_its_openapi_document_under_fuzzing() -> Result<()> {
    let venv = Venv::ensure(
        "schemathesis-venv",
        SCHEMATHESIS,
        "import schemathesis",
        "TASKSTACK_SCHEMATHESIS_PYTHON",
    )?;
    let redis = RedisServer::start()?;
    let ns = namespace("fuzz");
    let _worker = WorkerProcess::spawn(&redis.url(), &ns, &[])?;
    let web = WebProcess::spawn(
        &redis.url(),
        &ns,
        &[("TASKSTACK_WEB_TASKS", "taskstack.add,taskstack.echo")],
    )
    .await?;
    wait_until(
        "the stack to be healthy",
        Duration::from_secs(20),
        || async { Ok((web.call("GET", "/health", None).await?.0 == 200).then_some(())) },
    )
    .await?;

    // schemathesis keeps a cache in its working directory: not the tree.
    let workdir = tempfile::tempdir()?;
    let mut cmd = venv.module("schemathesis.cli");
    cmd.current_dir(workdir.path())
        .arg("run")
        .arg(format!("http://{}/openapi.json", web.addr))
        .args(["--header", &format!("Authorization: Bearer {TEST_TOKEN}")])
        .args(["--checks", "all"])
        .args([
            "--exclude-checks",
            "positive_data_acceptance,use_after_free",
        ])
        .args(["--max-examples", "60"])
        // One worker: schemathesis's threads trip a CPython AST bug here.
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1");
    let seed = std::env::var("TASKSTACK_FUZZ_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    if seed != "random" {
        cmd.args(["--seed", &seed]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "schemathesis found problems ({}):\n{stdout}\n{stderr}\nweb log:\n{}",
        out.status,
        web.log()
    );
    eprintln!(
        "{}",
        stdout
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
