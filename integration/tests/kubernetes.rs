//! `deploy/kubernetes` without a cluster (none exists offline): the
//! kustomizations render with `integration/python/kustomize_render.py`
//! (a small kustomize of just the features the manifests use; CI needs no
//! kustomize binary), and, when a real kustomize v5 is on PATH
//! (`kustomize build`, or the one inside `kubectl kustomize`), that one's
//! rendering must hold exactly the same objects; every rendered object passes the
//! Kubernetes schemas of `kubernetes-validate` (strict, two Kubernetes
//! versions) or, for KEDA's objects, the schema of KEDA's own CRDs
//! (`integration/kubernetes/keda`); `checkov` finds nothing but the checks
//! `deploy/kubernetes/.checkov.yaml` skips with a reason, and each of those
//! does fail without the skip; the security posture, probes, disruption
//! budgets, grace periods, network policies, secrets and the queue-length
//! autoscaler's Redis lists are asserted field by field; and the real
//! binaries accept the configuration each container is given (their
//! `config` subcommand, with the ConfigMaps and Secrets laid out as the
//! kubelet would mount them).

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use taskstack::proto::keys::{PRIORITY_BUCKETS, queue_key};
use taskstack_integration::python::{self, Venv};
use taskstack_integration::{bin, in_ci};

/// The Kubernetes versions whose schemas every object must pass: the
/// oldest minor still common in managed clusters, and the newest one
/// `kubernetes-validate` ships.
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The deployable kustomizations: CPU autoscaling, and KEDA's.
const EXAMPLE: &str = "overlays/example";
const EXAMPLE_KEDA: &str = "overlays/example-keda";
const OVERLAYS: [&str; 2] = [EXAMPLE, EXAMPLE_KEDA];

/// The keys of the Secret, as the files compose/init-secrets writes.
const SECRET_KEYS: [&str; 3] = ["api_token", "redis_password", "redis_users.acl"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))
}

fn ok(out: Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Fails the test, as `prereq::require` does, when `what` is missing.
#[track_caller]
fn missing(what: &str) -> ! {
    if in_ci() {
        panic!("missing prerequisite under CI=true: {what}; CI must provide it");
    }
    panic!("missing prerequisite, so this test did NOT run: {what}");
}

/// A real kustomize v5 to cross-check `integration/python/kustomize_render.py`
/// against, when one is on PATH: `kustomize build`, else `kubectl
/// kustomize` with its embedded kustomize v5 (Debian's kubernetes-client,
/// 1.20 with kustomize v2, is too old: it knows no components). Optional:
/// CI need not have one; `TASKSTACK_KUSTOMIZE_CROSSCHECK=0` skips it.
fn kustomize_binary() -> Option<Vec<&'static str>> {
    if std::env::var_os("TASKSTACK_KUSTOMIZE_CROSSCHECK").is_some_and(|v| v == "0") {
        return None;
    }
    let major = |v: &str| {
        v.trim()
            .trim_start_matches("v")
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
    };
    if let Ok(out) = run(Command::new("kustomize").arg("version"))
        && out.status.success()
        && major(&String::from_utf8_lossy(&out.stdout)).is_some_and(|m| m >= 5)
    {
        return Some(vec!["kustomize", "build"]);
    }
    if let Ok(out) = run(Command::new("kubectl").args(["version", "--client", "-o", "json"]))
        && out.status.success()
        && let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
        && v["kustomizeVersion"]
            .as_str()
            .and_then(major)
            .is_some_and(|m| m >= 5)
    {
        return Some(vec!["kubectl", "kustomize"]);
    }
    None
}

/// The objects of a rendered YAML stream, each as canonical JSON, sorted:
/// two renderings hold the same objects when these are equal.
fn canonical_objects(venv: &Venv, rendered: &Path) -> Result<Vec<String>> {
    let mut cmd = Command::new(&venv.python);
    python::clean_env(&mut cmd)
        .arg(python::python_dir().join("kustomize_render.py"))
        .arg("objects")
        .arg(rendered);
    let objects: Vec<Value> =
        serde_json::from_str(&ok(run(&mut cmd)?, "kustomize_render.py objects")?)?;
    let mut out = objects
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    Ok(out)
}

fn tools() -> Venv {
    python::kubernetes_tools().unwrap_or_else(|e| {
        missing(&format!(
            "the Python venv with {} ({e:#})",
            python::KUBERNETES_TOOLS_REQUIREMENT
        ))
    })
}

