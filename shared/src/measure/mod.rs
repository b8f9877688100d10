//! Measurement: step statistics, steady-state figures, FLOPs, peak tables, hardware probe,
//! memory, telemetry samplers.

pub mod fit;
pub mod flops;
pub mod memory;
pub mod peak;
pub mod probe;
pub mod stats;
pub mod steady;
pub mod telemetry;
