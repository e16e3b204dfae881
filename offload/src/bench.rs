//! Bandwidth of the NVMe tier through its own code path, beside a plain O_DIRECT sequential
//! read/write of the same file system (the disk's raw figure).
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use crate::aligned::AlignedBuf;
use crate::error::{OffloadError, Result};
use crate::nvme::NvmeTier;

#[derive(Debug, Clone, Copy)]
pub struct NvmeBench {
    pub bytes: u64,
    pub slice_bytes: u64,
    pub raw_write_gbps: f64,
    pub raw_read_gbps: f64,
    pub tier_write_gbps: f64,
    pub tier_read_gbps: f64,
    pub io_uring: bool,
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

/// Plain sequential O_DIRECT pwrite then pread of `bytes` in 8 MiB requests (fsync included in
/// the write time).
fn raw(dir: &Path, bytes: u64) -> Result<(f64, f64)> {
    let path = dir.join(format!("strata-raw-bench-{}.bin", std::process::id()));
    let io = |op| {
        let path = path.clone();
        move |source| OffloadError::Io { path, op, source }
    };
    let file = OpenOptions::new().read(true).write(true).create_new(true).custom_flags(libc::O_DIRECT).open(&path).map_err(io("open"))?;
    std::fs::remove_file(&path).map_err(io("unlink"))?;
    let block = 8usize << 20;
    let mut buf = AlignedBuf::new(block);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 31) as u8;
    }
    let fd = file.as_raw_fd();
    let t0 = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        // SAFETY: buf holds `block` valid bytes; fd is open.
        let n = unsafe { libc::pwrite(fd, buf.as_slice().as_ptr().cast(), block, off as libc::off_t) };
        if n != block as isize {
            return Err(io("pwrite")(std::io::Error::last_os_error()));
        }
        off += block as u64;
    }
    file.sync_all().map_err(io("fsync"))?;
    let w = gbps(off, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        // SAFETY: as above, writing into buf.
        let n = unsafe { libc::pread(fd, buf.as_mut_slice().as_mut_ptr().cast(), block, off as libc::off_t) };
        if n != block as isize {
            return Err(io("pread")(std::io::Error::last_os_error()));
        }
        off += block as u64;
    }
    Ok((w, gbps(off, t0.elapsed().as_secs_f64())))
}

/// Measures both paths on `bytes` of data in slices of `slice_bytes`.
pub fn bench_nvme(dir: &Path, bytes: u64, slice_bytes: u64, io_uring: bool) -> Result<NvmeBench> {
    let (raw_w, raw_r) = raw(dir, bytes)?;
    let mut tier = NvmeTier::create(dir, bytes + (1 << 20), 0, io_uring)?;
    // The activation store's path: one aligned buffer, checksummed, written and read in place.
    let mut buf = AlignedBuf::new(slice_bytes as usize);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 131 + 7) as u8;
    }
    let n = (bytes / slice_bytes).max(1);
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(tier.write_aligned(&format!("bench{i}"), &mut buf, slice_bytes as usize)?);
    }
    tier.sync()?;
    let w = gbps(n * slice_bytes, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for id in &ids {
        tier.read_into(*id, &mut buf)?;
    }
    let r = gbps(n * slice_bytes, t0.elapsed().as_secs_f64());
    Ok(NvmeBench { bytes: n * slice_bytes, slice_bytes, raw_write_gbps: raw_w, raw_read_gbps: raw_r, tier_write_gbps: w, tier_read_gbps: r, io_uring: tier.engine() == crate::nvme::Engine::IoUring })
}
