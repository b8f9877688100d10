//! Ctrl-C and SIGTERM. What a signal does depends on how far the run is:
//!
//! - **before the run folder exists** (reading flags, the model's config, the tokenizer, the data):
//!   nothing has been written and nothing measured, so the process exits at once with code 130. A
//!   read that blocks (a slow download, a pipe) cannot hold it.
//! - **loading the model**, before the first step: the run folder holds only the load phase's
//!   telemetry; it is removed and the process exits at once with 130.
//! - **training**: the first signal asks the loop to stop after the current step and write the
//!   `interrupted` summary; a second one exits at once, without a summary. A second signal within
//!   [`SAME_SIGNAL`] of the first is the same one delivered twice, not a second press: coreutils'
//!   `timeout` sends its signal to the process and then to the process group it made, so a run
//!   under `timeout -s INT` got two at once and ended without a summary (measured on the device,
//!   2026-12-06). No person presses Ctrl-C twice within that window.
//!
//! Exiting "at once" happens on the signal-handling thread while the main thread may be inside
//! libtorch or MLX. `std::process::exit` would run `atexit` handlers and C++ static destructors
//! under that thread's feet (measured: SIGSEGV, or a bogus libtorch error that the main thread
//! then wrote as a `failed` summary); `_exit` ends every thread without running any of them.
//! Summaries are written under [`summary_write_guard`], which the exiting thread takes first:
//! a summary write in progress completes (the rename is atomic anyway), and none starts after.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::exit;

/// How far the run is, for the signal handler.
enum Stage {
    /// Nothing written yet.
    Prepare,
    /// The model is loading; the folder (if this process made it) is removed on a signal.
    Load(Option<PathBuf>),
    /// Steps are running: the first signal stops after the current step.
    Run,
}

static STAGE: Mutex<Stage> = Mutex::new(Stage::Prepare);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// When the first signal of the run stage was handled.
static FIRST_AT: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Signals handled this close together are one signal delivered twice (see the module's notes).
pub const SAME_SIGNAL: std::time::Duration = std::time::Duration::from_millis(50);
static SUMMARY_WRITES: Mutex<()> = Mutex::new(());

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the handler (once per process); the flag turns true at the first signal while steps
/// run.
pub fn install() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || on_signal(&f));
    flag
}

fn on_signal(flag: &AtomicBool) {
    let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
    let stage = lock(&STAGE);
    match (&*stage, n) {
        (Stage::Prepare, _) => {
            eprintln!("\ninterrupted before the run started: nothing was written");
            exit_now();
        }
        (Stage::Load(dir), _) => {
            match dir {
                Some(d) => {
                    eprintln!(
                        "\ninterrupted while loading the model, before any step: removing {}",
                        d.display()
                    );
                    let _ = std::fs::remove_dir_all(d);
                }
                None => eprintln!("\ninterrupted while loading the model, before any step"),
            }
            exit_now();
        }
        (Stage::Run, 1) => {
            *lock(&FIRST_AT) = Some(std::time::Instant::now());
            eprintln!("\ninterrupt: finishing the current step and writing the summary (press again to exit now)");
            flag.store(true, Ordering::SeqCst);
        }
        (Stage::Run, _) if lock(&FIRST_AT).is_some_and(|t| t.elapsed() < SAME_SIGNAL) => {
            // The first signal again (e.g. from `timeout`): it counts once.
            SIGNALS.fetch_sub(1, Ordering::SeqCst);
        }
        (Stage::Run, _) => {
            eprintln!("\nsecond interrupt: exiting now, without a summary");
            exit_now();
        }
    }
}

/// Ends the process with code 130 from the signal thread: waits for a summary write in progress,
/// blocks any later one, and exits without running destructors or `atexit` handlers.
fn exit_now() -> ! {
    let _writes = lock(&SUMMARY_WRITES);
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` only ends the process; nothing runs after it.
    unsafe { libc::_exit(exit::INTERRUPTED) }
}

/// Runs `create` (which makes the run folder, if this process makes one) with signals held off,
/// then enters the loading stage for the folder it returns: a signal from then until [`running`]
/// removes that folder and exits. Holding signals off meanwhile means none can leave a folder
/// behind between its creation and this stage.
pub fn loading<T>(create: impl FnOnce() -> (T, Option<PathBuf>)) -> T {
    let mut s = lock(&STAGE);
    let (t, dir) = create();
    if matches!(*s, Stage::Prepare) {
        *s = Stage::Load(dir);
    }
    t
}

/// Steps are about to run (or a process supervises ranks that run them): a signal asks to stop
/// after the current step.
pub fn running() {
    *lock(&STAGE) = Stage::Run;
}

/// Held while a summary is written. Once a signal has started to end the process, the exiting
/// thread holds it until the process is gone: a writer waits here and never writes.
pub fn summary_write_guard() -> MutexGuard<'static, ()> {
    lock(&SUMMARY_WRITES)
}
