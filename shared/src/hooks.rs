//! Testing hooks read from the environment (`FTB_*`). Each is parsed here, and [`check`] runs
//! before anything is loaded, so a value that does not parse stops the run with exit code 2 naming
//! the variable and the value (a silently ignored hook would make a test pass for the wrong
//! reason). The places that use a hook call its function again; after [`check`] it cannot fail.

use crate::error::ConfigError;

/// `FTB_INJECT_OOM_AT_STEP=K`: optimizer step K (0-based) fails as an out-of-memory error at the
/// backend boundary.
pub const INJECT_OOM_AT_STEP: &str = "FTB_INJECT_OOM_AT_STEP";
/// `FTB_ASSUME_FREE_MEMORY_BYTES=N`: the preflight assumes N bytes of free device memory.
pub const ASSUME_FREE_MEMORY_BYTES: &str = "FTB_ASSUME_FREE_MEMORY_BYTES";
/// `FTB_ASSUME_TOTAL_MEMORY_BYTES=N`: the preflight assumes the device has N bytes in all.
pub const ASSUME_TOTAL_MEMORY_BYTES: &str = "FTB_ASSUME_TOTAL_MEMORY_BYTES";
/// `FTB_FAULT=RANK:STEP:exit|hang`: a data-parallel rank exits or hangs at a step.
pub const FAULT: &str = "FTB_FAULT";

fn var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

fn number<T: std::str::FromStr>(name: &str, what: &str) -> Result<Option<T>, ConfigError> {
    match var(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            ConfigError::value(
                name,
                format!("{v:?}"),
                &format!("not {what}"),
                &format!("set {name} to {what}, or unset it"),
            )
        }),
    }
}

/// `FTB_INJECT_OOM_AT_STEP`.
pub fn inject_oom_at_step() -> Result<Option<usize>, ConfigError> {
    number(INJECT_OOM_AT_STEP, "a step index (0, 1, 2, ...)")
}

/// `FTB_ASSUME_FREE_MEMORY_BYTES`.
pub fn assume_free_memory_bytes() -> Result<Option<u64>, ConfigError> {
    number(ASSUME_FREE_MEMORY_BYTES, "a number of bytes")
}

/// `FTB_ASSUME_TOTAL_MEMORY_BYTES`.
pub fn assume_total_memory_bytes() -> Result<Option<u64>, ConfigError> {
    number(ASSUME_TOTAL_MEMORY_BYTES, "a number of bytes")
}

/// What `FTB_FAULT` makes a rank do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Exit,
    Hang,
}

/// `FTB_FAULT=RANK:STEP:exit|hang`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub step: usize,
    pub kind: FaultKind,
}

/// `FTB_FAULT`.
pub fn fault() -> Result<Option<Fault>, ConfigError> {
    let Some(v) = var(FAULT) else {
        return Ok(None);
    };
    let bad = || {
        ConfigError::value(
            FAULT,
            format!("{v:?}"),
            "not RANK:STEP:exit or RANK:STEP:hang",
            "e.g. FTB_FAULT=1:2:exit (rank 1 exits at step 2), or unset it",
        )
    };
    let parts: Vec<&str> = v.trim().split(':').collect();
    let [rank, step, kind] = parts[..] else {
        return Err(bad());
    };
    Ok(Some(Fault {
        rank: rank.parse().map_err(|_| bad())?,
        step: step.parse().map_err(|_| bad())?,
        kind: match kind {
            "exit" => FaultKind::Exit,
            "hang" => FaultKind::Hang,
            _ => return Err(bad()),
        },
    }))
}

/// An on/off hook (`FTB_PROFILE`, `FTB_HOST_INIT`, `FTB_DEBUG_PANICS`): unset, empty, `0`,
/// `false`, `off` or `no` is off; `1`, `true`, `on` or `yes` is on; anything else is an error.
pub fn flag(name: &str) -> Result<bool, ConfigError> {
    parse_flag(name, var(name).as_deref())
}

/// [`flag`]'s rule applied to a value read elsewhere (`None`: unset).
pub fn parse_flag(name: &str, value: Option<&str>) -> Result<bool, ConfigError> {
    match value {
        None => Ok(false),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "off" | "no" => Ok(false),
            "1" | "true" | "on" | "yes" => Ok(true),
            _ => Err(ConfigError::value(
                name,
                format!("{v:?}"),
                "not an on/off value",
                &format!("set {name}=1 to turn it on, or unset it"),
            )),
        },
    }
}

/// Parses every hook the shared runner reads; the first that does not parse is the error.
pub fn check() -> Result<(), ConfigError> {
    inject_oom_at_step()?;
    assume_free_memory_bytes()?;
    assume_total_memory_bytes()?;
    fault()?;
    Ok(())
}
