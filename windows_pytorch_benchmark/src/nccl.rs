//! NCCL between the ranks of a data-parallel run, through cudarc's bindings, on the NCCL that
//! libtorch already loads (`libnccl.so.2` from PyPI's nvidia-nccl wheel).
//!
//! Rendezvous: rank 0 creates the NCCL unique id and hands it to every other rank over TCP at
//! MASTER_ADDR:MASTER_PORT. Collectives run on the legacy default CUDA stream, the stream libtorch
//! uses unless told otherwise, so they are ordered after the backward pass that produced the
//! gradients and before the optimizer that reads them, without extra synchronisation.
//!
//! A watchdog thread aborts the communicator when a collective has not finished within the
//! timeout (a rank died or hung); the waiting rank then fails its step with a message saying so.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nccl::{result as nr, sys};
use shared::dist::Rank;
use tch::{Kind, Tensor};

const ID_BYTES: usize = 128;

#[derive(Clone, Copy)]
struct CommPtr(sys::ncclComm_t);
// SAFETY: an NCCL communicator may be used from another thread for ncclCommAbort, which is what
// the watchdog does; every other call stays on the training thread.
unsafe impl Send for CommPtr {}

struct Watch {
    /// When the collectives now in flight were enqueued (None: none in flight).
    since: Mutex<Option<Instant>>,
    aborted: AtomicBool,
    stop: AtomicBool,
}

pub struct Comm {
    comm: CommPtr,
    /// This process's place in the run (rank, world size, where its beacons go).
    pub rank: Rank,
    timeout: Duration,
    watch: Arc<Watch>,
    version: String,
}

fn nccl_err(e: cudarc::nccl::result::NcclError) -> anyhow::Error {
    anyhow!("NCCL: {e:?}")
}

