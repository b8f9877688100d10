//! Checks on the files and folders a run is pointed at, made before anything is read at length or
//! written, so that a bad path is a usage error (exit code 2) naming the path, the problem and the
//! fix, instead of a failure after the data has loaded: a FIFO that would block a read forever, a
//! folder where a file is expected, an output folder that cannot be written, a file name from a
//! model's index that leaves the model folder. Also the two ways a run's files are written and
//! read back that every layer needs: atomic writes, and the step log (`steps.jsonl`). At the
//! bottom of the crate: uses nothing above it.

use std::fs::FileType;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;

use crate::error::ConfigError;

/// Text without a leading UTF-8 byte-order mark (which editors on Windows write, and which JSON,
/// TOML and CSV parsers otherwise report as a bad character at line 1 column 1).
pub fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

/// Bytes without a leading UTF-8 byte-order mark.
pub fn strip_bom_bytes(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xef\xbb\xbf").unwrap_or(b)
}

/// What a file-system entry is, for messages ("a folder", "a named pipe (FIFO)", ...).
fn kind_of(t: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_file() {
        "a file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
}

/// Why `path` cannot be read as a regular file, or `None` when it can: missing, a dangling link, a
/// folder, a FIFO or device (whose read could block forever), or unreadable.
pub fn regular_file_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(match std::fs::symlink_metadata(path) {
                Ok(_) => format!(
                    "is a symbolic link to {}, which does not exist",
                    std::fs::read_link(path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "a missing file".into())
                ),
                Err(_) => "does not exist".into(),
            });
        }
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    let t = meta.file_type();
    if !t.is_file() {
        let why = if t.is_dir() {
            ""
        } else {
            // A read would wait for a writer (FIFO, socket) or never end (device).
            ": reading it could block forever"
        };
        return Some(format!("is {}, not a regular file{why}", kind_of(&t)));
    }
    // Opening is cheap and catches what the metadata does not (permissions).
    std::fs::File::open(path)
        .err()
        .map(|e| format!("cannot be opened ({e})"))
}

/// Reads a text file (JSON, TOML) that must be a regular file, without a byte-order mark.
pub fn read_text(path: &Path) -> Result<String, String> {
    if let Some(p) = regular_file_problem(path) {
        return Err(p);
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read ({e})"))?;
    Ok(strip_bom(&text).to_string())
}

/// `name` (a file name from a model's `model.safetensors.index.json`) inside `dir`, or `None` when
/// it would leave `dir`: an absolute path or one with `..`. A checkpoint names its shards beside
/// the index; a name like `../../etc/passwd` is a hostile or broken index. (Links inside the folder
/// are followed as usual: the hub's cache links every file to its blob store.)
pub fn file_inside(dir: &Path, name: &str) -> Option<PathBuf> {
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && rel.components().any(|c| matches!(c, Component::Normal(_)));
    plain.then(|| dir.join(rel))
}

/// A model or tokenizer named on the command line: a local folder or a hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Folder(PathBuf),
    Hub(String),
}

/// Whether `spec` can only mean a path: a hub id is `name` or `owner/name`, never absolute, never
/// starting with `.` or `~`, never with a backslash or a second slash.
pub fn looks_like_a_path(spec: &str) -> bool {
    Path::new(spec).is_absolute()
        || spec.starts_with('.')
        || spec.starts_with('~')
        || spec.contains('\\')
        || spec.matches('/').count() > 1
        || spec.ends_with('/')
}

/// Resolves `spec` (a `--model` or `--tokenizer` value) to a folder or a hub id. A path that does
/// not exist, or that is a file, is an error naming it; it is never looked up on the hub (where it
/// would fail later with a network error that says nothing about the path).
/// `what` names the folder ("model folder"), `fix` says what to pass instead.
pub fn folder_or_hub_id(spec: &str, what: &str, fix: &str) -> Result<Location, ConfigError> {
    let p = Path::new(spec);
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => return Ok(Location::Folder(p.to_path_buf())),
        Ok(m) => {
            return Err(ConfigError::input(
                p,
                format!("is {}, not a {what}", kind_of(&m.file_type())),
                fix,
            ))
        }
        Err(_) if std::fs::symlink_metadata(p).is_ok() => {
            return Err(ConfigError::input(
                p,
                format!("is a symbolic link whose target does not exist; a {what} was expected"),
                fix,
            ))
        }
        Err(_) => {}
    }
    if looks_like_a_path(spec) || spec.trim().is_empty() {
        return Err(ConfigError::input(p, format!("{what} does not exist"), fix));
    }
    Ok(Location::Hub(spec.to_string()))
}