/// A copy of `deploy/kubernetes` with the secrets compose/init-secrets
/// writes (into the copy: nothing lands in the source tree).
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Result<Self> {
        // Not hidden (tempfile's default `.tmp...`): checkov skips
        // directories whose name starts with a dot.
        let dir = tempfile::Builder::new().prefix("kubernetes-").tempdir()?;
        copy_tree(&workspace().join("deploy/kubernetes"), dir.path())?;
        let secrets = dir.path().join(EXAMPLE).join("secrets");
        ok(
            run(Command::new(workspace().join("compose/init-secrets"))
                .env("TASKSTACK_SECRETS_DIR", &secrets))?,
            "compose/init-secrets",
        )?;
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn secret_file(&self, key: &str) -> Result<Vec<u8>> {
        let p = self.path().join(EXAMPLE).join("secrets").join(key);
        std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
    }

    /// The rendered YAML of the kustomization `rel`, written beside it,
    /// by `integration/python/kustomize_render.py` (CI needs no kustomize
    /// binary); when a real kustomize v5 is on PATH, its rendering must
    /// hold exactly the same objects.
    fn render(&self, rel: &str) -> Result<PathBuf> {
        let venv = tools();
        let mut cmd = Command::new(&venv.python);
        python::clean_env(&mut cmd)
            .arg(python::python_dir().join("kustomize_render.py"))
            .arg("build")
            .arg(self.path().join(rel));
        let yaml = ok(run(&mut cmd)?, &format!("kustomize_render.py build {rel}"))?;
        let out = self
            .path()
            .join(format!("{}.rendered.yaml", rel.replace('/', "_")));
        std::fs::write(&out, yaml)?;
        if let Some(argv) = kustomize_binary() {
            let what = format!("{} {rel}", argv.join(" "));
            let real = ok(
                run(Command::new(argv[0])
                    .args(&argv[1..])
                    .arg(self.path().join(rel)))?,
                &what,
            )?;
            let real_out = self
                .path()
                .join(format!("{}.kustomize.yaml", rel.replace('/', "_")));
            std::fs::write(&real_out, real)?;
            let (mine, theirs) = (
                canonical_objects(&venv, &out)?,
                canonical_objects(&venv, &real_out)?,
            );
            let only = |a: &[String], b: &[String]| -> Vec<String> {
                a.iter().filter(|o| !b.contains(o)).cloned().collect()
            };
            ensure!(
                mine == theirs,
                "kustomize_render.py and `{what}` differ on {rel}:\nonly kustomize_render.py:\n{}\nonly {what}:\n{}",
                only(&mine, &theirs).join("\n"),
                only(&theirs, &mine).join("\n")
            );
            eprintln!(
                "{rel}: kustomize_render.py == `{what}` ({} objects)",
                mine.len()
            );
        } else {
            eprintln!("{rel}: no kustomize v5 on PATH, rendered by kustomize_render.py alone");
        }
        Ok(out)
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "secrets" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// What `integration/python/kubernetes_manifests.py validate` saw.
struct Validated {
    objects: Vec<Value>,
    checked: Vec<Value>,
    errors: Vec<Value>,
}

fn validate(venv: &Venv, rendered: &Path, version: &str) -> Result<Validated> {
    let mut cmd = Command::new(&venv.python);
    python::clean_env(&mut cmd)
        .arg(python::python_dir().join("kubernetes_manifests.py"))
        .arg("validate")
        .arg(rendered)
        .arg(version)
        .arg(workspace().join("integration/kubernetes/keda"));
    let out: Value = serde_json::from_str(&ok(run(&mut cmd)?, "kubernetes_manifests.py")?)?;
    let list = |k: &str| out[k].as_array().cloned().unwrap_or_default();
    Ok(Validated {
        objects: list("objects"),
        checked: list("checked"),
        errors: list("errors"),
    })
}

/// The rendered objects of each deployable overlay.
fn overlays(tree: &Tree, venv: &Venv) -> Result<Vec<(&'static str, Vec<Value>)>> {
    OVERLAYS
        .iter()
        .map(|o| {
            Ok((
                *o,
                validate(venv, &tree.render(o)?, K8S_VERSIONS[0])?.objects,
            ))
        })
        .collect()
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], k: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == k && o["metadata"]["name"] == name)
        .with_context(|| format!("no {k} {name:?} rendered"))
}

/// Deployments and StatefulSets: (component label, the object).
fn workloads(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
        .map(|o| {
            let c = o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            (c, o)
        })
        .collect()
}

fn workload<'a>(objects: &'a [Value], component: &str) -> Result<&'a Value> {
    workloads(objects)
        .into_iter()
        .find(|(c, _)| c == component)
        .map(|(_, o)| o)
        .with_context(|| format!("no workload of component {component}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn first_container(w: &Value) -> &Value {
    &w["spec"]["template"]["spec"]["containers"][0]
}

/// Whether a Kubernetes label selector (`matchLabels`, `matchExpressions`)
/// selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let by_expr = selector["matchExpressions"].as_array().is_none_or(|es| {
        es.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|l| values.contains(&l)),
                Some("NotIn") => label(key).is_none_or(|l| !values.contains(&l)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                _ => false,
            }
        })
    });
    by_labels && by_expr
}

