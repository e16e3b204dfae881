#![warn(missing_docs)]
//! Memory tiers for saved activations and the engine that moves them.
//!
//! - [`store`]: the activation store. Between a layer's forward and its backward it holds each
//!   saved tensor where the step's placement (`planner::placement`) says: kept, host RAM
//!   ([`arena`], page-locked for CUDA), a NUMA node ([`numa`]: far DRAM or CXL memory) or the
//!   NVMe file ([`nvme`]: O_DIRECT through io_uring, checksummed slices). Its I/O thread (CPU
//!   tensors) and copy stream ([`cuda`], CUDA tensors) overlap transfers with compute.
//! - [`bench`]: the tiers' bandwidth benchmarks (`train bench offload`), which calibrate the planner.
//! - [`extents`], [`aligned`]: the tiers' allocator and O_DIRECT buffers.
pub mod aligned;
pub mod bench;
pub mod error;
pub mod nvme;
pub mod store;

pub use error::{OffloadError, Result};
pub mod arena;
pub mod cuda;
pub mod extents;
pub mod numa;
