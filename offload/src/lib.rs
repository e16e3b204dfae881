//! Memory tiers for saved activations (issue 4, in progress). What exists so far: the NVMe tier
//! (an O_DIRECT file through io_uring, checksummed slices), an activation store over it with its
//! own I/O thread, and the tier's bandwidth benchmark. Which tensors (and which token rows) go
//! where is decided by the trainer (`trainer::model::OffloadPolicy`).
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