/// Checks, before any data or model loads, that a run can write its files under `out_dir`: the
/// run folder `runs/<run-id>/` and the copy of the summary beside it. An existing `out_dir` must be
/// a folder (a dangling link, a file, a read-only or immutable folder, `/proc` are refused); a
/// missing one must be creatable (its nearest existing ancestor a writable folder). Writability is
/// tried for real with a temporary file that is removed at once, since permission bits say
/// nothing about read-only or immutable file systems (and root passes every permission check).
/// Nothing is left behind.
pub fn check_output_dir(out_dir: &Path) -> Result<(), ConfigError> {
    let fix = "pass a writable folder with --output-dir";
    let refuse = |path: &Path, problem: String| Err(ConfigError::input(path, problem, fix));
    let out = if out_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        out_dir
    };
    match std::fs::metadata(out) {
        Ok(m) if m.is_dir() => {
            for (name, want_dir) in [("runs", true), ("benchmark_summary.json", false)] {
                let p = out.join(name);
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() != want_dir => {
                        return refuse(
                            &p,
                            format!(
                                "is {} where the run writes its {}",
                                kind_of(&m.file_type()),
                                if want_dir { "run folders" } else { "summary" }
                            ),
                        )
                    }
                    Ok(_) => {}
                    Err(_) if std::fs::symlink_metadata(&p).is_ok() => {
                        return refuse(&p, "is a symbolic link whose target does not exist".into())
                    }
                    Err(_) => {}
                }
            }
            try_write(out).or_else(|p| refuse(out, p))?;
            let runs = out.join("runs");
            if runs.is_dir() {
                try_write(&runs).or_else(|p| refuse(&runs, p))?;
            }
            Ok(())
        }
        Ok(m) => refuse(
            out,
            format!(
                "is {}; the output folder must be a folder",
                kind_of(&m.file_type())
            ),
        ),
        Err(_) if std::fs::symlink_metadata(out).is_ok() => refuse(
            out,
            format!(
                "is a symbolic link to {}, which does not exist",
                std::fs::read_link(out)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "a missing folder".into())
            ),
        ),
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            refuse(out, format!("cannot be examined ({e})"))
        }
        Err(_) => {
            // Missing: it will be created; its nearest existing ancestor must take a new folder.
            let mut up = out.parent();
            while let Some(a) = up {
                let a = if a.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    a
                };
                match std::fs::metadata(a) {
                    Ok(m) if m.is_dir() => {
                        return try_write(a).or_else(|p| {
                            refuse(out, format!("cannot be created in {}: {p}", a.display()))
                        });
                    }
                    Ok(m) => {
                        return refuse(
                            out,
                            format!(
                                "cannot be created: {} is {}",
                                a.display(),
                                kind_of(&m.file_type())
                            ),
                        )
                    }
                    Err(_) if std::fs::symlink_metadata(a).is_ok() => {
                        return refuse(
                            out,
                            format!(
                            "cannot be created: {} is a symbolic link whose target does not exist",
                            a.display()
                        ),
                        )
                    }
                    Err(_) => up = a.parent(),
                }
            }
            refuse(
                out,
                "cannot be created (no existing folder above it)".into(),
            )
        }
    }
}

/// Creates and removes a file in `dir`; the error text when that fails.
fn try_write(dir: &Path) -> Result<(), String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let probe = dir.join(format!(
        ".ftb-write-check-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot write there ({e})")),
    }
}

/// Writes a file so that readers see either the old content or the new, never a part: the bytes
/// go to a temporary file in the same folder, are flushed to disk, then renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    // A temporary file is created readable by its owner only (0600); the result is an ordinary
    // file: the permissions of the file it replaces, else rw-r--r--.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::metadata(path)
            .map(|m| m.permissions())
            .unwrap_or_else(|_| std::fs::Permissions::from_mode(0o644));
        tmp.as_file()
            .set_permissions(perms)
            .with_context(|| format!("setting permissions of {}", tmp.path().display()))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Reads the `steps.jsonl` of a run folder (tests and reports).
