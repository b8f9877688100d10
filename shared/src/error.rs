//! Errors a user can cause, each naming the bad value and the fix, with the exit code it maps to.

use std::path::PathBuf;

/// A configuration problem found before any model is loaded: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {key} = {value}: {reason}; {fix}")]
    Value {
        key: String,
        value: String,
        reason: String,
        fix: String,
    },
    #[error("config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A file or folder the run was pointed at (model folder, `config.json`, tokenizer, output
    /// folder) that cannot serve: named with the problem and the fix.
    #[error("{}: {problem}; {fix}", path.display())]
    Input {
        path: PathBuf,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    /// A bad value of a setting (flag, TOML key, environment variable).
    pub fn value(key: &str, value: impl ToString, reason: &str, fix: &str) -> Self {
        Self::Value {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }

    /// A file or folder that cannot serve.
    pub fn input(
        path: impl Into<PathBuf>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::Input {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// A data problem found before the model loads (bad record, unreadable file): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}{}: {problem}. Fix: {fix}", location.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
pub struct DataError {
    /// The file or hub id the data came from.
    pub source_name: String,
    /// Line, row or record, where known.
    pub location: Option<String>,
    pub problem: String,
    pub fix: String,
}

/// Exit codes shared by both binaries.
pub mod exit {
    /// The run completed.
    pub const OK: i32 = 0;
    /// The run failed while running; a summary with `status: failed` was written.
    pub const FAILED: i32 = 1;
    /// Bad input (flags, TOML, data): nothing was run.
    pub const USAGE: i32 = 2;
    /// Interrupted by Ctrl-C or SIGTERM: after the first step, a summary with `status:
    /// interrupted` was written; before it (loading) or at a second Ctrl-C, nothing was kept.
    pub const INTERRUPTED: i32 = 130;
}

/// The text of a caught panic (`std::panic::catch_unwind`'s payload: a `String` or a `&str`, as
/// `panic!` makes them), or `None` for any other payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// The exit code for an error that ended a run before training started.
pub fn exit_code_for(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<ConfigError>().is_some() || err.downcast_ref::<DataError>().is_some() {
        exit::USAGE
    } else {
        exit::FAILED
    }
}
