//! Measurement: step statistics, FLOPs, peak tables, hardware probe, telemetry samplers.

pub mod flops;
pub mod memory;
pub mod peak;
pub mod probe;
pub mod stats;
pub mod telemetry;