/// `kustomize_render.py` refuses what it does not implement, naming it,
/// rather than rendering something kustomize would render differently.
#[test]
fn the_python_renderer_refuses_what_it_does_not_implement() -> Result<()> {
    let venv = tools();
    let cases: [(&str, &str, &str); 3] = [
        (EXAMPLE, "commonLabels:\n  team: a\n", "commonLabels"),
        (
            EXAMPLE,
            "  - patch: |-\n      apiVersion: v1\n      kind: Service\n      metadata:\n        name: web\n      spec:\n        ports:\n          - port: 80\n",
            "ports: strategic merge of this list not implemented",
        ),
        (
            EXAMPLE,
            "  - path: web-replicas.yaml\n    target:\n      kind: Deployment\n",
            "target",
        ),
    ];
    for (rel, append, refused) in cases {
        let tree = Tree::new()?;
        let file = tree.path().join(rel).join("kustomization.yaml");
        let mut text = std::fs::read_to_string(&file)?;
        text.push_str(append);
        std::fs::write(&file, text)?;
        let mut cmd = Command::new(&venv.python);
        python::clean_env(&mut cmd)
            .arg(python::python_dir().join("kustomize_render.py"))
            .arg("build")
            .arg(tree.path().join(rel));
        let out = run(&mut cmd)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(refused),
            "kustomize_render.py did not refuse `{refused}` ({}):\n{stderr}",
            out.status
        );
    }
    Ok(())
}

#[test]
fn every_rendered_object_passes_the_kubernetes_and_keda_schemas() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for rel in ["base", EXAMPLE, EXAMPLE_KEDA] {
        let rendered = tree.render(rel)?;
        for version in K8S_VERSIONS {
            let v = validate(&venv, &rendered, version)?;
            ensure!(
                v.errors.is_empty(),
                "{rel} against {version}: {:#?}",
                v.errors
            );
            ensure!(
                !v.objects.is_empty() && v.checked.len() == v.objects.len(),
                "{rel}: {} objects, {} checked",
                v.objects.len(),
                v.checked.len()
            );
            let keda = v
                .checked
                .iter()
                .filter(|c| c["against"].as_str().is_some_and(|a| a.contains("KEDA")))
                .count();
            ensure!(
                keda == if rel == EXAMPLE_KEDA { 2 } else { 0 },
                "{rel}: {keda} KEDA objects checked: {:#?}",
                v.checked
            );
            eprintln!("{rel}: {} objects valid for {version}", v.objects.len());
        }
    }

    // The checks are not vacuous: an unknown container field and a KEDA
    // trigger without its type are refused, naming the object.
    let mut objects = validate(&venv, &tree.render(EXAMPLE_KEDA)?, K8S_VERSIONS[0])?.objects;
    for o in &mut objects {
        if o["kind"] == "Deployment" && o["metadata"]["name"] == "worker" {
            o["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always".into();
        }
        if o["kind"] == "ScaledObject" {
            o["spec"]["triggers"][0]
                .as_object_mut()
                .context("trigger")?
                .remove("type");
        }
    }
    let broken = tree.path().join("broken.yaml");
    let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
    std::fs::write(&broken, docs.join("\n---\n"))?;
    let v = validate(&venv, &broken, K8S_VERSIONS[0])?;
    let failed: BTreeSet<String> = v
        .errors
        .iter()
        .map(|e| format!("{}/{}", e["kind"].as_str().unwrap_or("?"), e["name"]))
        .collect();
    ensure!(
        failed
            == BTreeSet::from([
                "Deployment/\"worker\"".to_owned(),
                "ScaledObject/\"worker\"".to_owned()
            ]),
        "the broken objects were not (all) refused: {:#?}",
        v.errors
    );
    Ok(())
}

/// The checks `.checkov.yaml` skips, each with its reason.
fn checkov_skips() -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(workspace().join("deploy/kubernetes/.checkov.yaml"))?;
    let mut skips = BTreeMap::new();
    let mut in_list = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_list = line.starts_with("skip-check:");
            continue;
        }
        if let Some(item) = line.trim().strip_prefix("- ").filter(|_| in_list) {
            let (id, reason) = item.split_once('#').unwrap_or((item, ""));
            let reason = reason.trim();
            ensure!(
                reason.len() > 20,
                ".checkov.yaml skips {} without a reason",
                id.trim()
            );
            skips.insert(id.trim().to_owned(), reason.to_owned());
        }
    }
    ensure!(!skips.is_empty(), "no skip-check list in .checkov.yaml");
    Ok(skips)
}