///
/// The log is the one file not written atomically: it is appended and flushed a line per step, so
/// that a crash keeps every completed step. A process killed in the middle of an append leaves a
/// last line without its newline; that torn line is left out, while a bad line anywhere else is an
/// error naming the file and the line.
pub fn read_steps(run_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = run_dir.join("steps.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let torn = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let last = lines.last().map(|(i, _)| *i);
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines {
        match serde_json::from_str(l) {
            Ok(v) => out.push(v),
            Err(_) if torn && Some(i) == last => {}
            Err(e) => anyhow::bail!(
                "{}: line {}: not a step record ({e})",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

/// How many steps the first run folder under `out_dir` (`runs/<run-id>/steps.jsonl`) has logged
/// so far; 0 before there is one. For watching a running binary from outside (the signal tests
/// of both binaries wait for the first step with it).
pub fn steps_logged(out_dir: &Path) -> usize {
    std::fs::read_dir(out_dir.join("runs"))
        .ok()
        .and_then(|mut r| r.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read_to_string(e.path().join("steps.jsonl")).ok())
        .map_or(0, |t| t.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_logged_counts_the_first_run_folders_lines() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(steps_logged(d.path()), 0);
        let run = d.path().join("runs").join("run-1");
        std::fs::create_dir_all(&run).unwrap();
        assert_eq!(steps_logged(d.path()), 0);
        std::fs::write(run.join("steps.jsonl"), "{}\n{}\n").unwrap();
        assert_eq!(steps_logged(d.path()), 2);
    }

    #[test]
    fn a_bom_is_stripped_once() {
        assert_eq!(strip_bom("\u{feff}{}"), "{}");
        assert_eq!(strip_bom("{}"), "{}");
        assert_eq!(strip_bom_bytes(b"\xef\xbb\xbfa"), b"a");
    }

    #[test]
    fn index_names_may_not_leave_the_folder() {
        let d = Path::new("/m");
        assert_eq!(
            file_inside(d, "model-00001.safetensors"),
            Some(PathBuf::from("/m/model-00001.safetensors"))
        );
        assert_eq!(
            file_inside(d, "shards/a.safetensors"),
            Some(PathBuf::from("/m/shards/a.safetensors"))
        );
        for bad in [
            "../../../../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "",
            ".",
        ] {
            assert_eq!(file_inside(d, bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_never_hub_ids() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(
            folder_or_hub_id(d.path().to_str().unwrap(), "model folder", "fix").unwrap(),
            Location::Folder(d.path().to_path_buf())
        );
        assert_eq!(
            folder_or_hub_id("microsoft/Phi-3-mini-4k-instruct", "model folder", "fix").unwrap(),
            Location::Hub("microsoft/Phi-3-mini-4k-instruct".into())
        );
        for missing in ["/no/such/tok", "./tok", "../tok", "a/b/c", "~/tok"] {
            let e = folder_or_hub_id(missing, "tokenizer folder", "fix").unwrap_err();
            assert!(
                e.to_string().contains("tokenizer folder does not exist"),
                "{missing}: {e}"
            );
        }
        let e = folder_or_hub_id(f.to_str().unwrap(), "model folder", "fix").unwrap_err();
        assert!(e.to_string().contains("not a model folder"), "{e}");
    }

    #[test]
    fn output_folders_that_cannot_take_a_run_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_output_dir(d.path()).is_ok());
        assert!(check_output_dir(&d.path().join("new/deeper")).is_ok());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "left nothing"
        );
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = check_output_dir(&file).unwrap_err().to_string();
        assert!(
            e.contains("must be a folder") && e.contains("--output-dir"),
            "{e}"
        );
        let e = check_output_dir(&file.join("under"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be created"), "{e}");
        #[cfg(unix)]
        {
            let link = d.path().join("dangling");
            std::os::unix::fs::symlink(d.path().join("gone"), &link).unwrap();
            let e = check_output_dir(&link).unwrap_err().to_string();
            assert!(e.contains("does not exist"), "{e}");
            if Path::new("/proc/self").exists() {
                let e = check_output_dir(Path::new("/proc/ftb-out"))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("cannot be created in /proc"), "{e}");
            }
        }
        let runs_file = tempfile::tempdir().unwrap();
        std::fs::write(runs_file.path().join("runs"), "x").unwrap();
        let e = check_output_dir(runs_file.path()).unwrap_err().to_string();
        assert!(e.contains("where the run writes its run folders"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_not_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pipe.jsonl");
        let ok = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: mkfifo unavailable");
            return;
        }
        let e = regular_file_problem(&p).unwrap();
        assert!(e.contains("named pipe") && e.contains("block"), "{e}");
        assert!(regular_file_problem(d.path()).unwrap().contains("folder"));
        assert_eq!(
            regular_file_problem(&d.path().join("no")).as_deref(),
            Some("does not exist")
        );
    }
}