fn exchange_id(r: &Rank, timeout: Duration) -> Result<sys::ncclUniqueId> {
    let deadline = Instant::now() + timeout;
    if r.is_leader() {
        let id = nr::get_uniqueid().map_err(nccl_err)?;
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let l = TcpListener::bind(("0.0.0.0", r.master_port)).with_context(|| {
            format!(
                "rank 0 cannot listen on port {} (MASTER_PORT); choose a free port",
                r.master_port
            )
        })?;
        l.set_nonblocking(true)?;
        let mut served = 0;
        while served < r.world_size - 1 {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.write_all(&bytes)?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!(
                            "only {served} of {} ranks connected to rank 0 within {:.0} s",
                            r.world_size - 1,
                            timeout.as_secs_f64()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("accepting a rank's connection"),
            }
        }
        Ok(id)
    } else {
        let addr = format!("{}:{}", r.master_addr, r.master_port);
        let mut s = loop {
            match TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| {
                        format!("rank {} could not reach rank 0 at {addr}", r.rank)
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut bytes = [0u8; ID_BYTES];
        s.read_exact(&mut bytes)
            .with_context(|| format!("rank {} reading the NCCL id from {addr}", r.rank))?;
        let mut id = sys::ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        for (d, b) in id.internal.iter_mut().zip(bytes) {
            *d = b as ::core::ffi::c_char;
        }
        Ok(id)
    }
}

impl Comm {
    /// Joins the run's communicator (every rank calls this; it returns once all have joined).
    pub fn init(r: &Rank, timeout: Duration) -> Result<Self> {
        let id = exchange_id(r, timeout)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is the one all ranks share.
        unsafe { nr::comm_init_rank(&mut comm, r.world_size as i32, id, r.rank as i32) }
            .map_err(nccl_err)
            .with_context(|| format!("rank {} joining the NCCL communicator", r.rank))?;
        let v = nr::get_nccl_version().unwrap_or(0);
        let watch = Arc::new(Watch {
            since: Mutex::new(None),
            aborted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let w = watch.clone();
        let cp = CommPtr(comm);
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                let cp = cp;
                while !w.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let late = w
                        .since
                        .lock()
                        .map(|s| s.is_some_and(|t| t.elapsed() > timeout))
                        .unwrap_or(false);
                    if late {
                        w.aborted.store(true, Ordering::SeqCst);
                        // SAFETY: abort is the documented way to unblock a hung communicator
                        // from another thread; the training thread uses it no more afterwards.
                        unsafe {
                            let _ = nr::comm_abort(cp.0);
                        }
                        return;
                    }
                }
            })
            .context("starting the NCCL watchdog")?;
        Ok(Self {
            comm: cp,
            rank: r.clone(),
            timeout,
            watch,
            version: format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    fn check(&self) -> Result<()> {
        if self.watch.aborted.load(Ordering::SeqCst) {
            bail!(
                "a collective did not finish within {:.0} s (--dist-timeout): another rank died or hung",
                self.timeout.as_secs_f64()
            );
        }
        Ok(())
    }

    /// Starts the watchdog's clock for collectives about to be enqueued.
    pub fn arm(&self) {
        if let Ok(mut s) = self.watch.since.lock() {
            s.get_or_insert_with(Instant::now);
        }
    }

    /// The device finished the enqueued collectives (call after a synchronisation): stops the
    /// clock, and fails if the watchdog had to abort.
    pub fn disarm(&self) -> Result<()> {
        if let Ok(mut s) = self.watch.since.lock() {
            *s = None;
        }
        self.check()
    }

    /// In-place all-reduce of contiguous CUDA tensors, in one NCCL group (NCCL fuses them).
    pub fn all_reduce(&self, ts: &[Tensor], op: sys::ncclRedOp_t) -> Result<()> {
        self.check()?;
        self.arm();
        nr::group_start().map_err(nccl_err)?;
        let mut res = Ok(());
        for t in ts {
            if !t.is_contiguous() {
                res = Err(anyhow!("internal: all-reduce of a non-contiguous tensor"));
                break;
            }
            let dt = match t.kind() {
                Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
                Kind::Half => sys::ncclDataType_t::ncclFloat16,
                Kind::Float => sys::ncclDataType_t::ncclFloat32,
                Kind::Double => sys::ncclDataType_t::ncclFloat64,
                k => {
                    res = Err(anyhow!("internal: no NCCL type for {k:?}"));
                    break;
                }
            };
            let p = t.data_ptr();
            // SAFETY: `p` is the tensor's device memory (numel elements of `dt`), alive until
            // the stream has run the collective: the caller synchronises before dropping it.
            let r = unsafe {
                nr::all_reduce(p, p, t.numel(), dt, op, self.comm.0, std::ptr::null_mut())
            };
            if let Err(e) = r {
                res = Err(nccl_err(e));
                break;
            }
        }
        nr::group_end().map_err(nccl_err)?;
        res
    }

    pub fn sum(&self, ts: &[Tensor]) -> Result<()> {
        self.all_reduce(ts, sys::ncclRedOp_t::ncclSum)
    }

    /// Max over ranks of one number (synchronises).
    pub fn max_f64(&self, x: f64, device: tch::Device) -> Result<f64> {
        let t = Tensor::from_slice(&[x]).to_device(device);
        self.all_reduce(std::slice::from_ref(&t), sys::ncclRedOp_t::ncclMax)?;
        let v = t.double_value(&[0]);
        self.disarm()?;
        Ok(v)
    }

    /// Every rank's value, in rank order (synchronises).
    pub fn gather_f64(&self, x: f64, device: tch::Device) -> Result<Vec<f64>> {
        let mut v = vec![0.0; self.rank.world_size];
        v[self.rank.rank] = x;
        let t = Tensor::from_slice(&v).to_device(device);
        self.sum(std::slice::from_ref(&t))?;
        let out = Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu))?;
        self.disarm()?;
        Ok(out)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::SeqCst);
        // The private folder of `bridge_nccl_library` (NCCL is loaded by now).
        if let Some(d) = std::env::var_os("FTB_NCCL_BRIDGED") {
            let _ = std::fs::remove_dir_all(d);
        }
        if !self.watch.aborted.load(Ordering::SeqCst) {
            // SAFETY: no collective is in flight once the owner drops the communicator.
            unsafe {
                let _ = nr::comm_destroy(self.comm.0);
            }
        }
    }
}

/// Makes this rank's GPU the only visible one (before CUDA initialises), so that libtorch's
/// `cuda:0` and NCCL's current device are the same GPU: the LOCAL_RANK-th entry of an existing
/// CUDA_VISIBLE_DEVICES list, else GPU LOCAL_RANK.
pub fn select_rank_gpu() {
    let (Ok(world), Ok(local)) = (std::env::var("WORLD_SIZE"), std::env::var("LOCAL_RANK")) else {
        return;
    };
    if world.trim().parse::<usize>().unwrap_or(1) <= 1 {
        return;
    }
    let Ok(local) = local.trim().parse::<usize>() else {
        return;
    };
    // Telemetry counts the energy of every rank's GPU: keep the job's list before narrowing.
    if std::env::var_os("FTB_JOB_VISIBLE_DEVICES").is_none() {
        std::env::set_var(
            "FTB_JOB_VISIBLE_DEVICES",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default(),
        );
    }
    let gpu = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .nth(local)
            .map(str::trim)
            .unwrap_or("")
            .to_string(),
        _ => local.to_string(),
    };
    if !gpu.is_empty() {
        std::env::set_var("CUDA_VISIBLE_DEVICES", gpu);
    }
}

/// cudarc opens NCCL by the names `libnccl.so`, `libnccl.so.<CUDA major>`, ...; PyPI's wheel has
/// only `libnccl.so.2`, which libtorch_cuda has already loaded. For a rank process, this finds
/// that file, links it as `libnccl.so` in a private folder and runs this executable again with
/// that folder on LD_LIBRARY_PATH, so cudarc's dlopen resolves to the very library libtorch uses.
/// Returns only when nothing needs doing (or it cannot be done: NCCL then fails with its own
/// message at the first call).
pub fn bridge_nccl_library() {
    if std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.trim().parse::<usize>().ok())
        .unwrap_or(1)
        <= 1
        || std::env::var_os("FTB_NCCL_BRIDGED").is_some()
    {
        return;
    }
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let Some(path) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libnccl.so.2") || p.contains("/libnccl.so.2."))
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ftb-nccl-{}", std::process::id()));
    let link = dir.join("libnccl.so");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let _ = std::fs::remove_file(&link);
    if std::os::unix::fs::symlink(path, &link).is_err() {
        return;
    }
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(v) if !v.is_empty() => format!("{}:{v}", dir.display()),
        _ => dir.display().to_string(),
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", ld)
        .env("FTB_NCCL_BRIDGED", &dir)
        .exec();
    eprintln!("warning: could not re-run with NCCL on the library path: {err}");
}
