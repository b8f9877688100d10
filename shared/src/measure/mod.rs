//! Measurement: step statistics, FLOPs, peak tables, hardware probe.

pub mod flops;
pub mod peak;
pub mod probe;
pub mod stats;
