use std::path::PathBuf;

use thiserror::Error;

/// Errors of the memory tiers. Each names the tier's file or budget and the slice concerned.
#[derive(Debug, Error)]
pub enum OffloadError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot reserve {bytes} bytes for the NVMe tier: {source} (free space on that file system, or a smaller offload.nvme_bytes)")]
    NoSpace {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{tier} tier full: slice `{slice}` needs {need} bytes, {free} of {capacity} free")]
    Full { tier: &'static str, slice: String, need: u64, free: u64, capacity: u64 },
    #[error("{path}: slice `{slice}` is corrupt: crc32c {found:#010x}, expected {expected:#010x} (offset {offset}, {len} bytes)")]
    Checksum { path: PathBuf, slice: String, offset: u64, len: u64, expected: u32, found: u32 },
    #[error("unknown slice id {0}")]
    UnknownSlice(u64),
}

pub type Result<T> = std::result::Result<T, OffloadError>;
