//! Everything that defines the fine-tuning workload and how it is measured, shared by the PyTorch
//! (`windows_pytorch_benchmark`) and MLX (`macos_mlx_benchmark`) binaries so that both run the same
//! work and report it the same way. This crate depends on neither framework.

pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod files;
pub mod hooks;
pub mod interrupt;
pub mod measure;
pub mod model;
pub mod report;
pub mod rng;
pub mod runner;
pub mod summary;
pub mod tensors;
pub mod workload;

pub use config::{Config, TuningMode};
