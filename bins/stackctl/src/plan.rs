//! From a loaded compose [`Project`] to what the engine should run: each
//! service's container template with Compose v1's labels (so
//! `docker-compose -p <project> ps/logs/down` recognise what stackctl
//! made), its configuration hash, and the reconcile decisions against the
//! containers that already exist.

use crate::compose::{Project, Service};
use crate::engine::{ContainerSpec, ContainerSummary};
use serde::Serialize;
use std::collections::BTreeMap;

/// Compose's label keys.
pub mod labels {
    pub const PROJECT: &str = "com.docker.compose.project";
    pub const SERVICE: &str = "com.docker.compose.service";
    pub const ONEOFF: &str = "com.docker.compose.oneoff";
    pub const NUMBER: &str = "com.docker.compose.container-number";
    pub const VERSION: &str = "com.docker.compose.version";
    pub const CONFIG_HASH: &str = "com.docker.compose.config-hash";
    pub const WORKING_DIR: &str = "com.docker.compose.project.working_dir";
    pub const CONFIG_FILES: &str = "com.docker.compose.project.config_files";
    pub const NETWORK: &str = "com.docker.compose.network";
    pub const VOLUME: &str = "com.docker.compose.volume";
    /// stackctl's own mark (which tool made the container).
    pub const STACKCTL: &str = "io.taskstack.stackctl.version";
}

/// The Compose version written in `com.docker.compose.version`: the v1
/// release whose labels stackctl reproduces.
pub const COMPOSE_VERSION: &str = "1.29.2";

/// What a service is in the taskstack stack, from its command (or name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    Redis,
    Web,
    Worker,
    Beat,
    Other,
}

impl Role {
    /// The role of `svc`: its command's program (`/taskstack-beat`,
    /// `redis-server`; for the multi-call `taskstack`, its first argument:
    /// `taskstack worker`), else its name.
    pub fn of(svc: &Service) -> Self {
        let base = |p: &String| p.rsplit('/').next().unwrap_or(p).to_owned();
        let program = svc.command.as_ref().and_then(|c| match c.first() {
            Some(p) if base(p) == "taskstack" => c.get(1).cloned(),
            p => p.map(base),
        });
        let by = |s: &str| match s {
            "taskstack-web" | "web" => Some(Self::Web),
            "taskstack-worker" | "worker" => Some(Self::Worker),
            "taskstack-beat" | "beat" => Some(Self::Beat),
            "redis-server" | "redis" => Some(Self::Redis),
            _ => None,
        };
        program
            .as_deref()
            .and_then(by)
            .or_else(|| by(&svc.name))
            .unwrap_or(Self::Other)
    }
}

/// The label selecting everything of project `name`.
pub fn project_label(name: &str) -> String {
    format!("{}={name}", labels::PROJECT)
}

/// One service's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: String,
    pub role: Role,
    pub replicas: usize,
    /// SHA-256 of everything the containers are made from (the service's
    /// settings and the image's id), as `com.docker.compose.config-hash`.
    pub hash: String,
    template: ContainerSpec,
}

impl ServicePlan {
    /// Container number `n` (1-based): `<project>_<service>_<n>`.
    pub fn container(&self, project: &str, n: usize) -> ContainerSpec {
        let mut spec = self.template.clone();
        spec.name = format!("{project}_{}_{n}", self.service);
        spec.labels.insert(labels::NUMBER.into(), n.to_string());
        spec
    }

    /// The template every container of the service is made from.
    pub fn template(&self) -> &ContainerSpec {
        &self.template
    }
}

