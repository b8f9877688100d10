//! Which device `--device` means on this machine, decided once for both binaries. Each binary
//! asks its own framework library what it can compute on (libtorch: CUDA, MPS; the MLX library
//! this process loaded: CUDA, Metal or neither); the rule and the usage error that names the fix
//! (exit code 2, before anything is loaded) are here. The binaries turn the [`DeviceKind`] into
//! their framework's device. Also what the summary calls each device, and its hardware name.

use crate::config::{DeviceChoice, Framework};
use crate::error::ConfigError;
use crate::measure::memory::DeviceKind;
use crate::measure::probe;

/// What the framework library can compute on, asked only when the rule needs the answer:
/// asking libtorch about CUDA starts the CUDA driver, which `--device cpu` never needs.
pub struct Available<'a> {
    pub cuda: &'a dyn Fn() -> bool,
    /// The Apple GPU (PyTorch's MPS, MLX's Metal).
    pub apple_gpu: &'a dyn Fn() -> bool,
    /// The library file, named when it has no GPU (the MLX binary: the `libmlx` it loaded).
    pub library: Option<&'a str>,
}

/// How the MLX binary gets a GPU on Linux, for the errors that find none.
const MLX_CUDA_FIX: &str = "on Linux with an NVIDIA GPU, build the MLX binary against MLX's CUDA \
    backend: `MLX_LINUX_BACKEND=cuda bash scripts/setup-mlx-linux.sh`, then `cargo build \
    --release -p macos_mlx_benchmark` (README, \"The MLX binary on an NVIDIA GPU\"); or use \
    --device cpu";

/// `--device` for `framework`. `auto` is CUDA where the library has it, else the Apple GPU, else
/// the CPU; a named GPU the library lacks is a usage error naming the value and the fix. The two
/// frameworks name the Apple GPU differently (PyTorch `mps`, MLX `gpu`, which also takes MLX's
/// CUDA GPU); each refuses the other's name with its own.
pub fn resolve(
    framework: Framework,
    choice: DeviceChoice,
    has: &Available<'_>,
) -> Result<DeviceKind, ConfigError> {
    let bad = |value: &str, reason: String, fix: &str| ConfigError::Value {
        key: "device".into(),
        value: value.into(),
        reason,
        fix: fix.into(),
    };
    let apple = match framework {
        Framework::Pytorch => DeviceKind::Mps,
        Framework::Mlx => DeviceKind::MlxGpu,
    };
    let gpu = || {
        if (has.cuda)() {
            Some(DeviceKind::Cuda(0))
        } else if (has.apple_gpu)() {
            Some(apple)
        } else {
            None
        }
    };
    const TORCH_FIX: &str = "use --device auto, cuda, mps or cpu";
    let mlx_no_gpu = || {
        format!(
            "the loaded MLX library ({}) has no GPU backend",
            has.library.unwrap_or("libmlx")
        )
    };
    match (framework, choice) {
        (_, DeviceChoice::Cpu) => Ok(DeviceKind::Cpu),
        (_, DeviceChoice::Auto) => Ok(gpu().unwrap_or(DeviceKind::Cpu)),
        (_, DeviceChoice::Cuda) if (has.cuda)() => Ok(DeviceKind::Cuda(0)),
        (Framework::Pytorch, DeviceChoice::Cuda) => Err(bad(
            "cuda",
            "libtorch sees no CUDA device (no GPU, or a CPU-only libtorch)".into(),
            TORCH_FIX,
        )),
        (Framework::Pytorch, DeviceChoice::Mps) if (has.apple_gpu)() => Ok(DeviceKind::Mps),
        (Framework::Pytorch, DeviceChoice::Mps) => Err(bad(
            "mps",
            "no Metal device (MPS is macOS-only)".into(),
            TORCH_FIX,
        )),
        (Framework::Pytorch, DeviceChoice::Gpu) => Err(bad(
            "gpu",
            "\"gpu\" is the MLX binary's name for Metal".into(),
            TORCH_FIX,
        )),
        (Framework::Mlx, DeviceChoice::Gpu) => {
            gpu().ok_or_else(|| bad("gpu", mlx_no_gpu(), MLX_CUDA_FIX))
        }
        (Framework::Mlx, DeviceChoice::Cuda) if (has.apple_gpu)() => Err(bad(
            "cuda",
            "MLX's GPU here is Metal, not CUDA".into(),
            "use --device gpu (or auto) on a Mac",
        )),
        (Framework::Mlx, DeviceChoice::Cuda) => Err(bad("cuda", mlx_no_gpu(), MLX_CUDA_FIX)),
        (Framework::Mlx, DeviceChoice::Mps) => Err(bad(
            "mps",
            "MPS is PyTorch's name for the Apple GPU".into(),
            "MLX calls it gpu: use --device gpu (or auto)",
        )),
    }
}

impl DeviceKind {
    /// `backend.device` in the summary: `cpu`, `cuda:<index>`, `mps` (PyTorch's Apple GPU) or
    /// `gpu` (MLX's). Both binaries name a CUDA GPU alike, so telemetry, energy and the report
    /// treat both frameworks' GPU runs alike.
    pub fn summary_label(self) -> String {
        match self {
            DeviceKind::Cpu => "cpu".into(),
            DeviceKind::Cuda(i) => format!("cuda:{i}"),
            DeviceKind::Mps => "mps".into(),
            DeviceKind::MlxGpu => "gpu".into(),
        }
    }