/// checkov over the rendered files in `dir`, offline (no download of
/// Prisma Cloud's guidelines): its JSON report.
fn checkov(venv: &Venv, dir: &Path, config: Option<&Path>) -> Result<Value> {
    let mut cmd = venv.module("checkov.main");
    cmd.arg("-d")
        .arg(dir)
        .args(["--framework", "kubernetes", "-o", "json"])
        .arg("--skip-download")
        .env("BC_SKIP_MAPPING", "TRUE");
    if let Some(c) = config {
        cmd.arg("--config-file").arg(c);
    }
    let out = run(&mut cmd)?;
    // Exit 1 means "failed checks" (reported in the JSON); anything else
    // that is not 0 is checkov itself failing.
    ensure!(
        matches!(out.status.code(), Some(0 | 1)),
        "checkov failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "checkov printed no JSON report:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn checkov_finds_nothing_but_the_checks_skipped_with_a_reason() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    let skips = checkov_skips()?;
    let dir = tree.path().join("checkov");
    std::fs::create_dir(&dir)?;
    let mut workload_ids = BTreeSet::new();
    for rel in OVERLAYS {
        let rendered = tree.render(rel)?;
        for (_, w) in workloads(&validate(&venv, &rendered, K8S_VERSIONS[0])?.objects) {
            workload_ids.insert(format!(
                "{}.{}.{}",
                w["kind"].as_str().unwrap_or("?"),
                w["metadata"]["namespace"].as_str().unwrap_or("default"),
                w["metadata"]["name"].as_str().unwrap_or("?")
            ));
        }
        std::fs::copy(
            &rendered,
            dir.join(format!("{}.yaml", rel.replace('/', "_"))),
        )?;
    }

    // Without the skips: what fails is exactly what is skipped, so every
    // failure is explained and no skip is stale.
    let bare = checkov(&venv, &dir, None)?;
    let failed = bare["results"]["failed_checks"]
        .as_array()
        .with_context(|| format!("no failed_checks in checkov's report: {bare:#}"))?;
    let failed_ids: BTreeSet<&str> = failed
        .iter()
        .filter_map(|f| f["check_id"].as_str())
        .collect();
    for f in failed {
        eprintln!(
            "without skips: {} on {}",
            f["check_id"].as_str().unwrap_or("?"),
            f["resource"].as_str().unwrap_or("?")
        );
    }
    let skipped: BTreeSet<&str> = skips.keys().map(String::as_str).collect();
    ensure!(
        failed_ids == skipped,
        "checkov's failures {failed_ids:?} differ from .checkov.yaml's explained skips {skipped:?}"
    );

    // With the project's settings: nothing fails, every object was read.
    let report = checkov(
        &venv,
        &dir,
        Some(&workspace().join("deploy/kubernetes/.checkov.yaml")),
    )?;
    let summary = &report["summary"];
    eprintln!("checkov with .checkov.yaml: {summary}");
    ensure!(
        summary["failed"] == 0 && summary["parsing_errors"] == 0,
        "checkov: {summary}\n{:#}",
        report["results"]["failed_checks"]
    );
    ensure!(
        summary["passed"].as_u64().is_some_and(|p| p > 100),
        "checkov passed too few checks: {summary}"
    );
    // Every workload was read and checked.
    let checked: BTreeSet<&str> = report["results"]["passed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["resource"].as_str())
        .collect();
    for id in &workload_ids {
        ensure!(checked.contains(id.as_str()), "checkov did not check {id}");
    }
    Ok(())
}

#[test]
fn every_pod_runs_locked_down_with_probes_and_resources() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for (rel, objects) in overlays(&tree, &venv)? {
        let ns = named(&objects, "Namespace", "taskstack")?;
        ensure!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted",
            "{rel}: the namespace does not enforce the restricted pod security standard"
        );
        let mut seen = BTreeSet::new();
        for (component, w) in workloads(&objects) {
            let what = format!("{rel}: {component}");
            let pod = &w["spec"]["template"]["spec"];
            ensure!(
                pod["automountServiceAccountToken"] == false,
                "{what}: token mounted"
            );
            for host in ["hostNetwork", "hostPID", "hostIPC"] {
                ensure!(pod[host] != true, "{what}: {host}");
            }
            for v in pod["volumes"].as_array().into_iter().flatten() {
                ensure!(v.get("hostPath").is_none(), "{what}: hostPath volume {v}");
            }
            let psc = &pod["securityContext"];
            ensure!(
                psc["runAsNonRoot"] == true && psc["seccompProfile"]["type"] == "RuntimeDefault",
                "{what}: pod securityContext {psc}"
            );
            let containers = pod["containers"].as_array().context("containers")?;
            let init = pod["initContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for c in containers.iter().chain(&init) {
                let what = format!("{what}/{}", c["name"]);
                let sc = &c["securityContext"];
                ensure!(sc["runAsNonRoot"] == true, "{what}: runAsNonRoot");
                ensure!(
                    sc["runAsUser"].as_u64().is_some_and(|u| u >= 10_000),
                    "{what}: runAsUser {} (a high UID of no other use)",
                    sc["runAsUser"]
                );
                ensure!(
                    sc["allowPrivilegeEscalation"] == false,
                    "{what}: allowPrivilegeEscalation"
                );
                ensure!(
                    sc["readOnlyRootFilesystem"] == true,
                    "{what}: readOnlyRootFilesystem"
                );
                ensure!(sc["privileged"] != true, "{what}: privileged");
                ensure!(
                    sc["capabilities"]["drop"] == serde_json::json!(["ALL"])
                        && sc["capabilities"].get("add").is_none(),
                    "{what}: capabilities {}",
                    sc["capabilities"]
                );
                ensure!(
                    sc["seccompProfile"]["type"] == "RuntimeDefault",
                    "{what}: seccomp"
                );
                for (k, r) in [("requests", "cpu"), ("requests", "memory")]
                    .into_iter()
                    .chain([("limits", "cpu"), ("limits", "memory")])
                {
                    ensure!(c["resources"][k][r].is_string(), "{what}: no {k}.{r}");
                }
            }
            // Probes: the binary's own `healthcheck` (redis: redis-cli as
            // the PING-only user, as compose); web stays alive on
            // /health/live, so a missing worker never restarts the API.
            let c = &containers[0];
            let cmd = c["command"][0].as_str().unwrap_or_default();
            let healthcheck = serde_json::json!([cmd, "healthcheck"]);
            let ready = &c["readinessProbe"]["exec"]["command"];
            let live = &c["livenessProbe"];
            match component.as_str() {
                "web" => {
                    ensure!(ready == &healthcheck, "{what}: readiness {ready}");
                    ensure!(
                        live["httpGet"]["path"] == "/health/live"
                            && c["ports"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|p| p["name"] == live["httpGet"]["port"]),
                        "{what}: liveness {live}"
                    );
                }
                "worker" | "beat" => {
                    ensure!(ready == &healthcheck, "{what}: readiness {ready}");
                    ensure!(
                        live["exec"]["command"] == healthcheck,
                        "{what}: liveness {live}"
                    );
                }
                "redis" => {
                    let ping = |p: &Value| {
                        p["exec"]["command"].as_array().is_some_and(|a| {
                            a.first().is_some_and(|x| x == "redis-cli")
                                && a.last().is_some_and(|x| x == "ping")
                                && a.iter().any(|x| x == "healthcheck")
                        })
                    };
                    ensure!(
                        ping(&c["readinessProbe"]) && ping(live),
                        "{what}: probes {c}"
                    );
                }
                other => bail!("{what}: unexpected workload {other}"),
            }
            seen.insert(component);
        }
        ensure!(
            seen == BTreeSet::from(["beat", "redis", "web", "worker"].map(String::from)),
            "{rel}: workloads {seen:?}"
        );
    }
    Ok(())
}