/// The desired state of every service; `replicas` overrides the file's
/// counts; `image_ids` (image name → id) goes into the hash, so a rebuilt
/// image recreates its containers.
pub fn plan(
    project: &Project,
    replicas: &BTreeMap<String, usize>,
    image_ids: &BTreeMap<String, String>,
) -> BTreeMap<String, ServicePlan> {
    project
        .services
        .values()
        .map(|svc| {
            let template = template(project, svc);
            #[derive(Serialize)]
            struct Hashed<'a> {
                service: &'a Service,
                image_id: Option<&'a String>,
                networks: &'a [(String, Vec<String>)],
                volumes: &'a [(String, String, bool)],
                binds: &'a [String],
            }
            let mut svc_no_count = svc.clone();
            svc_no_count.replicas = 0;
            let json = serde_json::to_vec(&Hashed {
                service: &svc_no_count,
                image_id: image_ids.get(&svc.image),
                networks: &template.networks,
                volumes: &template.volumes,
                binds: &template.binds,
            })
            .unwrap_or_default();
            let hash = hex(ring::digest::digest(&ring::digest::SHA256, &json).as_ref());
            let mut template = template;
            template
                .labels
                .insert(labels::CONFIG_HASH.into(), hash.clone());
            (
                svc.name.clone(),
                ServicePlan {
                    service: svc.name.clone(),
                    role: Role::of(svc),
                    replicas: replicas.get(&svc.name).copied().unwrap_or(svc.replicas),
                    hash,
                    template,
                },
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The labels of project `p` on its networks and volumes (`kind_label` is
/// [`labels::NETWORK`] or [`labels::VOLUME`]).
pub fn resource_labels(p: &Project, kind_label: &str, key: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::PROJECT.to_owned(), p.name.clone()),
        (kind_label.to_owned(), key.to_owned()),
        (labels::VERSION.to_owned(), COMPOSE_VERSION.to_owned()),
    ])
}

fn template(p: &Project, svc: &Service) -> ContainerSpec {
    let mut labels = BTreeMap::from([
        (labels::PROJECT.to_owned(), p.name.clone()),
        (labels::SERVICE.to_owned(), svc.name.clone()),
        (labels::ONEOFF.to_owned(), "False".to_owned()),
        (labels::VERSION.to_owned(), COMPOSE_VERSION.to_owned()),
        (
            labels::WORKING_DIR.to_owned(),
            p.working_dir.display().to_string(),
        ),
        (
            labels::CONFIG_FILES.to_owned(),
            p.file.display().to_string(),
        ),
        (
            labels::STACKCTL.to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ]);
    labels.retain(|_, v| !v.is_empty());
    let mut binds: Vec<String> = svc
        .binds
        .iter()
        .map(|b| {
            format!(
                "{}:{}{}",
                b.source.display(),
                b.target,
                if b.read_only { ":ro" } else { ":rw" }
            )
        })
        .collect();
    // Compose v1 mounts file secrets read-only at /run/secrets/<name>.
    for s in &svc.secrets {
        if let Some(secret) = p.secrets.get(s) {
            binds.push(format!("{}:/run/secrets/{s}:ro", secret.file.display()));
        }
    }
    let mut networks: Vec<String> = svc.networks.clone();
    networks.sort();
    ContainerSpec {
        name: String::new(),
        image: svc.image.clone(),
        command: svc.command.clone(),
        env: svc
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        user: svc.user.clone(),
        labels,
        binds,
        volumes: svc
            .volume_mounts
            .iter()
            .map(|v| (p.volume_name(&v.volume), v.target.clone(), v.read_only))
            .collect(),
        tmpfs: svc.tmpfs.clone(),
        networks: networks
            .iter()
            .map(|n| (p.network_name(n), vec![svc.name.clone()]))
            .collect(),
        ports: svc.ports.clone(),
        healthcheck: svc.healthcheck.clone(),
        restart: Some(svc.restart.clone()),
        init: svc.init,
        read_only: svc.read_only,
        cap_drop: svc.cap_drop.clone(),
        security_opt: svc.security_opt.clone(),
        logging: svc.logging.clone(),
        stop_timeout: svc.stop_grace_period.map(|d| d.as_secs()),
    }
}

/// What to do with one container slot of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Up to date: leave it (start it if it is not running).
    Keep {
        id: String,
        name: String,
        number: usize,
        running: bool,
    },
    /// Missing: create container `number`.
    Create { number: usize },
    /// Out of date (configuration hash differs): replace it.
    Recreate {
        id: String,
        name: String,
        number: usize,
    },
    /// Surplus (scaled down, or a duplicate number): remove it.
    Remove { id: String, name: String },
}

/// Decides, for `plan`'s service, what to do with `existing` (the
/// project's containers, any service): containers 1..=replicas are kept
/// when their hash matches, recreated otherwise, created when missing;
/// anything else of the service is removed. Never two containers with one
/// number.
pub fn reconcile(plan: &ServicePlan, existing: &[ContainerSummary]) -> Vec<Action> {
    let mut mine: Vec<&ContainerSummary> = existing
        .iter()
        .filter(|c| c.label(labels::SERVICE) == Some(plan.service.as_str()))
        .filter(|c| c.label(labels::ONEOFF) != Some("True"))
        .collect();
    // Of two containers with one number, the up-to-date running one wins.
    mine.sort_by_key(|c| {
        (
            c.label(labels::NUMBER)
                .and_then(|n| n.parse::<usize>().ok()),
            c.label(labels::CONFIG_HASH) != Some(plan.hash.as_str()),
            c.state != "running",
            c.name.clone(),
        )
    });
    let mut actions = Vec::new();
    let mut taken: BTreeMap<usize, ()> = BTreeMap::new();
    for c in &mine {
        let number = c
            .label(labels::NUMBER)
            .and_then(|n| n.parse::<usize>().ok());
        match number {
            Some(n) if (1..=plan.replicas).contains(&n) && !taken.contains_key(&n) => {
                taken.insert(n, ());
                if c.label(labels::CONFIG_HASH) == Some(plan.hash.as_str()) {
                    actions.push(Action::Keep {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        number: n,
                        running: c.state == "running",
                    });
                } else {
                    actions.push(Action::Recreate {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        number: n,
                    });
                }
            }
            _ => actions.push(Action::Remove {
                id: c.id.clone(),
                name: c.name.clone(),
            }),
        }
    }
    for n in 1..=plan.replicas {
        if !taken.contains_key(&n) {
            actions.push(Action::Create { number: n });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose;
    use std::path::Path;

    fn project(text: &str) -> Project {
        compose::parse(
            text,
            Path::new("/p/docker-compose.yml"),
            Path::new("/p"),
            compose::Env::new(),
            Some("proj"),
        )
        .expect("valid compose")
    }

    fn summary(plan: &ServicePlan, n: &str, hash: &str, state: &str) -> ContainerSummary {
        let mut labels = BTreeMap::from([
            (labels::SERVICE.to_owned(), plan.service.clone()),
            (labels::NUMBER.to_owned(), n.to_owned()),
            (labels::CONFIG_HASH.to_owned(), hash.to_owned()),
        ]);
        labels.insert(labels::PROJECT.into(), "proj".into());
        ContainerSummary {
            id: format!("id-{n}-{hash}"),
            name: format!("proj_{}_{n}", plan.service),
            labels,
            state: state.into(),
        }
    }

    const FILE: &str = "services:\n  worker:\n    image: app\n    command: [/taskstack-worker]\n    deploy: {replicas: 2}\n    secrets: [pw]\n    networks: [backend]\n  cache:\n    image: r\n    command: [redis-server]\n    volumes: [\"data:/data\"]\n    networks: [backend]\nnetworks:\n  backend: {internal: true}\nvolumes:\n  data: {}\nsecrets:\n  pw: {file: ./secrets/pw}\n";

    #[test]
    fn roles_come_from_the_program_or_the_multi_call_binarys_argument() {
        let p = project(
            "services:\n  a: {image: x, command: [/usr/local/bin/taskstack-worker]}\n  \
             b: {image: x, command: [/usr/local/bin/taskstack, worker, -Q, app]}\n  \
             c: {image: x, command: [taskstack, beat]}\n  \
             d: {image: x, command: [python3, /app/app.py]}\n  \
             web: {image: x}\n",
        );
        let role = |s: &str| Role::of(&p.services[s]);
        assert_eq!(role("a"), Role::Worker);
        assert_eq!(role("b"), Role::Worker);
        assert_eq!(role("c"), Role::Beat);
        assert_eq!(role("d"), Role::Other);
        assert_eq!(role("web"), Role::Web);
    }

    #[test]
    fn containers_carry_compose_labels_names_secrets_and_networks() {
        let p = project(FILE);
        let plans = plan(&p, &BTreeMap::new(), &BTreeMap::new());
        let w = &plans["worker"];
        assert_eq!((w.role, w.replicas), (Role::Worker, 2));
        assert_eq!(plans["cache"].role, Role::Redis);
        let c = w.container("proj", 2);
        assert_eq!(c.name, "proj_worker_2");
        for (k, v) in [
            (labels::PROJECT, "proj"),
            (labels::SERVICE, "worker"),
            (labels::ONEOFF, "False"),
            (labels::NUMBER, "2"),
            (labels::VERSION, COMPOSE_VERSION),
            (labels::WORKING_DIR, "/p"),
            (labels::CONFIG_FILES, "/p/docker-compose.yml"),
        ] {
            assert_eq!(c.labels.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(c.labels[labels::CONFIG_HASH], w.hash);
        assert_eq!(c.binds, ["/p/secrets/pw:/run/secrets/pw:ro"]);
        assert_eq!(
            c.networks,
            [("proj_backend".to_owned(), vec!["worker".to_owned()])]
        );
        assert_eq!(
            plans["cache"].template().volumes,
            [("proj_data".to_owned(), "/data".to_owned(), false)]
        );
    }

    #[test]
    fn the_hash_follows_settings_and_image_but_not_replicas() {
        let p = project(FILE);
        let base = plan(&p, &BTreeMap::new(), &BTreeMap::new());
        let scaled = plan(
            &p,
            &BTreeMap::from([("worker".to_owned(), 5)]),
            &BTreeMap::new(),
        );
        assert_eq!(base["worker"].hash, scaled["worker"].hash);
        assert_eq!(scaled["worker"].replicas, 5);
        let rebuilt = plan(
            &p,
            &BTreeMap::new(),
            &BTreeMap::from([("app".to_owned(), "sha256:2".to_owned())]),
        );
        assert_ne!(base["worker"].hash, rebuilt["worker"].hash);
        assert_eq!(base["cache"].hash, rebuilt["cache"].hash);
        let changed = project(&FILE.replace("replicas: 2}", "replicas: 2}\n    user: \"1:1\""));
        assert_ne!(
            base["worker"].hash,
            plan(&changed, &BTreeMap::new(), &BTreeMap::new())["worker"].hash
        );
    }

    #[test]
    fn reconcile_keeps_recreates_creates_and_removes() {
        let p = project(FILE);
        let plans = plan(&p, &BTreeMap::new(), &BTreeMap::new());
        let w = &plans["worker"];
        assert_eq!(
            reconcile(w, &[]),
            [Action::Create { number: 1 }, Action::Create { number: 2 }]
        );
        let same = summary(w, "1", &w.hash, "running");
        let old = summary(w, "2", "old", "running");
        let extra = summary(w, "3", &w.hash, "running");
        let dup = summary(w, "1", "other", "exited");
        let other_service = summary(&plans["cache"], "1", "x", "running");
        let actions = reconcile(
            w,
            &[
                same.clone(),
                old.clone(),
                extra.clone(),
                dup.clone(),
                other_service,
            ],
        );
        assert!(actions.contains(&Action::Keep {
            id: same.id,
            name: same.name,
            number: 1,
            running: true
        }));
        assert!(actions.contains(&Action::Recreate {
            id: old.id,
            name: old.name,
            number: 2
        }));
        assert!(actions.contains(&Action::Remove {
            id: extra.id,
            name: extra.name
        }));
        assert!(actions.contains(&Action::Remove {
            id: dup.id,
            name: dup.name
        }));
        assert_eq!(actions.len(), 4, "{actions:?}");
    }
}
