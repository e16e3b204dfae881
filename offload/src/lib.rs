//! Memory tiers for saved activations (issue 4, in progress). What exists so far: the NVMe tier
//! (an O_DIRECT file through io_uring, checksummed slices) and a synchronous activation store
//! over it (whole tensors, no overlap yet).
pub mod aligned;
pub mod bench;
pub mod error;
pub mod nvme;
pub mod store;

pub use error::{OffloadError, Result};