#[test]
fn disruption_budgets_replicas_and_grace_periods_fit_the_services() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for (rel, objects) in overlays(&tree, &venv)? {
        let pdbs = kind(&objects, "PodDisruptionBudget");
        for component in ["web", "worker", "beat"] {
            let w = workload(&objects, component)?;
            let labels = &w["spec"]["template"]["metadata"]["labels"];
            let pdb = pdbs
                .iter()
                .find(|p| selects(&p["spec"]["selector"], labels))
                .with_context(|| format!("{rel}: no PodDisruptionBudget for {component}"))?;
            let replicas = w["spec"]["replicas"].as_u64();
            match (&pdb["spec"]["minAvailable"], replicas) {
                (Value::Number(min), Some(n)) => ensure!(
                    min.as_u64().is_some_and(|m| m >= 1 && m < n),
                    "{rel}: {component} minAvailable {min} of {n} replicas blocks every drain"
                ),
                (Value::Null, _) => ensure!(
                    pdb["spec"]["maxUnavailable"] == 1,
                    "{rel}: {component} PDB {pdb}"
                ),
                (min, n) => bail!("{rel}: {component} minAvailable {min} with replicas {n:?}"),
            }
        }
        // Two beats: one leads, the other stands by (the Redis lock).
        ensure!(
            workload(&objects, "beat")?["spec"]["replicas"] == 2,
            "{rel}: beat replicas"
        );
        ensure!(
            workload(&objects, "web")?["spec"]["replicas"]
                .as_u64()
                .is_some_and(|n| n >= 2),
            "{rel}: web replicas"
        );
        // The autoscaler owns the worker count.
        ensure!(
            workload(&objects, "worker")?["spec"]
                .get("replicas")
                .is_none(),
            "{rel}: worker replicas set beside an autoscaler"
        );
    }
    Ok(())
}

