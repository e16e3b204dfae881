//! Speeds the planner needs, measured on this machine (`train plan --calibrate`) with the same
//! kernels and tier code the run uses, cached per device and dtype; on CPU, measured on first use
//! (a few seconds); on CUDA without a measurement, stated assumptions.
use std::path::{Path, PathBuf};
use std::time::Instant;

use planner::plan::Calibration;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(device: Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    sync(device);
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            sync(device);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[reps / 2]
}

fn device_tag(device: Device, kind: Kind) -> String {
    let d = match device {
        Device::Cuda(i) => format!("cuda{i}"),
        _ => "cpu".into(),
    };
    format!("{d}-{}", format!("{kind:?}").to_lowercase())
}

/// Where calibrations are cached: $XDG_CACHE_HOME/strata or ~/.cache/strata.
pub fn cache_path(device: Device, kind: Kind) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))).unwrap_or_else(std::env::temp_dir);
    base.join("strata").join(format!("calibration-{}.json", device_tag(device, kind)))
}

/// Measures matmul and attention throughput on `device` in `kind`, and the tiers' write speeds
/// (NVMe in `nvme_dir`).
pub fn measure(device: Device, kind: Kind, nvme_dir: &Path) -> Result<Calibration> {
    let (m, n) = if device == Device::Cpu { (1024i64, 2048i64) } else { (8192, 8192) };
    let a = Tensor::randn([m, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let secs = time(device, 3, || {
        let _ = a.matmul(&b);
    });
    let matmul_flops = 2.0 * (m * n * n) as f64 / secs;
    let (t, heads, hd) = if device == Device::Cpu { (2048i64, 4i64, 64i64) } else { (8192, 32, 128) };
    let q = Tensor::randn([t, heads, hd], (kind, device));
    let cfg = kernels::attention::AttnConfig { heads, kv_heads: heads, head_dim: hd, scale: 1.0 / (hd as f64).sqrt(), sliding_window: None };
    let mut err = None;
    let secs = time(device, 3, || {
        if let Err(e) = kernels::attention::forward(&q, &q, &q, &cfg) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(TrainerError::Device(format!("calibration attention: {e}")));
    }
    let attention_flops = 4.0 * (heads * hd) as f64 * (t * t) as f64 / 2.0 / secs;
    let mb = 256u64 << 20;
    let host = offload::bench::bench_memory(offload::store::Tier::Host, 0, mb, 16 << 20, device)?;
    let node = offload::numa::nodes()?.iter().find(|n| n.is_far()).map_or(offload::numa::current_node(), |n| n.id);
    let numa = offload::bench::bench_memory(offload::store::Tier::Numa, node, mb, 16 << 20, device)?;
    let nvme = offload::bench::bench_nvme(nvme_dir, mb, 16 << 20, true)?;
    // From a CUDA device, NVMe writes first cross to host memory.
    let nvme_bps = if device == Device::Cpu { nvme.tier_write_gbps * 1e9 } else { 1.0 / (1.0 / (nvme.tier_write_gbps * 1e9) + 1.0 / (host.tier_write_gbps * 1e9)) };
    Ok(Calibration {
        device: device_tag(device, kind),
        matmul_flops,
        attention_flops,
        host_bps: host.tier_write_gbps * 1e9,
        numa_bps: numa.tier_write_gbps * 1e9,
        nvme_bps,
        source: format!("measured on this machine ({}; NVMe in {})", device_tag(device, kind), nvme_dir.display()),
    })
}

/// Assumptions for a CUDA device never calibrated: an H100-class GPU at ~45% of bf16 peak,
/// PCIe 5 host copies, a fast NVMe.
fn assumed_cuda(device: Device, kind: Kind) -> Calibration {
    Calibration {
        device: device_tag(device, kind),
        matmul_flops: 450e12,
        attention_flops: 300e12,
        host_bps: 25e9,
        numa_bps: 15e9,
        nvme_bps: 5e9,
        source: "assumed (not calibrated: run `train plan --calibrate` on the GPU machine): 450 TFLOP/s matmul, 300 TFLOP/s attention, 25 GB/s host, 15 GB/s NUMA, 5 GB/s NVMe".into(),
    }
}

/// The cached calibration, else assumed figures (never measures: for what-would-fit answers,
/// which depend on bytes only).
pub fn cached_or_assumed(device: Device, kind: Kind) -> Calibration {
    std::fs::read_to_string(cache_path(device, kind)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| assumed_cuda(device, kind))
}

/// The cached calibration; otherwise measured (CPU) or assumed (CUDA).
pub fn load_or_measure(device: Device, kind: Kind, nvme_dir: &Path, force: bool) -> Result<Calibration> {
    let path = cache_path(device, kind);
    if !force {
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<Calibration>(&text) {
                Ok(c) => return Ok(c),
                Err(e) => eprintln!("warning: {}: unreadable calibration ({e}); measuring again", path.display()),
            }
        }
    }
    let usable = match device {
        Device::Cuda(_) => tch::Cuda::is_available(),
        _ => true,
    };
    if !usable {
        return Ok(assumed_cuda(device, kind));
    }
    if !force && matches!(device, Device::Cuda(_)) {
        return Ok(assumed_cuda(device, kind));
    }
    let c = measure(device, kind, nvme_dir)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(text) = serde_json::to_string_pretty(&c) {
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("warning: {}: cannot cache the calibration: {e}", path.display());
        }
    }
    Ok(c)
}
