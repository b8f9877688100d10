//! Interruptions and failures of the real MLX binary on the tiny preset (issue 7): SIGINT and
//! SIGTERM mid-training write a valid `interrupted` summary with the steps measured and exit 130;
//! an out-of-memory error at the backend boundary writes a `failed` summary and exits 1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shared::summary::{Status, Summary};

const BIN: &str = env!("CARGO_BIN_EXE_macos_mlx_benchmark");

fn spawn_long_run(out: &Path) -> Child {
    Command::new(BIN)
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--quiet",
            "--samples",
            "2000",
        ])
        .arg("--output-dir")
        .arg(out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

fn wait_for_first_step(out: &Path) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while shared::files::steps_logged(out) == 0 {
        assert!(Instant::now() < deadline, "no step logged within 180 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 5 s) until `sig` is pending neither for the process nor any of its threads
/// (`SigPnd` and `ShdPnd` in `/proc/PID/status` and its tasks'); elsewhere than Linux, returns.
#[cfg(unix)]
fn wait_until_delivered(pid: u32, sig: libc::c_int) {
    let proc = Path::new("/proc").join(pid.to_string());
    if !proc.exists() {
        return;
    }
    let pending = |status: &Path| {
        std::fs::read_to_string(status).is_ok_and(|t| {
            t.lines()
                .filter_map(|l| {
                    l.strip_prefix("SigPnd:")
                        .or_else(|| l.strip_prefix("ShdPnd:"))
                })
                .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
                .any(|mask| mask & (1 << (sig - 1)) != 0)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = std::fs::read_dir(proc.join("task")).into_iter().flatten();
        let any = pending(&proc.join("status"))
            || tasks.flatten().any(|t| pending(&t.path().join("status")));
        if !any {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "signal {sig} still pending after 5 s"
        );
        std::thread::yield_now();
    }
}

/// Sends `sig` `times` times back to back once the first step is logged, each once the kernel has
/// delivered the one before.
#[cfg(unix)]
fn interrupt_with(sig: libc::c_int, times: usize) {
    let d = tempfile::tempdir().expect("temp dir");
    let child = spawn_long_run(d.path());
    wait_for_first_step(d.path());
    for _ in 0..times {
        // SAFETY: `kill` with a live child's pid and a standard signal.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        // Until the kernel has delivered it: a signal sent while the same one is still pending
        // merges with it, and the process would see one.
        wait_until_delivered(child.id(), sig);
    }
    let o = child.wait_with_output().expect("the binary ends");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(130),
        "signal {sig} x {times}: {stderr}"
    );
    let s = Summary::read(&d.path().join("benchmark_summary.json")).expect("a valid summary");
    assert_eq!(s.status, Status::Interrupted);
    assert!(
        s.metrics.steps >= 1 && s.metrics.steps < 125,
        "{}",
        s.metrics.steps
    );
    assert_eq!(s.metrics.loss_curve.len(), s.metrics.steps);
    assert!(s.error.expect("the reason").message.contains("interrupted"));
}

#[cfg(unix)]
#[test]
fn sigint_writes_an_interrupted_summary() {
    interrupt_with(libc::SIGINT, 1);
}

#[cfg(unix)]
#[test]
fn sigterm_writes_an_interrupted_summary() {
    interrupt_with(libc::SIGTERM, 1);
}

/// One signal delivered twice at once is one interruption, not a second press: coreutils'
/// `timeout -s INT` sends it to the process and again to its process group, and on the device
/// (2026-12-06) such a run ended "without a summary" (`shared::interrupt::SAME_SIGNAL`).
#[cfg(unix)]
#[test]
fn a_signal_delivered_twice_at_once_writes_an_interrupted_summary() {
    interrupt_with(libc::SIGINT, 2);
}

#[test]
fn out_of_memory_writes_a_failed_summary() {
    let d = tempfile::tempdir().expect("temp dir");
    let o = Command::new(BIN)
        .args([
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--quiet",
            "--samples",
            "16",
            "--micro-batch-size",
            "2",
            "--grad-accum",
            "2",
            "--max-steps",
            "3",
        ])
        .arg("--output-dir")
        .arg(d.path())
        .env("FTB_INJECT_OOM_AT_STEP", "1")
        .output()
        .expect("the binary starts");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let s = Summary::read(&d.path().join("benchmark_summary.json")).expect("a valid summary");
    assert_eq!(s.status, Status::Failed);
    let e = s.error.expect("the error");
    assert!(e.message.contains("out of memory"), "{}", e.message);
    assert_eq!(e.steps_completed, 1);
    assert!(e
        .hint
        .expect("a hint")
        .contains("--max-tokens-per-micro-batch"));
    assert_eq!(s.metrics.steps, 1);
    assert!(s.metrics.memory.estimated_peak_bytes.is_some());
}

/// A second Ctrl-C exits at once with 130 and no summary (issue 16.1: `_exit` from the signal
/// thread, never `exit()` under MLX's feet), three times over.
#[cfg(unix)]
#[test]
fn second_ctrl_c_exits_at_once_without_a_summary() {
    use std::io::{BufRead, BufReader};
    for attempt in 1..=3 {
        let d = tempfile::tempdir().expect("temp dir");
        let mut child = spawn_long_run(d.path());
        wait_for_first_step(d.path());
        let pid = child.id() as libc::pid_t;
        // The second signal goes out as soon as the binary says it has the first (no process to
        // spawn in between: under load that took long enough for a tiny step to end and write its
        // summary), so the step cannot end between the two.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("interrupt: finishing the current step") {
                    let _ = tx.send(String::new());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        // SAFETY: `kill` with a live child's pid and a standard signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the binary acknowledges the first interrupt");
        // A second signal sooner would count as the first delivered twice.
        std::thread::sleep(shared::interrupt::SAME_SIGNAL + Duration::from_millis(10));
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let status = child.wait().expect("the binary ends");
        let stderr = reader.join().expect("stderr reader");
        assert_eq!(status.code(), Some(130), "attempt {attempt}: {stderr}");
        assert!(
            stderr.contains("second interrupt: exiting now, without a summary"),
            "attempt {attempt}: {stderr}"
        );
        assert!(!d.path().join("benchmark_summary.json").exists());
        let run = std::fs::read_dir(d.path().join("runs"))
            .expect("the run folder")
            .next()
            .expect("one run")
            .expect("readable")
            .path();
        assert!(
            !run.join("benchmark_summary.json").exists(),
            "attempt {attempt}"
        );
    }
}

/// Input problems the shared runner finds before anything loads (issue 16.4, 16.11): exit 2 with
/// the value and the fix, and nothing written, in this binary as in the PyTorch one.
#[test]
fn bad_input_found_before_loading_is_a_usage_error() {
    let d = tempfile::tempdir().expect("temp dir");
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let out = d.path().join("out");
    let out = out.to_str().expect("utf-8");
    /// Flags, environment, and what the message must say.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--nproc", "2"], vec![], "nproc = 2"),
        (
            vec!["--output-dir", file.to_str().expect("utf-8")],
            vec![],
            "a-file: is a file",
        ),
        (
            vec![
                "--micro-batch-size",
                "2305843009213693952",
                "--grad-accum",
                "8",
            ],
            vec![],
            "overflows",
        ),
        (
            vec![],
            vec![("FTB_INJECT_OOM_AT_STEP", "abc")],
            "FTB_INJECT_OOM_AT_STEP = \"abc\"",
        ),
        (vec!["--max-seq-len", "8"], vec![], "max_seq_len = 8"),
    ];
    for (args, env, want) in cases {
        let o = Command::new(BIN)
            .args(["--preset", "tiny", "--device", "cpu", "--quiet"])
            .args(if args.contains(&"--output-dir") {
                vec![]
            } else {
                vec!["--output-dir", out]
            })
            .args(&args)
            .envs(env)
            .output()
            .expect("the binary starts");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {want}: {stderr}");
        assert!(!Path::new(out).exists(), "{args:?} wrote {out}");
    }
}
