//! Memory tiers for saved activations (issue 4, in progress). What exists so far: the NVMe tier
//! (an O_DIRECT file through io_uring, checksummed slices). Not yet wired into training.
pub mod aligned;
pub mod error;
pub mod nvme;

pub use error::{OffloadError, Result};