/// A Secret's `data` value (base64, which kustomize wraps in lines).
fn secret_bytes(v: &Value) -> Result<Vec<u8>> {
    let text: String = v
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

/// Lays out the first container's ConfigMap, Secret, emptyDir and claim mounts under
/// `root` (as the kubelet mounts them) and returns its environment with
/// paths under a mount moved under `root`.
fn materialize(objects: &[Value], w: &Value, root: &Path) -> Result<Vec<(String, String)>> {
    let pod = &w["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let mount = m["mountPath"].as_str().context("mountPath")?;
        let dir = root.join(mount.trim_start_matches('/'));
        // A StatefulSet's claim: an empty volume to the container.
        let claims = w["spec"]["volumeClaimTemplates"].as_array();
        if claims
            .into_iter()
            .flatten()
            .any(|c| c["metadata"]["name"] == m["name"])
        {
            std::fs::create_dir_all(&dir)?;
            mounts.push((mount.to_owned(), dir));
            continue;
        }
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"])
            .with_context(|| format!("no volume {} for {mount}", m["name"]))?;
        std::fs::create_dir_all(&dir)?;
        let (source, files): (&Value, BTreeMap<String, Vec<u8>>) =
            if let Some(name) = volume["configMap"]["name"].as_str() {
                let cm = named(objects, "ConfigMap", name)?;
                let data = cm["data"].as_object().context("ConfigMap data")?;
                let files = data
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().unwrap_or_default().as_bytes().to_vec(),
                        )
                    })
                    .collect();
                (&volume["configMap"], files)
            } else if let Some(name) = volume["secret"]["secretName"].as_str() {
                let s = named(objects, "Secret", name)?;
                let data = s["data"].as_object().context("Secret data")?;
                let mut files = BTreeMap::new();
                for (k, v) in data {
                    let raw = secret_bytes(v).with_context(|| format!("Secret {name} key {k}"))?;
                    files.insert(k.clone(), raw);
                }
                (&volume["secret"], files)
            } else if volume.get("emptyDir").is_some() {
                mounts.push((mount.to_owned(), dir));
                continue;
            } else {
                bail!("unexpected volume {volume}");
            };
        // `items` chooses keys and their paths; without it, every key.
        let items: Vec<(String, String)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        i["key"].as_str().unwrap_or_default().to_owned(),
                        i["path"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
            None => files.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in items {
            let bytes = files
                .get(&key)
                .with_context(|| format!("{mount}: key {key} is not in its source"))?;
            std::fs::write(dir.join(path), bytes)?;
        }
        mounts.push((mount.to_owned(), dir));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let mut env = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?.to_owned();
        let value = e["value"]
            .as_str()
            .with_context(|| format!("env {name} has no plain value"))?;
        let value = mounts
            .iter()
            .find_map(|(m, dir)| {
                value
                    .strip_prefix(m.as_str())
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                    .map(|rest| format!("{}{rest}", dir.display()))
            })
            .unwrap_or_else(|| value.to_owned());
        env.push((name, value));
    }
    Ok(env)
}

/// `<service> config` run with exactly the container's environment and
/// mounted files: the effective configuration, or the service's refusal.
fn effective_config(objects: &[Value], w: &Value, root: &Path) -> Result<Value> {
    let program = first_container(w)["command"][0]
        .as_str()
        .context("command")?
        .trim_start_matches('/');
    let env = materialize(objects, w, root)?;
    let mut cmd = Command::new(bin(program)?);
    cmd.arg("config").env_clear().envs(env);
    let out = ok(run(&mut cmd)?, &format!("{program} config"))?;
    serde_json::from_str(&out).with_context(|| format!("{program} config printed:\n{out}"))
}

fn duration(v: &Value) -> Result<Duration> {
    let s = v.as_str().with_context(|| format!("not a duration: {v}"))?;
    Ok(humantime::parse_duration(s)?)
}

#[test]
fn the_services_accept_their_rendered_configuration() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for (rel, objects) in overlays(&tree, &venv)? {
        let mut configs = BTreeMap::new();
        for component in ["web", "worker", "beat"] {
            let w = workload(&objects, component)?;
            let root = tree
                .path()
                .join(format!("{}-{component}", rel.replace('/', "_")));
            let config = effective_config(&objects, w, &root)
                .with_context(|| format!("{rel}: {component}"))?;
            // Prometheus scrapes the port the service listens on.
            let listen_key = match component {
                "web" => "web_listen",
                "worker" => "worker_metrics_listen",
                _ => "beat_metrics_listen",
            };
            let listen = config[listen_key].as_str().context(listen_key)?;
            let annotations = &w["spec"]["template"]["metadata"]["annotations"];
            let port = annotations["prometheus.io/port"].as_str().unwrap_or("?");
            ensure!(
                annotations["prometheus.io/scrape"] == "true"
                    && annotations["prometheus.io/path"] == "/metrics"
                    && listen.ends_with(&format!(":{port}")),
                "{rel}: {component} listens on {listen}, scraped as {annotations}"
            );
            ensure!(
                first_container(w)["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["containerPort"].as_u64() == port.parse().ok()),
                "{rel}: {component} does not declare port {port}"
            );
            configs.insert(component, (config, w));
        }

        // The kubelet's SIGKILL comes after the worker's drain.
        let (worker, w) = &configs["worker"];
        let drain = duration(&worker["drain_timeout"])?;
        let grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .context("worker terminationGracePeriodSeconds")?;
        ensure!(
            Duration::from_secs(grace) >= drain + Duration::from_secs(5),
            "{rel}: worker grace period {grace}s leaves no margin over drain_timeout {drain:?}"
        );
        eprintln!("{rel}: worker drain_timeout {drain:?}, grace period {grace}s");

        // web's /health expects a worker on exactly the queues workers
        // consume, and the beat.
        let (web, _) = &configs["web"];
        ensure!(
            web["queues"] == worker["queues"] && web["web_expect_beat"] == true,
            "{rel}: web checks queues {} (expect beat {}), workers consume {}",
            web["queues"],
            web["web_expect_beat"],
            worker["queues"]
        );
    }
    Ok(())
}

