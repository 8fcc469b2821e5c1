//! Loading: the layers merged by figment, and its errors described by
//! key, source and (for a `[[schedule]]` entry) the entry's name.

use super::{CONFIG_FILE_ENV, Config, ConfigError, ENV_PREFIX};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde_json::Value;
use std::path::{Path, PathBuf};

impl Config {
    /// Loads defaults < `TASKSTACK_CONFIG` file < `TASKSTACK_*` environment
    /// < `overrides` (key, value) pairs, then validates.
    pub fn load(overrides: &[(&str, Value)]) -> Result<Self, ConfigError> {
        Self::load_from(None, overrides)
    }

    /// Like [`Config::load`], with the TOML file given explicitly (a
    /// command-line `--config`), which wins over `TASKSTACK_CONFIG`.
    pub fn load_from(
        file: Option<&Path>,
        overrides: &[(&str, Value)],
    ) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
        if let Some(path) = file {
            std::fs::metadata(&path).map_err(|e| ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            fig = fig.merge(Toml::file_exact(&path));
        }
        fig = fig.merge(Env::prefixed(ENV_PREFIX).ignore(&["CONFIG"]));
        for (key, value) in overrides {
            fig = fig.merge(Serialized::default(key, value));
        }
        Self::from_figment(fig)
    }

    /// Extracts and validates a configuration from any figment (tests use this
    /// with in-memory providers).
    pub fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            let names = schedule_names(&fig);
            ConfigError::Load(
                e.into_iter()
                    .map(|e| describe(e, &names))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The `name` of each `[[schedule]]` entry as written (for error messages
/// about entries that do not deserialize).
fn schedule_names(fig: &Figment) -> Vec<Option<String>> {
    fig.extract_inner::<Vec<Value>>("schedule")
        .map(|entries| {
            entries
                .iter()
                .map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// One figment error as "key `k` (from <source>): <what>", with the
/// environment variable spelled out when that is where the value came from,
/// and a `[[schedule]]` entry named by its name as well as its position.
fn describe(e: figment::Error, schedule_names: &[Option<String>]) -> String {
    if let [first, index, field, ..] = e.path.as_slice()
        && first == "schedule"
        && let Ok(i) = index.parse::<usize>()
    {
        let entry = match schedule_names.get(i).cloned().flatten() {
            Some(name) => format!("`{name}` (schedule[{i}])"),
            None => format!("schedule[{i}]"),
        };
        return format!("schedule entry {entry}: field `{field}`: {}", e.kind);
    }
    let key = e.path.join(".").to_lowercase();
    let source = match &e.metadata {
        Some(m) if m.name.contains("environment") => {
            format!("environment variable {ENV_PREFIX}{}", key.to_uppercase())
        }
        Some(m) => match &m.source {
            Some(src) => format!("{} ({src})", m.name),
            None => m.name.to_string(),
        },
        None => "configuration".into(),
    };
    if key.is_empty() {
        format!("{} (from {source})", e.kind)
    } else {
        format!("configuration key `{key}` (from {source}): {}", e.kind)
    }
}
