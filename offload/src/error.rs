//! The error type of the memory tiers and their `Result`.
use std::path::PathBuf;

use thiserror::Error;

/// Errors of the memory tiers. Each names the tier's file or budget and the slice concerned.
#[derive(Debug, Error)]
pub enum OffloadError {
    /// An I/O call on a tier's file, mapping or CUDA runtime failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file, or a label for the resource (`numa node 1`, `host tier (N bytes)`, `cuda`).
        path: PathBuf,
        /// The call that failed (`open`, `mbind`, `pwrite`, `cudaHostRegister`, …).
        op: &'static str,
        /// The OS (or runtime) error.
        #[source]
        source: std::io::Error,
    },
    /// The NVMe tier's file could not be preallocated (ENOSPC, EFBIG or EDQUOT from fallocate).
    #[error("{path}: cannot reserve {bytes} bytes for the NVMe tier: {source} (free space on that file system, or a smaller offload.nvme_bytes)")]
    NoSpace {
        /// The tier's file (already unlinked).
        path: PathBuf,
        /// Bytes asked for: the tier's capacity rounded up to a page.
        bytes: u64,
        /// The fallocate error.
        #[source]
        source: std::io::Error,
    },
    /// No free extent of the tier is large enough for the slice.
    #[error("{tier} tier full: slice `{slice}` needs {need} bytes, {free} of {capacity} free")]
    Full {
        /// `host`, `numa` or `nvme`.
        tier: &'static str,
        /// The slice's name, e.g. `layer3.q`.
        slice: String,
        /// Bytes needed: the slice rounded up to the tier's granule.
        need: u64,
        /// Free bytes left in the tier (possibly in several smaller extents).
        free: u64,
        /// The tier's capacity in bytes.
        capacity: u64,
    },
    /// A slice read back from the NVMe file does not match the crc32c taken when it was written.
    #[error("{path}: slice `{slice}` is corrupt: crc32c {found:#010x}, expected {expected:#010x} (offset {offset}, {len} bytes)")]
    Checksum {
        /// The tier's file.
        path: PathBuf,
        /// The slice's name.
        slice: String,
        /// Byte offset of the slice in the file.
        offset: u64,
        /// Payload bytes of the slice.
        len: u64,
        /// crc32c recorded at write time.
        expected: u32,
        /// crc32c of the bytes read back.
        found: u32,
    },
    /// A slice id the NVMe tier does not hold (never written, or already freed).
    #[error("unknown slice id {0}")]
    UnknownSlice(u64),
}

/// `Result` with [`OffloadError`].
pub type Result<T> = std::result::Result<T, OffloadError>;