    /// `backend.device_name`, the key into the peak table: the NVIDIA GPU's name from NVML (the
    /// same for both binaries, so both find the same row), the Apple chip, or the CPU model.
    pub fn hardware_name(self) -> String {
        match self {
            DeviceKind::Cuda(i) => probe::probe_nvidia()
                .ok()
                .and_then(|g| g.get(i).map(|g| g.name.clone()))
                .unwrap_or_else(|| "CUDA device".into()),
            DeviceKind::Mps | DeviceKind::MlxGpu => probe::probe_hardware()
                .apple
                .map(|a| a.chip)
                .unwrap_or_else(|| "Apple GPU".into()),
            DeviceKind::Cpu => probe::probe_hardware().cpu_model,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose library has `cuda` and/or the Apple GPU; counts the questions asked.
    fn machine(
        framework: Framework,
        cuda: bool,
        apple: bool,
    ) -> impl Fn(DeviceChoice) -> (Result<DeviceKind, String>, usize) {
        move |choice| {
            let asked = std::cell::Cell::new(0);
            let ask = |answer: bool| {
                asked.set(asked.get() + 1);
                answer
            };
            let has = Available {
                cuda: &|| ask(cuda),
                apple_gpu: &|| ask(apple),
                library: Some("/w/mlx-cpu/libmlx.so"),
            };
            let r = resolve(framework, choice, &has).map_err(|e| e.to_string());
            (r, asked.get())
        }
    }

    #[test]
    fn auto_takes_cuda_then_the_apple_gpu_then_the_cpu() {
        for (fw, apple) in [
            (Framework::Pytorch, DeviceKind::Mps),
            (Framework::Mlx, DeviceKind::MlxGpu),
        ] {
            assert_eq!(
                machine(fw, true, false)(DeviceChoice::Auto).0,
                Ok(DeviceKind::Cuda(0))
            );
            assert_eq!(machine(fw, false, true)(DeviceChoice::Auto).0, Ok(apple));
            assert_eq!(
                machine(fw, false, false)(DeviceChoice::Auto).0,
                Ok(DeviceKind::Cpu)
            );
            assert_eq!(
                machine(fw, true, false)(DeviceChoice::Cuda).0,
                Ok(DeviceKind::Cuda(0))
            );
            // --device cpu asks the library nothing.
            assert_eq!(
                machine(fw, true, true)(DeviceChoice::Cpu),
                (Ok(DeviceKind::Cpu), 0)
            );
        }
        let mlx = machine(Framework::Mlx, false, true);
        assert_eq!(mlx(DeviceChoice::Gpu).0, Ok(DeviceKind::MlxGpu));
        let mlx = machine(Framework::Mlx, true, false);
        assert_eq!(mlx(DeviceChoice::Gpu).0, Ok(DeviceKind::Cuda(0)));
        let torch = machine(Framework::Pytorch, false, true);
        assert_eq!(torch(DeviceChoice::Mps).0, Ok(DeviceKind::Mps));
    }

    #[test]
    fn a_gpu_that_is_not_there_names_the_value_and_the_fix() {
        let err = |fw, cuda, apple, choice| machine(fw, cuda, apple)(choice).0.unwrap_err();
        // MLX: the library without a GPU, and how to build against MLX's CUDA backend.
        for c in [DeviceChoice::Gpu, DeviceChoice::Cuda] {
            let e = err(Framework::Mlx, false, false, c);
            assert!(e.contains("/w/mlx-cpu/libmlx.so"), "{e}");
            assert!(e.contains("MLX_LINUX_BACKEND=cuda"), "{e}");
        }
        let e = err(Framework::Mlx, false, true, DeviceChoice::Cuda);
        assert!(
            e.contains("Metal, not CUDA") && e.contains("--device gpu"),
            "{e}"
        );
        let e = err(Framework::Mlx, false, true, DeviceChoice::Mps);
        assert!(
            e.contains("device = mps") && e.contains("--device gpu"),
            "{e}"
        );
        // PyTorch: each refusal lists the names it takes.
        for (c, why) in [
            (DeviceChoice::Cuda, "no CUDA device"),
            (DeviceChoice::Mps, "MPS is macOS-only"),
            (DeviceChoice::Gpu, "MLX binary's name"),
        ] {
            let e = err(Framework::Pytorch, false, false, c);
            assert!(
                e.contains(why) && e.contains("--device auto, cuda, mps or cpu"),
                "{e}"
            );
        }
    }

    #[test]
    fn summary_labels() {
        let labels: Vec<String> = [
            DeviceKind::Cpu,
            DeviceKind::Cuda(1),
            DeviceKind::Mps,
            DeviceKind::MlxGpu,
        ]
        .iter()
        .map(|d| d.summary_label())
        .collect();
        assert_eq!(labels, ["cpu", "cuda:1", "mps", "gpu"]);
    }
}
