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

/// NVMe bandwidths in GB/s (10⁹ bytes/s), best of three rounds: the disk's raw O_DIRECT figure
/// and the tier's own path.
#[derive(Debug, Clone, Copy)]
pub struct NvmeBench {
    /// Bytes the tier moved each way per round (a whole number of slices).
    pub bytes: u64,
    /// Bytes per slice the tier wrote and read.
    pub slice_bytes: u64,
    /// Plain sequential O_DIRECT writes in 8 MiB requests, fsync included.
    pub raw_write_gbps: f64,
    /// Plain sequential O_DIRECT reads in 8 MiB requests.
    pub raw_read_gbps: f64,
    /// The tier's checksummed slice writes, fsync included.
    pub tier_write_gbps: f64,
    /// The tier's slice reads, checksums verified.
    pub tier_read_gbps: f64,
    /// Whether the tier ran on io_uring (false: blocking pread/pwrite).
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

/// Measures both paths on `bytes` of data in slices of `slice_bytes`: three rounds, raw and tier
/// alternating (a virtual disk's speed drifts over seconds), the best of each reported.
pub fn bench_nvme(dir: &Path, bytes: u64, slice_bytes: u64, io_uring: bool) -> Result<NvmeBench> {
    let mut tier = NvmeTier::create(dir, bytes + (1 << 20), 0, io_uring)?;
    // The activation store's path: one aligned buffer, checksummed, written and read in place.
    let mut buf = AlignedBuf::new(slice_bytes as usize);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 131 + 7) as u8;
    }
    let n = (bytes / slice_bytes).max(1);
    let best = |a: f64, b: f64| a.max(b);
    let (mut raw_w, mut raw_r, mut w, mut r) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for _ in 0..3 {
        let (rw, rr) = raw(dir, bytes)?;
        raw_w = best(raw_w, rw);
        raw_r = best(raw_r, rr);
        let t0 = Instant::now();
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(tier.write_aligned(&format!("bench{i}"), &mut buf, slice_bytes as usize)?);
        }
        tier.sync()?;
        w = best(w, gbps(n * slice_bytes, t0.elapsed().as_secs_f64()));
        let t0 = Instant::now();
        for id in &ids {
            tier.read_into(*id, &mut buf)?;
        }
        r = best(r, gbps(n * slice_bytes, t0.elapsed().as_secs_f64()));
        for id in ids {
            tier.free(id)?;
        }
    }
    Ok(NvmeBench { bytes: n * slice_bytes, slice_bytes, raw_write_gbps: raw_w, raw_read_gbps: raw_r, tier_write_gbps: w, tier_read_gbps: r, io_uring: tier.engine() == crate::nvme::Engine::IoUring })
}

/// Bandwidth of a memory tier (host or a NUMA node) through the activation store, beside a plain
/// copy between the same kinds of memory (CPU: memcpy into and out of a mapping on that node;
/// CUDA: libtorch's copy between device and page-locked host memory).
#[derive(Debug, Clone, Copy)]
pub struct MemBench {
    /// Bytes moved each way (all tensors together).
    pub bytes: u64,
    /// Plain copy into the tier's kind of memory, GB/s (10⁹ bytes/s).
    pub raw_write_gbps: f64,
    /// Plain copy back out of it, GB/s.
    pub raw_read_gbps: f64,
    /// `put` of every tensor until all reached the tier (`flush`), GB/s.
    pub tier_write_gbps: f64,
    /// `prefetch` and `take` of every tensor, GB/s.
    pub tier_read_gbps: f64,
}

/// Measures `tier` (Host, or Numa on `node`) with `bytes` in tensors of `slice_bytes` living on
/// `device` (CPU or CUDA: then the copies are device↔host).
pub fn bench_memory(tier: crate::store::Tier, node: u32, bytes: u64, slice_bytes: u64, device: tch::Device) -> Result<MemBench> {
    use crate::store::{ActivationStore, StoreConfig, Tier};
    use tch::{Kind, Tensor};
    let n = (bytes / slice_bytes).max(1) as usize;
    let total = n as u64 * slice_bytes;
    let cuda = match device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let make = || (0..n).map(|i| Tensor::full([slice_bytes as i64], (i % 251) as i64, (Kind::Uint8, device))).collect::<Vec<_>>();
    let sync = || {
        if let Some(i) = cuda {
            tch::Cuda::synchronize(i as i64);
        }
    };

    // Raw: the same bytes through the plainest copy of the same memories.
    let (raw_w, raw_r) = if cuda.is_some() {
        let src = make();
        let host: Vec<Tensor> = src.iter().map(|_| Tensor::empty([slice_bytes as i64], (Kind::Uint8, tch::Device::Cpu)).pin_memory(device)).collect();
        sync();
        let t0 = Instant::now();
        for (h, s) in host.iter().zip(&src) {
            let mut h = h.shallow_clone();
            h.copy_(s);
        }
        sync();
        let w = gbps(total, t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for (h, s) in host.iter().zip(&src) {
            let mut s = s.shallow_clone();
            s.copy_(h);
        }
        sync();
        (w, gbps(total, t0.elapsed().as_secs_f64()))
    } else {
        let mut arena = crate::arena::Arena::new(tier.name(), total, (tier == Tier::Numa).then_some(node), false)?;
        let slots: Vec<_> = (0..n).map(|i| arena.alloc(&format!("raw{i}"), slice_bytes)).collect::<Result<_>>()?;
        let src = vec![7u8; slice_bytes as usize];
        let mut back = vec![0u8; slice_bytes as usize];
        // First touch outside the timing, as the store's arena has been touched by the warm-up.
        for s in &slots {
            // SAFETY: each slot is allocated and used by this thread only.
            unsafe { arena.view(*s).as_mut_slice() }.fill(1);
        }
        let t0 = Instant::now();
        for s in &slots {
            // SAFETY: as above.
            unsafe { arena.view(*s).as_mut_slice() }.copy_from_slice(&src);
        }
        let w = gbps(total, t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for s in &slots {
            // SAFETY: as above.
            back.copy_from_slice(unsafe { arena.view(*s).as_mut_slice() });
            std::hint::black_box(&back);
        }
        (w, gbps(total, t0.elapsed().as_secs_f64()))
    };

    // The engine: put every tensor, wait until all reached the tier; prefetch and take them back.
    let cfg = StoreConfig {
        host_bytes: if tier == Tier::Host { total + (1 << 20) } else { 0 },
        numa: (tier == Tier::Numa).then_some((node, total + (1 << 20))),
        max_inflight: 256 << 20,
        cuda_device: cuda,
        ..Default::default()
    };
    let mut store = ActivationStore::new(&cfg)?;
    let round = |store: &mut ActivationStore| -> Result<(f64, f64)> {
        let src = make();
        sync();
        let t0 = Instant::now();
        for (i, t) in src.into_iter().enumerate() {
            store.put(0, &format!("t{i}"), t, tier)?;
        }
        store.flush()?;
        let w = gbps(total, t0.elapsed().as_secs_f64());
        let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        let t0 = Instant::now();
        store.prefetch(0, &names)?;
        let back: Vec<Tensor> = names.iter().map(|nm| store.take(0, nm)).collect::<Result<_>>()?;
        sync();
        let r = gbps(total, t0.elapsed().as_secs_f64());
        drop(back);
        Ok((w, r))
    };
    round(&mut store)?; // warm-up: first touch of the arena's pages
    let (w, r) = round(&mut store)?;
    Ok(MemBench { bytes: total, raw_write_gbps: raw_w, raw_read_gbps: raw_r, tier_write_gbps: w, tier_read_gbps: r })
}
