//! Data parallelism across processes, the framework-free part: who is which rank, which records
//! each rank trains on, and the supervisor that `--nproc N` runs over its ranks.
//!
//! Every rank plans the same global steps (same records, same hash at any world size) and keeps
//! only its share of each step's records, laid out by the configured plan. Step totals (samples,
//! tokens, loss tokens) stay global on every rank, so the loss is normalised by the global loss
//! token count (gradients summed over ranks = the one-process gradient) and rank 0's figures are
//! aggregate figures. The collective engine itself (NCCL) belongs to the backend.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::BatchConfig;
use crate::data::batch::{layout, Step};
use crate::data::Sample;
use crate::error::ConfigError;

/// This process's place in a data-parallel run (from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT, as torchrun and `--nproc` set them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Folder for progress beacons the supervisor reads (`FTB_DIST_DIR`, set by `--nproc`).
    pub beacon_dir: Option<PathBuf>,
}

impl Rank {
    /// None when WORLD_SIZE is unset or 1 (a single process).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        let num = |key: &str, fix: &str| -> Result<Option<usize>, ConfigError> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| ConfigError::Value {
                    key: key.into(),
                    value: v.clone(),
                    reason: "not a non-negative integer".into(),
                    fix: fix.into(),
                }),
            }
        };
        let Some(world) = num("WORLD_SIZE", "set WORLD_SIZE to the number of ranks")? else {
            return Ok(None);
        };
        if world <= 1 {
            return Ok(None);
        }
        let rank =
            num("RANK", "set RANK to this process's rank, 0..WORLD_SIZE-1")?.ok_or_else(|| {
                ConfigError::Value {
                    key: "RANK".into(),
                    value: "(unset)".into(),
                    reason: format!("WORLD_SIZE is {world} but RANK is not set"),
                    fix: "set RANK (0..WORLD_SIZE-1), or start with --nproc N instead".into(),
                }
            })?;
        if rank >= world {
            return Err(ConfigError::Value {
                key: "RANK".into(),
                value: rank.to_string(),
                reason: format!("must be below WORLD_SIZE ({world})"),
                fix: "ranks are numbered 0..WORLD_SIZE-1".into(),
            });
        }
        let local_rank =
            num("LOCAL_RANK", "set LOCAL_RANK to the GPU index on this host")?.unwrap_or(rank);
        let master_port = match get("MASTER_PORT") {
            None => 29500,
            Some(p) => p.trim().parse().map_err(|_| ConfigError::Value {
                key: "MASTER_PORT".into(),
                value: p.clone(),
                reason: "not a TCP port".into(),
                fix: "set MASTER_PORT to a free port, e.g. 29500".into(),
            })?,
        };
        Ok(Some(Self {
            rank,
            world_size: world,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            beacon_dir: get("FTB_DIST_DIR").map(PathBuf::from),
        }))
    }

    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Records progress for the supervisor: `what` is "step N done" or "step N collective".
    /// Best effort: a failed write never stops training.
    pub fn beacon(&self, what: &str) {
        if let Some(d) = &self.beacon_dir {
            let _ =
                crate::files::write_atomic(&d.join(format!("rank-{}", self.rank)), what.as_bytes());
        }
    }
}

/// Which rank trains each record of a step: longest first, each to the rank with the fewest
/// tokens so far (ties: the lower rank). Deterministic, disjoint, and every record is assigned.
pub fn assign(lengths: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut load = vec![0usize; world];
    let mut owner = vec![0; lengths.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += lengths[i];
        owner[i] = r;
    }
    owner
}

/// Keeps this rank's share of every step: its records, laid out by the plan, as the step's
/// micro-batches. Step totals stay global; `padded_tokens` becomes the sum over all ranks' layouts.
pub fn shard_steps(
    steps: &mut [Step],
    samples: &[Sample],
    cfg: &BatchConfig,
    pad_to: Option<usize>,
    train_on_prompt: bool,
    rank: usize,
    world: usize,
) -> Result<()> {
    for step in steps.iter_mut() {
        if step.sample_ids.len() < world {
            bail!(
                "step {} has {} records, fewer than the {world} ranks; use a number of records per \
                 step (--micro-batch-size x --grad-accum) and --samples that give every rank at least one",
                step.index,
                step.sample_ids.len()
            );
        }
        let owner = assign(&step.doc_lengths, world);
        let mut padded = 0;
        let mut computed = Vec::new();
        let mut mine = Vec::new();
        for r in 0..world {
            let docs: Vec<&Sample> = step
                .sample_ids
                .iter()
                .zip(&owner)
                .filter(|(_, &o)| o == r)
                .map(|(&i, _)| &samples[i])
                .collect();
            let mbs = layout(&docs, cfg, pad_to, train_on_prompt);
            padded += mbs.iter().map(|m| m.padded_tokens).sum::<usize>();
            computed.extend(crate::data::batch::computed_doc_lengths(&mbs));
            if r == rank {
                mine = mbs;
            }
        }
        step.micro_batches = mine;
        step.padded_tokens = padded;
        step.computed_doc_lengths = computed;
    }
    Ok(())
}

