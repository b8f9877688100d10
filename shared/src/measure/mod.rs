//! Measurement: step statistics, FLOPs, peak tables, hardware probe.

pub mod flops;
pub mod memory;
pub mod peak;
pub mod probe;
pub mod stats;
