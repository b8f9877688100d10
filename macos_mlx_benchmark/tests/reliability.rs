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

fn interrupt_with(sig: &str) {
    let d = tempfile::tempdir().expect("temp dir");
    let child = spawn_long_run(d.path());
    wait_for_first_step(d.path());
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok);
    let o = child.wait_with_output().expect("the binary ends");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{sig}: {stderr}");
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
    interrupt_with("-INT");
}

#[cfg(unix)]
#[test]
fn sigterm_writes_an_interrupted_summary() {
    interrupt_with("-TERM");
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
