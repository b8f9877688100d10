//! The PyTorch (tch) side of the benchmark as a library, so tests can reach the model directly.
//! `main.rs` is the executable.

pub mod phi3;
pub mod train;
