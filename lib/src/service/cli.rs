//! The command-line options every service binary shares (feature `cli`).

use crate::config::{Config, ConfigError};
use serde_json::{Value, json};
use std::path::PathBuf;

/// `--config`, `--log-level`, `--log-format` and `--allow-root`, flattened
/// into each binary's own options (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file (wins over TASKSTACK_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. info or taskstack=debug.
    #[arg(long)]
    pub log_level: Option<String>,
    /// auto, json or pretty.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Run even as root (uid 0).
    #[arg(long)]
    pub allow_root: bool,
}

impl CommonArgs {
    /// Loads the configuration with these options and the binary's own
    /// `overrides` (configuration key, value) on top.
    pub fn load(&self, mut overrides: Vec<(&'static str, Value)>) -> Result<Config, ConfigError> {
        if let Some(v) = &self.log_level {
            overrides.push(("log_level", json!(v)));
        }
        if let Some(v) = &self.log_format {
            overrides.push(("log_format", json!(v)));
        }
        if self.allow_root {
            overrides.push(("allow_root", json!(true)));
        }
        Config::load_from(self.config.as_deref(), &overrides)
    }
}
