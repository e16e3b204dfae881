//! The process's own memory: its resident set now and at its peak, the peak per step (the kernel's
//! high-water mark, reset at the start of each step), and the allocator settings that make a
//! step's freed memory serve the next step instead of growing the process.
//!
//! CPU: the `train` binary links jemalloc as the process's malloc (libtorch's CPU tensors come
//! from `posix_memalign`, so they use it too) with `narenas:1,oversize_threshold:0,
//! dirty_decay_ms:5000,muzzy_decay_ms:0`. Measured with glibc's malloc (8 layers, hidden 512,
//! 8192 tokens, NVMe, 5 steps, per-step peak RSS): 2.25, 2.70, 2.59, 2.71, 2.59 GiB against a live
//! peak of ~1.47 GiB: glibc raises its mmap threshold as large blocks are freed, and later tensors
//! come from a fragmented heap that is never given back. Alternatives tried on the same run:
//! `M_MMAP_THRESHOLD` fixed at 128 KiB gives the live peak (1.47 GiB) but every tensor is fresh,
//! page-faulted memory; jemalloc keeping freed pages (`dirty_decay_ms:-1`) is the fastest (~25%
//! faster than glibc) but holds 1.72 GiB; jemalloc's defaults purge blocks ≥ 8 MiB at once; a
//! second arena for the I/O thread's tensors held 0.4 GiB more. Every phase ([`PhasePeak`]: a
//! step, a bench iteration) also starts by purging all freed pages at once (the binary registers
//! jemalloc's `arena.<all>.purge` with [`set_page_release`]): one call instead of the decay's
//! many, which made steps faster and lower. `scripts/bench-allocator.sh`, interleaved, 2 rounds
//! (2026-11-30): 4K resident / 8K NVMe, tokens/s vs glibc 0.91 / 0.91 at 1.64 / 1.15 GiB (plan
//! 1.73 / 1.15; glibc 1.80 / 2.14); keeping freed pages (`MALLOC_CONF=dirty_decay_ms:-1,
//! muzzy_decay_ms:-1`, read after the built-in options) 1.08 / 1.07 at 1.73 / 1.35 GiB. A purge
//! before each backward as well did not lower the kept-pages variant (1.31-1.34 GiB at 8K NVMe):
//! its excess forms within the backward.
//!
//! CUDA: libtorch's caching allocator keeps freed blocks reserved; with expandable segments
//! (set here unless the user set `PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF`) its segments
//! grow in place, so reserved memory stays close to allocated memory. [`PhasePeak::start_on`] a
//! CUDA device also resets the allocator's peaks, and [`PhasePeak::cuda`] reads them (through
//! `dist::cuda_memory`): each step's `max_memory_allocated` and `max_memory_reserved` go to the
//! metrics, beside the plan's device peak.

use std::sync::atomic::{AtomicU64, Ordering};

/// A `kB` field of /proc/self/status, in bytes; None where /proc is missing.
fn status_field(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident set of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// The largest high-water mark read so far (across resets of the kernel's mark).
static PEAK_SEEN: AtomicU64 = AtomicU64::new(0);

/// The kernel's high-water mark now, kept in [`PEAK_SEEN`]: every reading is kept, because the
/// kernel folds the current resident set into its mark only lazily (at reads and some unmaps), so
/// a peak seen by one reading can be gone from the mark once pages are given back.
fn observed_hwm() -> Option<u64> {
    let b = status_field("VmHWM:")?;
    PEAK_SEEN.fetch_max(b, Ordering::Relaxed);
    Some(b)
}

/// Peak resident set of this process since it started, in bytes (across [`PhasePeak`] resets).
pub fn peak_rss_bytes() -> Option<u64> {
    observed_hwm().map(|_| PEAK_SEEN.load(Ordering::Relaxed))
}

/// Restarts the kernel's high-water mark (VmHWM) from the current resident set (Linux ≥ 4.0: `5`
/// to clear_refs), keeping the process's peak so far for [`peak_rss_bytes`]. False where that is
/// not possible.
fn reset_peak_rss() -> bool {
    observed_hwm();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// How the process gives freed pages back to the kernel (set by the `train` binary: jemalloc's
/// purge); nothing where unset.
static PAGE_RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers how to give the allocator's freed pages back to the kernel at a phase's start.
pub fn set_page_release(release: fn()) {
    let _ = PAGE_RELEASE.set(release);
}

/// Gives the allocator's freed pages back to the kernel now (where the binary registered how).
fn release_freed_pages() {
    if let Some(release) = PAGE_RELEASE.get() {
        release();
    }
}

/// Peak resident set of one phase (a step, a benchmark iteration): gives freed pages back to the
/// kernel and resets the high-water mark when created, reads it when asked. On a CUDA device also
/// the caching allocator's peaks.
pub struct PhasePeak {
    reset: bool,
    /// The CUDA device whose allocator peaks were reset at the start (None: CPU, or a build
    /// without the allocator's statistics).
    cuda: Option<usize>,
}

impl PhasePeak {
    /// The process's phase (its resident set).
    pub fn start() -> PhasePeak {
        // The mark before the purge gives the pages back (see observed_hwm).
        observed_hwm();
        release_freed_pages();
        PhasePeak { reset: reset_peak_rss(), cuda: None }
    }

    /// A phase computing on `device`: on CUDA the allocator's allocated and reserved peaks too.
    pub fn start_on(device: tch::Device) -> PhasePeak {
        let cuda = match device {
            tch::Device::Cuda(i) => dist::cuda_memory::reset_peaks(i).ok().map(|_| i),
            _ => None,
        };
        PhasePeak { cuda, ..PhasePeak::start() }
    }

    /// The phase's peak; None where /proc is missing or the mark could not be reset.
    pub fn bytes(&self) -> Option<u64> {
        self.reset.then(observed_hwm).flatten()
    }

    /// The CUDA caching allocator's figures, peaks over the phase; None on CPU.
    pub fn cuda(&self) -> Option<dist::cuda_memory::CudaMemory> {
        self.cuda.and_then(|i| dist::cuda_memory::stats(i).ok())
    }
}

/// Asks libtorch's CUDA caching allocator for expandable segments unless the user configured it.
/// Call before any thread is started and before CUDA is initialised (it sets an environment
/// variable that libtorch reads when it first allocates device memory).
pub fn configure_cuda_allocator() {
    let set = |k: &str| std::env::var_os(k).is_some();
    if !set("PYTORCH_CUDA_ALLOC_CONF") && !set("PYTORCH_ALLOC_CONF") {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
}
