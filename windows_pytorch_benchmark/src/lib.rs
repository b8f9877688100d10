//! The PyTorch (tch) side of the benchmark as a library, so tests can reach the model directly.
//! `main.rs` is the executable.

pub mod decoder;
pub mod ext;
pub mod init;
#[cfg(target_os = "linux")]
pub mod nccl;
pub mod train;