#[test]
fn worker_autoscaling_is_the_cpu_hpa_or_keda_on_every_priority_list() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for (rel, objects) in overlays(&tree, &venv)? {
        let hpas = kind(&objects, "HorizontalPodAutoscaler");
        let scaled = kind(&objects, "ScaledObject");
        ensure!(
            hpas.len() + scaled.len() == 1,
            "{rel}: {} HPAs and {} ScaledObjects: exactly one autoscaler may own the workers",
            hpas.len(),
            scaled.len()
        );
        let worker = workload(&objects, "worker")?;
        let container = first_container(worker);
        ensure!(
            container["resources"]["requests"]["cpu"].is_string(),
            "{rel}: CPU scaling needs a CPU request"
        );
        if let Some(hpa) = hpas.first() {
            ensure!(rel == EXAMPLE, "{rel}: an HPA beside KEDA");
            ensure!(
                hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
                    && hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
                    && hpa["spec"]["minReplicas"].as_u64().is_some_and(|m| m >= 1),
                "{rel}: HPA {hpa}"
            );
            continue;
        }
        ensure!(rel == EXAMPLE_KEDA, "{rel}: a ScaledObject");
        let so = scaled[0];
        ensure!(
            so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
                && so["spec"]["minReplicaCount"]
                    .as_u64()
                    .is_some_and(|m| m >= 1),
            "{rel}: ScaledObject target {so}"
        );

        // Every list a worker pops: each queue's four priority buckets.
        let queues = env(container, "TASKSTACK_QUEUES").context("TASKSTACK_QUEUES")?;
        let expected: BTreeSet<String> = queues
            .split(',')
            .map(str::trim)
            .flat_map(|q| PRIORITY_BUCKETS.map(|b| queue_key(q, b)))
            .collect();
        let triggers = so["spec"]["triggers"].as_array().context("triggers")?;
        let redis: Vec<&Value> = triggers.iter().filter(|t| t["type"] == "redis").collect();
        let lists: BTreeSet<String> = redis
            .iter()
            .filter_map(|t| t["metadata"]["listName"].as_str().map(str::to_owned))
            .collect();
        ensure!(
            lists == expected && redis.len() == expected.len(),
            "{rel}: KEDA watches {lists:?}, the workers pop {expected:?}"
        );
        ensure!(
            triggers.iter().any(|t| t["type"] == "cpu"),
            "{rel}: no CPU trigger beside the queue lengths"
        );

        // Each trigger reaches the Redis the workers use, with the
        // password the workers read.
        let redis_svc = named(&objects, "Service", "redis")?;
        let ns = redis_svc["metadata"]["namespace"]
            .as_str()
            .context("namespace")?;
        let url = env(container, "TASKSTACK_BROKER_URL").context("TASKSTACK_BROKER_URL")?;
        let db = url.rsplit('/').next().unwrap_or("0");
        ensure!(
            url.starts_with("redis://redis:6379/"),
            "{rel}: the workers' broker {url} is not the Service redis"
        );
        let pod = &worker["spec"]["template"]["spec"];
        let password_file =
            env(container, "TASKSTACK_BROKER_PASSWORD_FILE").context("password file")?;
        let password_key = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["secret"]["items"].as_array())
            .flatten()
            .find(|i| password_file.ends_with(&format!("/{}", i["path"].as_str().unwrap_or("-"))))
            .and_then(|i| i["key"].as_str())
            .context("the password file is no Secret item")?;
        for t in &redis {
            let m = &t["metadata"];
            ensure!(
                m["address"] == format!("redis.{ns}.svc.cluster.local:6379").as_str()
                    && m["databaseIndex"] == db,
                "{rel}: trigger {t} does not reach redis.{ns} db {db}"
            );
            let auth_name = t["authenticationRef"]["name"]
                .as_str()
                .context("authenticationRef")?;
            let auth = named(&objects, "TriggerAuthentication", auth_name)?;
            let refs = auth["spec"]["secretTargetRef"]
                .as_array()
                .context("secretTargetRef")?;
            let pw = refs
                .iter()
                .find(|r| r["parameter"] == "password")
                .context("no password parameter")?;
            let secret = named(&objects, "Secret", pw["name"].as_str().unwrap_or("-"))?;
            ensure!(
                pw["key"] == password_key && secret["data"].get(password_key).is_some(),
                "{rel}: KEDA's password {pw} is not the workers' {password_key}"
            );
        }
    }
    Ok(())
}