/// How a supervised run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    /// Rank `rank` failed first; `reason` says how (exit code, signal, or no progress).
    Failed {
        rank: usize,
        reason: String,
    },
    /// The ranks stopped on an interrupt (exit 130 from rank 0).
    Interrupted,
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = st.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match st.code() {
        Some(c) => format!("exited with code {c}"),
        None => "exited".into(),
    }
}

/// Watches the ranks until all have exited. The first rank to exit with an error, or to make no
/// progress for `timeout` (per the beacons in `beacon_dir`: a rank still computing while the
/// others wait in the step's collective), fails the run: the other ranks other than 0 are killed
/// at once; rank 0 gets `grace` to notice (its collective watchdog) and write its summary, then is
/// killed too.
pub fn supervise(
    children: &mut [Child],
    beacon_dir: Option<&Path>,
    timeout: Duration,
    grace: Duration,
) -> Outcome {
    let n = children.len();
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut failure: Option<(usize, String)> = None;
    let mut rank0_deadline: Option<Instant> = None;
    let mut last_beacon: Vec<(String, Instant)> = vec![(String::new(), Instant::now()); n];
    loop {
        for (r, c) in children.iter_mut().enumerate() {
            if done[r].is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    done[r] = Some(st);
                    if !st.success() && failure.is_none() && st.code() != Some(130) {
                        failure = Some((r, describe_exit(st)));
                    }
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        // Hang detection from the beacons (only while nobody has failed yet).
        if let (None, Some(dir)) = (&failure, beacon_dir) {
            let now = Instant::now();
            for (r, lb) in last_beacon.iter_mut().enumerate() {
                let b = std::fs::read_to_string(dir.join(format!("rank-{r}"))).unwrap_or_default();
                if b != lb.0 {
                    *lb = (b, now);
                }
            }
            let stalled: Vec<usize> = (0..n)
                .filter(|&r| done[r].is_none() && now - last_beacon[r].1 > timeout)
                .collect();
            if !stalled.is_empty() {
                // Ranks waiting in a collective are victims; one that never reached it hangs.
                let culprit = stalled
                    .iter()
                    .copied()
                    .find(|&r| !last_beacon[r].0.contains("collective"))
                    .unwrap_or(stalled[0]);
                failure = Some((
                    culprit,
                    format!(
                        "made no progress for {:.0} s (last beacon: {})",
                        timeout.as_secs_f64(),
                        if last_beacon[culprit].0.is_empty() {
                            "none"
                        } else {
                            last_beacon[culprit].0.as_str()
                        }
                    ),
                ));
            }
        }
        if let Some((bad, _)) = &failure {
            for (r, c) in children.iter_mut().enumerate() {
                if done[r].is_none() && (r != 0 || *bad == 0) {
                    let _ = c.kill();
                }
            }
            let deadline = *rank0_deadline.get_or_insert_with(|| Instant::now() + grace);
            if done[0].is_none() && Instant::now() > deadline {
                let _ = children[0].kill();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match failure {
        Some((rank, reason)) => Outcome::Failed { rank, reason },
        None if done[0].and_then(|s| s.code()) == Some(130) => Outcome::Interrupted,
        None => Outcome::Completed,
    }
}

/// A free TCP port on this host for the rendezvous.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The commands for `--nproc N` ranks of this very executable with the same arguments.
pub fn rank_commands(
    nproc: usize,
    port: u16,
    run_id: &str,
    beacon_dir: &Path,
) -> Result<Vec<Command>> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    Ok((0..nproc)
        .map(|r| {
            let mut c = Command::new(&exe);
            c.args(&args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", nproc.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("FTB_RUN_ID", run_id)
                .env("FTB_DIST_DIR", beacon_dir);
            c
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_from_env() {
        let vars = |v: &'static [(&'static str, &'static str)]| {
            move |k: &str| v.iter().find(|(a, _)| *a == k).map(|(_, b)| b.to_string())
        };
        assert_eq!(Rank::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(Rank::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(), None);
        let r = Rank::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.rank, r.world_size, r.local_rank, r.master_port),
            (3, 4, 1, 1234)
        );
        assert!(!r.is_leader());
        let e = Rank::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        let e = Rank::from_vars(vars(&[("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("--nproc"), "{e}");
        let e = Rank::from_vars(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.to_string().contains("two"), "{e}");
    }

    #[test]
    fn assignment_is_disjoint_complete_and_balanced() {
        let lengths: Vec<usize> = (0..64).map(|i| 20 + (i * 37) % 900).collect();
        for world in [1, 2, 3, 4, 8] {
            let owner = assign(&lengths, world);
            assert_eq!(owner.len(), lengths.len());
            assert!(owner.iter().all(|&r| r < world));
            let mut load = vec![0usize; world];
            for (i, &r) in owner.iter().enumerate() {
                load[r] += lengths[i];
            }
            let (lo, hi) = (*load.iter().min().unwrap(), *load.iter().max().unwrap());
            // Greedy longest-first is within the longest record of perfect balance.
            assert!(
                hi - lo <= *lengths.iter().max().unwrap(),
                "{world}: {load:?}"
            );
            assert_eq!(owner, assign(&lengths, world), "deterministic");
        }
        assert!(assign(&lengths, 1).iter().all(|&r| r == 0));
    }

    #[test]
    fn shards_partition_every_step_and_keep_global_totals() {
        use crate::config::BatchPlanKind;
        use crate::data::batch::plan_steps;
        let samples: Vec<Sample> = crate::data::synthetic::generate(96, 5)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        for plan in [
            BatchPlanKind::Padded,
            BatchPlanKind::Bucketed,
            BatchPlanKind::Packed,
        ] {
            let cfg = BatchConfig {
                plan,
                micro_batch_size: 4,
                grad_accum: 4,
                max_tokens_per_micro_batch: 2048,
            };
            let one = plan_steps(&samples, &cfg, None, false, 3, 1, None);
            // Multiset of (token, label) pairs of a step's micro-batches (real tokens only).
            let tokens = |mbs: &[crate::data::batch::MicroBatch]| {
                let mut v: Vec<(i64, i64)> = mbs
                    .iter()
                    .flat_map(|m| {
                        (0..m.rows).flat_map(move |r| {
                            (0..m.row_lengths[r]).map(move |c| {
                                let i = r * m.seq_len + c;
                                (m.input_ids[i], m.labels[i])
                            })
                        })
                    })
                    .collect();
                v.sort_unstable();
                v
            };
            for world in [2, 3] {
                let shards: Vec<Vec<Step>> = (0..world)
                    .map(|r| {
                        let mut s = one.clone();
                        shard_steps(&mut s, &samples, &cfg, None, false, r, world).unwrap();
                        s
                    })
                    .collect();
                for (k, step) in one.iter().enumerate() {
                    let mut union: Vec<crate::data::batch::MicroBatch> = Vec::new();
                    for sh in &shards {
                        let st = &sh[k];
                        assert_eq!(
                            (st.samples, st.loss_tokens, st.input_tokens, &st.sample_ids),
                            (
                                step.samples,
                                step.loss_tokens,
                                step.input_tokens,
                                &step.sample_ids
                            ),
                            "global totals stay on every rank"
                        );
                        assert!(!st.micro_batches.is_empty(), "every rank trains");
                        union.extend(st.micro_batches.iter().cloned());
                    }
                    assert_eq!(
                        tokens(&union),
                        tokens(&step.micro_batches),
                        "{plan:?} world {world} step {k}"
                    );
                    let loss: usize = union.iter().map(|m| m.loss_tokens).sum();
                    assert_eq!(loss, step.loss_tokens);
                }
            }
        }
        // More ranks than records in a step: an error naming the fix.
        let cfg = BatchConfig {
            plan: BatchPlanKind::Bucketed,
            micro_batch_size: 1,
            grad_accum: 2,
            max_tokens_per_micro_batch: 2048,
        };
        let mut one = plan_steps(&samples, &cfg, None, false, 3, 1, None);
        let e = shard_steps(&mut one, &samples, &cfg, None, false, 0, 4).unwrap_err();
        assert!(e.to_string().contains("--grad-accum"), "{e}");
    }

    fn sh(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    #[test]
    fn a_failing_rank_is_named_and_the_others_are_stopped() {
        let t = Instant::now();
        let mut c = vec![sh("sleep 30"), sh("sleep 0.3; exit 3"), sh("sleep 30")];
        let out = supervise(
            &mut c,
            None,
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        assert_eq!(
            out,
            Outcome::Failed {
                rank: 1,
                reason: "exited with code 3".into()
            }
        );
        // Rank 2 killed at once, rank 0 after its grace period: far less than the sleeps.
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn a_hung_rank_is_named_from_the_beacons() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display().to_string();
        // Rank 0 reaches the collective of step 1 and waits; rank 1 never gets there.
        let mut c = vec![
            sh(&format!("echo 'step 1 collective' > {p}/rank-0; sleep 30")),
            sh(&format!("echo 'step 0 done' > {p}/rank-1; sleep 30")),
        ];
        // Both beacons written before the watch starts: on a loaded machine the shells can take
        // longer than the 700 ms timeout to start, and a rank without a beacon is not "behind".
        let t0 = std::time::Instant::now();
        while !(d.path().join("rank-0").exists() && d.path().join("rank-1").exists()) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the ranks never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = supervise(
            &mut c,
            Some(d.path()),
            Duration::from_millis(700),
            Duration::from_millis(500),
        );
        match out {
            Outcome::Failed { rank, reason } => {
                assert_eq!(rank, 1, "{reason}");
                assert!(reason.contains("no progress"), "{reason}");
            }
            o => panic!("expected a failure, got {o:?}"),
        }
    }

    #[test]
    fn completed_and_interrupted_runs() {
        let mut c = vec![sh("exit 0"), sh("exit 0")];
        let out = supervise(&mut c, None, Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(out, Outcome::Completed);
        let mut c = vec![sh("exit 130"), sh("exit 0")];
        let out = supervise(&mut c, None, Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(out, Outcome::Interrupted);
    }
}
