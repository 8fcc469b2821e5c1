//! Which images `up` runs when the compose file's defaults are not here:
//! `stackctl build` makes `localhost/taskstack:local` and
//! `localhost/taskstack-redis:local`, and a plain `stackctl up` afterwards
//! should run them, not ask for `ghcr.io/taskstack/taskstack:latest`.
//!
//! The rule is narrow so it never overrides a choice: a variable
//! (`TASKSTACK_IMAGE`, `REDIS_IMAGE`) set in the environment or in the
//! `.env` beside the compose file is left alone; otherwise the built tag
//! replaces the file's default only when that default is not on the
//! engine and the built image is, and only if every service it changes
//! was missing its image. `up` announces each substitution.

use crate::build::{APP_REPOSITORY, DEFAULT_TAG, REDIS_REPOSITORY};
use crate::compose::{Env, Project, dotenv};
use crate::engine::Engine;
use crate::error::StackError;

/// The compose variables that choose the images, with the repository
/// `stackctl build` tags for each.
pub const BUILT: [(&str, &str); 2] = [
    ("TASKSTACK_IMAGE", APP_REPOSITORY),
    ("REDIS_IMAGE", REDIS_REPOSITORY),
];

/// Loads the project with `env`, substituting `stackctl build`'s default
/// images (tag [`DEFAULT_TAG`]) as the module docs say; `env` gets the
/// variables that were set. Returns the project and one line per
/// substitution, for the user.
pub async fn prefer_built<E: Engine>(
    engine: &E,
    env: &mut Env,
    load: impl Fn(&Env) -> Result<Project, StackError>,
) -> Result<(Project, Vec<String>), StackError> {
    let mut project = load(env)?;
    let dot = project
        .file
        .parent()
        .map(|d| d.join(".env"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| dotenv::parse(&t).ok())
        .unwrap_or_default();
    let mut notes = Vec::new();
    for (var, repository) in BUILT {
        if env.contains_key(var) || dot.contains_key(var) {
            continue;
        }
        let built = format!("{repository}:{DEFAULT_TAG}");
        if engine.image_id(&built).await?.is_none() {
            continue;
        }
        let mut trial_env = env.clone();
        trial_env.insert(var.to_owned(), built.clone());
        let trial = load(&trial_env)?;
        let mut changed = Vec::new();
        let mut replaced = Vec::new();
        for (name, svc) in &project.services {
            let Some(new) = trial.services.get(name) else {
                continue;
            };
            if new.image != svc.image {
                if engine.image_id(&svc.image).await?.is_some() {
                    // Something this variable chooses is here: not ours to change.
                    changed.clear();
                    break;
                }
                changed.push(name.clone());
                if !replaced.contains(&svc.image) {
                    replaced.push(svc.image.clone());
                }
            }
        }
        if changed.is_empty() {
            continue;
        }
        notes.push(format!(
            "using {built} (made by `stackctl build`) for {}: {} is not on this engine and {var} is not set",
            changed.join(", "),
            replaced.join(", ")
        ));
        *env = trial_env;
        project = trial;
    }
    Ok((project, notes))
}