#[test]
fn network_policies_let_only_taskstack_pods_reach_redis_and_only_web_be_reached() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    for (rel, objects) in overlays(&tree, &venv)? {
        let policies = kind(&objects, "NetworkPolicy");
        let pods: Vec<(String, &Value)> = workloads(&objects)
            .into_iter()
            .map(|(c, w)| (c, &w["spec"]["template"]["metadata"]["labels"]))
            .collect();
        ensure!(
            policies
                .iter()
                .any(|p| p["spec"]["podSelector"] == serde_json::json!({})
                    && p["spec"]["policyTypes"] == serde_json::json!(["Ingress"])
                    && p["spec"].get("ingress").is_none()),
            "{rel}: no default-deny ingress policy"
        );
        for (component, labels) in &pods {
            let mine: Vec<&&Value> = policies
                .iter()
                .filter(|p| selects(&p["spec"]["podSelector"], labels))
                .collect();
            let rules: Vec<&Value> = mine
                .iter()
                .filter_map(|p| p["spec"]["ingress"].as_array())
                .flatten()
                .collect();
            let ports = |r: &Value| -> BTreeSet<u64> {
                r["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["port"].as_u64())
                    .collect()
            };
            // Open to everyone: only web's API port.
            for r in rules.iter().filter(|r| r.get("from").is_none()) {
                ensure!(
                    component == "web" && ports(r) == BTreeSet::from([8000]),
                    "{rel}: {component} is reachable from anywhere: {r}"
                );
            }
            if component != "redis" {
                continue;
            }
            // Redis: from web, worker and beat (and KEDA's operator).
            for r in &rules {
                ensure!(ports(r) == BTreeSet::from([6379]), "{rel}: redis rule {r}");
                for peer in r["from"].as_array().into_iter().flatten() {
                    if peer.get("namespaceSelector").is_some() {
                        ensure!(
                            rel == EXAMPLE_KEDA
                                && peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                                    == "keda"
                                && peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                                    == "keda-operator",
                            "{rel}: redis is open to another namespace: {peer}"
                        );
                        continue;
                    }
                    let reached: BTreeSet<&str> = pods
                        .iter()
                        .filter(|(_, l)| selects(&peer["podSelector"], l))
                        .map(|(c, _)| c.as_str())
                        .collect();
                    ensure!(
                        reached == BTreeSet::from(["beat", "web", "worker"]),
                        "{rel}: redis admits {reached:?}"
                    );
                }
            }
            ensure!(!rules.is_empty(), "{rel}: nothing may reach redis");
            ensure!(
                mine.iter().any(|p| p["spec"]["policyTypes"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == "Egress"))
                    && p["spec"]["egress"] == serde_json::json!([])),
                "{rel}: redis may open connections"
            );
        }
    }
    Ok(())
}

#[test]
fn secrets_and_configuration_are_the_compose_files() -> Result<()> {
    let (tree, venv) = (Tree::new()?, tools());
    let kube = workspace().join("deploy/kubernetes/base");
    for (copy, original) in [
        ("taskstack.toml", "compose/taskstack.toml"),
        ("redis.conf", "compose/redis.conf"),
    ] {
        ensure!(
            std::fs::read(kube.join(copy))? == std::fs::read(workspace().join(original))?,
            "deploy/kubernetes/base/{copy} differs from {original}: keep them in step"
        );
    }
    for (rel, objects) in overlays(&tree, &venv)? {
        let secret = named(&objects, "Secret", "taskstack-secrets")?;
        let data = secret["data"].as_object().context("Secret data")?;
        let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
        ensure!(
            keys == BTreeSet::from(SECRET_KEYS),
            "{rel}: Secret keys {keys:?}"
        );
        let mut values = Vec::new();
        for key in SECRET_KEYS {
            let raw = secret_bytes(&data[key])?;
            ensure!(
                raw == tree.secret_file(key)?,
                "{rel}: Secret key {key} is not compose/init-secrets' file"
            );
            // KEDA reads the password as it is (the services would drop
            // a trailing newline, KEDA does not).
            ensure!(
                key != "redis_password" || !raw.ends_with(b"\n"),
                "{rel}: redis_password ends with a newline, which KEDA would send"
            );
            values.push(String::from_utf8(raw)?);
        }
        // No secret value outside the Secret.
        for o in objects.iter().filter(|o| o["kind"] != "Secret") {
            let text = o.to_string();
            for v in values.iter().filter(|v| v.len() >= 16) {
                ensure!(
                    !text.contains(v.trim()),
                    "{rel}: a secret value appears in {} {}",
                    o["kind"],
                    o["metadata"]["name"]
                );
            }
        }
        // The configuration files are compose's.
        for (prefix, file, original) in [
            (
                "taskstack-config",
                "taskstack.toml",
                "compose/taskstack.toml",
            ),
            ("redis-config", "redis.conf", "compose/redis.conf"),
        ] {
            let cm = kind(&objects, "ConfigMap")
                .into_iter()
                .find(|c| {
                    c["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .with_context(|| format!("{rel}: no ConfigMap {prefix}"))?;
            ensure!(
                cm["data"][file].as_str()
                    == Some(&std::fs::read_to_string(workspace().join(original))?),
                "{rel}: ConfigMap {prefix} is not {original}"
            );
        }
        // Redis reads its users where its configuration says.
        let conf = std::fs::read_to_string(workspace().join("compose/redis.conf"))?;
        let aclfile = conf
            .lines()
            .find_map(|l| l.strip_prefix("aclfile "))
            .context("no aclfile in redis.conf")?
            .trim();
        let redis = workload(&objects, "redis")?;
        let root = tree.path().join(format!("{}-redis", rel.replace('/', "_")));
        materialize(&objects, redis, &root)?;
        let acl = std::fs::read(root.join(aclfile.trim_start_matches('/')))
            .with_context(|| format!("{rel}: redis has no {aclfile}"))?;
        ensure!(
            acl == tree.secret_file("redis_users.acl")?,
            "{rel}: redis's {aclfile} is not the Secret's redis_users.acl"
        );
    }
    Ok(())
}
