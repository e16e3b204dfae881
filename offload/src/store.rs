//! The activation store: between a layer's forward and its backward, each saved tensor is kept
//! where it is or moved to a memory tier: host RAM, a NUMA node (far/CXL memory), or the NVMe
//! file. Backward asks for tensors back; `prefetch` starts their way back early so that the
//! transfer overlaps the backward of the layer before.
//!
//! Who moves the bytes:
//! - CPU tensors: the store's I/O thread copies into/out of the arenas and writes/reads the NVMe
//!   tier, so the training thread only waits when a transfer is late (`stall_seconds`).
//! - CUDA tensors to host/NUMA: a copy stream ([`crate::cuda::CopyEngine`]) with events; the
//!   source tensor is held until its copy's event completed, an arena slot is released only
//!   after the copy that reads it completed.
//! - CUDA tensors to NVMe: the I/O thread copies them to host first (synchronously).
//!
//! A tensor comes back whole ([`ActivationStore::take`]) or rows at a time
//! ([`ActivationStore::take_rows`], until [`ActivationStore::release`]): token tiles read a saved
//! tensor one tile's rows at a time, with the next tile's on their way ([`ActivationStore::prefetch_rows`]).
//!
//! The store knows tensors by (layer, name) only and does not decide: each `put` names its tier,
//! which the caller reads from the step's [`planner::placement::Placement`]. The one exception is
//! a full arena (a micro-batch whose split stores a row or two more than the placement's): the
//! tensor spills to the next slower tier and `StoreStats::spilled_bytes` says so.
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::aligned::AlignedBuf;
use crate::arena::{Arena, Slot, SlotView};
use crate::cuda::{CopyEngine, CopyEvent};
use crate::error::{OffloadError, Result};
use crate::nvme::{NvmeTier, SliceId};

pub use planner::placement::{Tier, TIERS};

/// The NVMe tier's file.
#[derive(Debug, Clone)]
pub struct NvmeConfig {
    /// Directory of the file (created there and unlinked at once).
    pub dir: PathBuf,
    /// Capacity in bytes (rounded up to a page).
    pub bytes: u64,
    /// This process's rank; part of the file's name.
    pub rank: usize,
    /// False forces blocking pread/pwrite instead of io_uring.
    pub io_uring: bool,
}

/// The tiers a store offers and their budgets (a tier with no budget is absent).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Budget of the host RAM tier in bytes.
    pub host_bytes: u64,
    /// NUMA node and its budget.
    pub numa: Option<(u32, u64)>,
    /// The NVMe tier's file.
    pub nvme: Option<NvmeConfig>,
    /// Bytes that may wait for the I/O thread (or the copy stream); `put` blocks beyond it.
    pub max_inflight: u64,
    /// The CUDA device whose tensors are offloaded: arenas are page-locked and copies go
    /// through a copy stream.
    pub cuda_device: Option<usize>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { host_bytes: 0, numa: None, nvme: None, max_inflight: 256 << 20, cuda_device: None }
    }
}

/// Bytes moved and time spent, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    /// Bytes copied into the tiers.
    pub written_bytes: u64,
    /// Bytes copied back out of the tiers (for NVMe rows: the whole checksummed chunks read).
    pub read_bytes: u64,
    /// Most bytes resident in each tier at once.
    pub host_peak_bytes: u64,
    /// Most bytes resident in the NUMA tier at once.
    pub numa_peak_bytes: u64,
    /// Most bytes resident in the NVMe tier at once.
    pub nvme_peak_bytes: u64,
    /// Time the I/O thread spent writing / reading (overlapped with compute where possible).
    pub write_seconds: f64,
    /// Seconds the I/O thread spent reading back.
    pub read_seconds: f64,
    /// The largest single transfer back (a whole tensor, or the rows asked for at once).
    pub largest_read_bytes: u64,
    /// Time the training thread waited for the store (backpressure on put, reads on take).
    pub stall_seconds: f64,
    /// Bytes put into a slower tier than the one asked for, because that one was full.
    pub spilled_bytes: u64,
}

type Key = (usize, String);

/// What a request brings back: a whole tensor, or rows `[start, start + len)` of it (the first
/// dimension; the tensor stays stored).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Want {
    key: Key,
    rows: Option<(i64, i64)>,
}

impl Want {
    fn whole(key: Key) -> Want {
        Want { key, rows: None }
    }
}

#[derive(Clone)]
struct Meta {
    shape: Vec<i64>,
    kind: Kind,
    device: Device,
}

impl Meta {
    fn of(t: &Tensor) -> Meta {
        Meta { shape: t.size(), kind: t.kind(), device: t.device() }
    }

    /// Bytes of one row (one index of the first dimension).
    fn row_bytes(&self) -> usize {
        self.shape.iter().skip(1).product::<i64>() as usize * self.kind.elt_size_in_bytes()
    }

    /// The meta of rows `[start, start + len)` and their byte range in the whole tensor's bytes.
    fn rows(&self, (start, len): (i64, i64)) -> Result<(Meta, std::ops::Range<usize>)> {
        let total = self.shape.first().copied().unwrap_or(0);
        if start < 0 || len < 0 || start + len > total {
            return Err(io_err("take rows", format!("rows [{start}, {}) of a tensor of shape {:?}", start + len, self.shape)));
        }
        let mut shape = self.shape.clone();
        shape[0] = len;
        let rb = self.row_bytes();
        Ok((Meta { shape, ..self.clone() }, start as usize * rb..(start + len) as usize * rb))
    }

    fn rebuild(&self, bytes: &[u8]) -> Result<Tensor> {
        Tensor::f_from_data_size(bytes, &self.shape, self.kind)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(|e| OffloadError::Io { path: "activation store".into(), op: "rebuild tensor", source: std::io::Error::other(e.to_string()) })
    }
}

enum Req {
    /// Write to the NVMe tier.
    Write(Key, Tensor),
    /// Read back from the NVMe tier (a whole tensor is freed there once read).
    Read(Want),
    /// Free a tensor's NVMe slice (after its rows were read).
    Free(Key),
    /// Copy a tensor's bytes into an arena slot.
    Copy(Tensor, SlotView),
    /// Rebuild a tensor (or rows of it) from (part of) an arena slot.
    Load(Want, SlotView, Meta),
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Copies a tensor's bytes into `dst` (which must be exactly that long).
fn copy_into(t: &Tensor, dst: &mut [u8]) {
    let t = t.to_device(Device::Cpu).contiguous();
    t.copy_data_u8(dst, t.numel());
}

/// Copies a tensor's bytes into `buf` (grown when too small); returns their count.
fn tensor_bytes_into(t: &Tensor, buf: &mut AlignedBuf) -> usize {
    let len = bytes_of(t) as usize;
    if buf.len() < len {
        *buf = AlignedBuf::new(len);
    }
    copy_into(t, &mut buf.as_mut_slice()[..len]);
    len
}

/// Bytes handed to the I/O thread and not yet written: `put` waits while this exceeds the limit,
/// so memory held by tensors on their way out stays bounded.
#[derive(Default)]
struct InFlight {
    bytes: Mutex<u64>,
    written: Condvar,
}

impl InFlight {
    fn done(&self, n: u64) {
        let mut b = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *b = b.saturating_sub(n);
        self.written.notify_all();
    }
}

struct Shared {
    stats: Mutex<StoreStats>,
    inflight: InFlight,
}

fn io_err(op: &'static str, msg: String) -> OffloadError {
    OffloadError::Io { path: "activation store".into(), op, source: std::io::Error::other(msg) }
}

/// The I/O thread: owns the NVMe tier, serves requests in order (so a read always follows its
/// write).
fn worker(nvme: Option<NvmeTier>, rx: Receiver<Req>, done: std::sync::mpsc::Sender<(Want, Result<Tensor>)>, shared: Arc<Shared>) {
    serve(nvme, rx, done, &shared);
    // Whatever ended the thread, a `put` waiting for room must not wait for it forever: it
    // wakes, finds the thread gone and returns an error.
    shared.inflight.done(u64::MAX);
}

fn serve(mut nvme: Option<NvmeTier>, rx: Receiver<Req>, done: std::sync::mpsc::Sender<(Want, Result<Tensor>)>, shared: &Shared) {
    let mut slices: HashMap<Key, (SliceId, Meta)> = HashMap::new();
    let mut failed: Option<String> = None;
    // One aligned buffer reused for every NVMe transfer: a tensor is copied once into it and
    // written from it with O_DIRECT, and read into it and copied once into a new tensor.
    let mut buf = AlignedBuf::new(1);
    let add = |f: &dyn Fn(&mut StoreStats)| f(&mut shared.stats.lock().unwrap_or_else(|e| e.into_inner()));
    for req in rx {
        match req {
            Req::Write(key, t) => {
                let n = bytes_of(&t);
                let Some(tier) = nvme.as_mut().filter(|_| failed.is_none()) else {
                    failed.get_or_insert_with(|| "no NVMe tier".into());
                    shared.inflight.done(n);
                    continue;
                };
                let t0 = Instant::now();
                let len = tensor_bytes_into(&t, &mut buf);
                let meta = Meta::of(&t);
                // The source tensor is released only after its bytes were copied out.
                drop(t);
                shared.inflight.done(n);
                match tier.write_aligned(&format!("layer{}.{}", key.0, key.1), &mut buf, len) {
                    Ok(id) => {
                        slices.insert(key, (id, meta));
                        let used = tier.used();
                        add(&|s| {
                            s.written_bytes += len as u64;
                            s.nvme_peak_bytes = s.nvme_peak_bytes.max(used);
                            s.write_seconds += t0.elapsed().as_secs_f64();
                        });
                    }
                    Err(e) => failed = Some(e.to_string()),
                }
            }
            Req::Read(want) => {
                let t0 = Instant::now();
                let found = if want.rows.is_some() { slices.get(&want.key).cloned() } else { slices.remove(&want.key) };
                let r = match (&failed, found, nvme.as_mut()) {
                    (Some(msg), _, _) => Err(io_err("nvme write", msg.clone())),
                    (None, Some((id, meta)), Some(tier)) => {
                        // (meta of what comes back, where its bytes start in `buf`, their length,
                        // bytes read from the file: whole checksummed chunks for rows).
                        let read = |tier: &mut NvmeTier, buf: &mut AlignedBuf| -> Result<(Meta, usize, usize, usize)> {
                            match want.rows {
                                None => {
                                    let n = tier.read_into(id, buf)?;
                                    Ok((meta.clone(), 0, n, n))
                                }
                                Some(rows) => {
                                    let (m, range) = meta.rows(rows)?;
                                    let (at, read) = tier.read_range_into(id, range.start, range.len(), buf)?;
                                    Ok((m, at, range.len(), read))
                                }
                            }
                        };
                        read(tier, &mut buf).and_then(|(m, at, len, read)| {
                            if want.rows.is_none() {
                                tier.free(id)?;
                            }
                            add(&|s| {
                                s.read_bytes += read as u64;
                                s.largest_read_bytes = s.largest_read_bytes.max(len as u64);
                                s.read_seconds += t0.elapsed().as_secs_f64();
                            });
                            m.rebuild(&buf.as_slice()[at..at + len])
                        })
                    }
                    _ => Err(io_err("read", format!("layer {} tensor `{}` was never stored", want.key.0, want.key.1))),
                };
                if done.send((want, r)).is_err() {
                    return;
                }
            }
            Req::Free(key) => {
                if let (Some((id, _)), Some(tier)) = (slices.remove(&key), nvme.as_mut()) {
                    if let Err(e) = tier.free(id) {
                        failed.get_or_insert(e.to_string());
                    }
                }
            }
            Req::Copy(t, view) => {
                let t0 = Instant::now();
                let n = bytes_of(&t);
                // SAFETY: the store allocated this slot for this tensor and touches it only after
                // the Load that follows this request in the queue.
                copy_into(&t, unsafe { view.as_mut_slice() });
                drop(t);
                shared.inflight.done(n);
                add(&|s| {
                    s.written_bytes += n;
                    s.write_seconds += t0.elapsed().as_secs_f64();
                });
            }
            Req::Load(want, view, meta) => {
                let t0 = Instant::now();
                // SAFETY: the slot stays allocated until the store has received this reply.
                let bytes = unsafe { view.as_mut_slice() };
                let r = meta.rebuild(bytes);
                add(&|s| {
                    s.read_bytes += bytes.len() as u64;
                    s.largest_read_bytes = s.largest_read_bytes.max(bytes.len() as u64);
                    s.read_seconds += t0.elapsed().as_secs_f64();
                });
                if done.send((want, r)).is_err() {
                    return;
                }
            }
        }
    }
}

/// A tensor in an arena.
struct InArena {
    tier: Tier,
    slot: Slot,
    meta: Meta,
}

/// A device-to-host copy in flight: its source is held until the event completes.
struct PendingD2h {
    _src: Tensor,
    ev: CopyEvent,
    bytes: u64,
}

/// Saved tensors between forward and backward, known by (layer, name), each in the tier its
/// `put` names.
pub struct ActivationStore {
    kept: HashMap<Key, Tensor>,
    host: Option<Arena>,
    numa: Option<Arena>,
    nvme_capacity: Option<u64>,
    in_arena: HashMap<Key, InArena>,
    /// Keys written to the NVMe tier and not yet taken.
    on_nvme: HashSet<Key>,
    /// Tensors and rows whose way back was started (read requested or H2D issued).
    requested: HashSet<Want>,
    ready: HashMap<Want, Result<Tensor>>,
    io: Option<(SyncSender<Req>, Receiver<(Want, Result<Tensor>)>, JoinHandle<()>)>,
    shared: Arc<Shared>,
    stall: f64,
    max_inflight: u64,
    copy: Option<CopyEngine>,
    pending_d2h: VecDeque<PendingD2h>,
    /// Arena slots read by an H2D copy, released once it completed.
    pending_free: Vec<(Tier, Slot, CopyEvent)>,
    /// The latest H2D copy of rows of a tensor still in its arena slot (copies on the stream
    /// complete in order: when it has, every earlier one has).
    row_copies: HashMap<Key, CopyEvent>,
    transfer_bytes: (u64, u64),
    /// The largest H2D copy back.
    largest_h2d: u64,
    /// Where each tensor of the latest forward went and its bytes.
    placed: HashMap<Key, (Tier, u64)>,
    /// Layers whose tensors were taken back since their last put: their next put starts a new
    /// forward, which replaces their `placed` entries.
    taken: HashSet<usize>,
    spilled: u64,
}

impl ActivationStore {
    /// A store that can only keep tensors (no tier configured).
    pub fn resident() -> ActivationStore {
        ActivationStore {
            kept: HashMap::new(),
            host: None,
            numa: None,
            nvme_capacity: None,
            in_arena: HashMap::new(),
            on_nvme: HashSet::new(),
            requested: HashSet::new(),
            ready: HashMap::new(),
            io: None,
            shared: Arc::new(Shared { stats: Mutex::new(StoreStats::default()), inflight: InFlight::default() }),
            stall: 0.0,
            max_inflight: u64::MAX,
            copy: None,
            pending_d2h: VecDeque::new(),
            pending_free: Vec::new(),
            row_copies: HashMap::new(),
            transfer_bytes: (0, 0),
            largest_h2d: 0,
            placed: HashMap::new(),
            taken: HashSet::new(),
            spilled: 0,
        }
    }

    /// A store with the tiers of `cfg`, each with its budget, served by its own I/O thread.
    pub fn new(cfg: &StoreConfig) -> Result<ActivationStore> {
        let mut s = Self::resident();
        s.max_inflight = cfg.max_inflight;
        let pin = cfg.cuda_device.is_some();
        if cfg.host_bytes > 0 {
            s.host = Some(Arena::new("host", cfg.host_bytes, None, pin)?);
        }
        if let Some((node, bytes)) = cfg.numa {
            s.numa = Some(Arena::new("numa", bytes, Some(node), pin)?);
        }
        if let Some(d) = cfg.cuda_device {
            s.copy = Some(CopyEngine::new(d)?);
        }
        let nvme = match &cfg.nvme {
            Some(n) => {
                let t = NvmeTier::create(&n.dir, n.bytes, n.rank, n.io_uring)?;
                s.nvme_capacity = Some(t.capacity());
                Some(t)
            }
            None => None,
        };
        if nvme.is_some() || s.host.is_some() || s.numa.is_some() {
            let (tx, rx) = sync_channel::<Req>(64);
            let (dtx, drx) = channel();
            let shared = s.shared.clone();
            let handle = std::thread::Builder::new()
                .name("strata-offload-io".into())
                .spawn(move || worker(nvme, rx, dtx, shared))
                .map_err(|e| OffloadError::Io { path: "activation store".into(), op: "spawn I/O thread", source: e })?;
            s.io = Some((tx, drx, handle));
        }
        Ok(s)
    }

    /// A store with only an NVMe tier of `capacity` bytes in `dir`.
    pub fn with_nvme(dir: &std::path::Path, capacity: u64, rank: usize, io_uring: bool, max_inflight: u64) -> Result<ActivationStore> {
        Self::new(&StoreConfig { nvme: Some(NvmeConfig { dir: dir.to_path_buf(), bytes: capacity, rank, io_uring }), max_inflight, ..Default::default() })
    }

    /// Capacity of each configured tier, fastest first.
    pub fn capacities(&self) -> Vec<(Tier, u64)> {
        let mut v = Vec::new();
        if let Some(a) = &self.host {
            v.push((Tier::Host, a.capacity()));
        }
        if let Some(a) = &self.numa {
            v.push((Tier::Numa, a.capacity()));
        }
        if let Some(c) = self.nvme_capacity {
            v.push((Tier::Nvme, c));
        }
        v
    }

    /// Whether any offload tier is configured.
    pub fn has_tiers(&self) -> bool {
        !self.capacities().is_empty()
    }

    /// Bytes per tier `[host, numa, nvme]` of one layer's tensors as last stored (the latest
    /// forward), after any spill: what the store did, to compare with the placement.
    pub fn placed_bytes(&self, layer: usize) -> [u64; 3] {
        let mut out = [0u64; 3];
        for ((l, _), (tier, bytes)) in &self.placed {
            if let (true, Some(i)) = (*l == layer, tier.index()) {
                out[i] += bytes;
            }
        }
        out
    }

    /// Counters since the store was created; the peaks are the tiers' allocator peaks.
    pub fn stats(&self) -> StoreStats {
        let mut s = *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.stall_seconds = self.stall;
        s.spilled_bytes = self.spilled;
        s.written_bytes += self.transfer_bytes.0;
        s.read_bytes += self.transfer_bytes.1;
        s.largest_read_bytes = s.largest_read_bytes.max(self.largest_h2d);
        s.host_peak_bytes = self.host.as_ref().map_or(0, |a| a.peak());
        s.numa_peak_bytes = self.numa.as_ref().map_or(0, |a| a.peak());
        s
    }

    fn io_gone() -> OffloadError {
        io_err("I/O thread", "the I/O thread stopped".into())
    }

    fn arena(&mut self, tier: Tier) -> Option<&mut Arena> {
        match tier {
            Tier::Host => self.host.as_mut(),
            Tier::Numa => self.numa.as_mut(),
            _ => None,
        }
    }

    /// Waits while more than `max_inflight` bytes are on their way out (`n` more are coming).
    fn backpressure(&mut self, n: u64) -> Result<()> {
        let t0 = Instant::now();
        {
            let inflight = &self.shared.inflight;
            let mut b = inflight.bytes.lock().unwrap_or_else(|e| e.into_inner());
            while *b > 0 && *b + n > self.max_inflight {
                b = inflight.written.wait(b).unwrap_or_else(|e| e.into_inner());
            }
            *b += n;
        }
        // Device-to-host copies: the same bound over the sources they hold.
        while let Some(p) = self.pending_d2h.front() {
            let held: u64 = self.pending_d2h.iter().map(|p| p.bytes).sum();
            if held + n <= self.max_inflight && !p.ev.done()? {
                break;
            }
            if !p.ev.done()? {
                p.ev.wait()?;
            }
            self.pending_d2h.pop_front();
        }
        self.stall += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Releases what completed copies no longer need.
    fn reap(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.pending_free.len() {
            if self.pending_free[i].2.done()? {
                let (tier, slot, _) = self.pending_free.swap_remove(i);
                if let Some(a) = self.arena(tier) {
                    a.release(slot);
                }
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Hands a saved tensor to the store for `tier`. A full arena spills to the next slower
    /// tier; the error names the tensor when no tier has room.
    pub fn put(&mut self, layer: usize, name: &str, t: Tensor, tier: Tier) -> Result<()> {
        let key = (layer, name.to_string());
        let n = bytes_of(&t);
        if self.taken.remove(&layer) {
            self.placed.retain(|(l, _), _| *l != layer);
        }
        if tier == Tier::Keep || self.io.is_none() && self.copy.is_none() {
            self.placed.insert(key.clone(), (Tier::Keep, n));
            self.kept.insert(key, t);
            return Ok(());
        }
        self.reap()?;
        let slice = format!("layer{layer}.{name}");
        let mut last_full = None;
        for cand in TIERS.iter().copied().skip_while(|c| *c != tier) {
            if cand == Tier::Nvme {
                if self.nvme_capacity.is_none() {
                    continue;
                }
                self.backpressure(n)?;
                let Some((tx, _, _)) = &self.io else { return Err(Self::io_gone()) };
                tx.send(Req::Write(key.clone(), t)).map_err(|_| Self::io_gone())?;
                self.record(&key, tier, cand, n);
                self.on_nvme.insert(key);
                return Ok(());
            }
            let Some(arena) = self.arena(cand) else { continue };
            let slot = match arena.alloc(&slice, n) {
                Ok(s) => s,
                Err(e) => {
                    last_full = Some(e);
                    continue;
                }
            };
            let meta = Meta::of(&t);
            let on_cuda = matches!(t.device(), Device::Cuda(_)) && self.copy.is_some();
            if on_cuda {
                let t = t.contiguous();
                self.backpressure(0)?;
                let dst = self.arena(cand).map(|a| a.ptr(slot)).ok_or_else(Self::io_gone)?;
                let copy = self.copy.as_ref().ok_or_else(Self::io_gone)?;
                // SAFETY: the slot is this tensor's alone until its H2D completes; the source is
                // held in pending_d2h until the event completes.
                let ev = unsafe { copy.device_to_host(&t, dst)? };
                self.transfer_bytes.0 += n;
                self.pending_d2h.push_back(PendingD2h { _src: t, ev, bytes: n });
            } else {
                self.backpressure(n)?;
                let view = self.arena(cand).map(|a| a.view(slot)).ok_or_else(Self::io_gone)?;
                let Some((tx, _, _)) = &self.io else { return Err(Self::io_gone()) };
                tx.send(Req::Copy(t, view)).map_err(|_| Self::io_gone())?;
            }
            self.record(&key, tier, cand, n);
            self.in_arena.insert(key, InArena { tier: cand, slot, meta });
            return Ok(());
        }
        Err(last_full.unwrap_or_else(|| io_err("put", format!("{slice}: no {} tier configured", tier.name()))))
    }

    fn record(&mut self, key: &Key, asked: Tier, got: Tier, bytes: u64) {
        if asked != got {
            self.spilled += bytes;
        }
        self.placed.insert(key.clone(), (got, bytes));
    }

    /// Waits until everything handed to `put` has reached its tier (for benchmarks and tests).
    pub fn flush(&mut self) -> Result<()> {
        let t0 = Instant::now();
        {
            let inflight = &self.shared.inflight;
            let mut b = inflight.bytes.lock().unwrap_or_else(|e| e.into_inner());
            while *b > 0 {
                b = inflight.written.wait(b).unwrap_or_else(|e| e.into_inner());
            }
        }
        for p in self.pending_d2h.drain(..) {
            p.ev.wait()?;
        }
        self.stall += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Starts the way back of a tensor or rows of it (no-op when kept or already on its way).
    fn request(&mut self, want: &Want) -> Result<()> {
        if self.requested.contains(want) {
            return Ok(());
        }
        let key = &want.key;
        // A whole read frees the slot when it lands: no read of rows may be on its way then.
        let mixed = match want.rows {
            Some(_) => self.requested.contains(&Want::whole(key.clone())),
            None => self.requested.iter().any(|w| w.key == *key && w.rows.is_some()),
        };
        if mixed {
            return Err(io_err("take", format!("layer {} tensor `{}` is read whole and by rows at once", key.0, key.1)));
        }
        if let Some(a) = self.in_arena.get(key) {
            let (tier, slot) = (a.tier, a.slot);
            let (meta, range) = match want.rows {
                Some(rows) => a.meta.rows(rows)?,
                None => (a.meta.clone(), 0..slot.len as usize),
            };
            let src = self.arena(tier).map(|a| a.ptr(slot) as *const u8).ok_or_else(Self::io_gone)?;
            if let (Device::Cuda(_), Some(copy)) = (meta.device, &self.copy) {
                let dst = Tensor::f_empty(&meta.shape, (meta.kind, meta.device)).map_err(|e| io_err("allocate", e.to_string()))?;
                // SAFETY: `range` lies inside the slot (Meta::rows checked it against the tensor's
                // shape, whose bytes the slot holds); the slot is released only after this copy's
                // event completed (pending_free, directly or through row_copies); the D2H that
                // filled it ran earlier on the same copy stream.
                let ev = unsafe { copy.host_to_device(src.add(range.start), &dst)? };
                self.transfer_bytes.1 += range.len() as u64;
                self.largest_h2d = self.largest_h2d.max(range.len() as u64);
                if want.rows.is_some() {
                    self.row_copies.insert(key.clone(), ev);
                } else {
                    self.in_arena.remove(key);
                    self.pending_free.push((tier, slot, ev));
                }
                self.ready.insert(want.clone(), Ok(dst));
            } else {
                let view = self.arena(tier).map(|a| a.view(slot).sub(range)).ok_or_else(Self::io_gone)?;
                let Some((tx, _, _)) = &self.io else { return Err(Self::io_gone()) };
                tx.send(Req::Load(want.clone(), view, meta)).map_err(|_| Self::io_gone())?;
            }
        } else if self.on_nvme.contains(key) {
            let Some((tx, _, _)) = &self.io else { return Err(Self::io_gone()) };
            tx.send(Req::Read(want.clone())).map_err(|_| Self::io_gone())?;
        } else {
            return Ok(());
        }
        self.requested.insert(want.clone());
        Ok(())
    }

    /// Starts reading these tensors back now, ahead of `take`.
    pub fn prefetch(&mut self, layer: usize, names: &[String]) -> Result<()> {
        self.reap()?;
        for n in names {
            self.request(&Want::whole((layer, n.clone())))?;
        }
        Ok(())
    }

    /// Starts reading rows `[start, start + len)` of a stored tensor back now, ahead of
    /// [`ActivationStore::take_rows`].
    pub fn prefetch_rows(&mut self, layer: usize, name: &str, start: i64, len: i64) -> Result<()> {
        self.reap()?;
        self.request(&Want { key: (layer, name.to_string()), rows: Some((start, len)) })
    }

    fn never_stored(key: &Key) -> OffloadError {
        io_err("take", format!("layer {} tensor `{}` was never stored", key.0, key.1))
    }

    /// Takes a saved tensor back, waiting for its transfer if it is not in yet.
    pub fn take(&mut self, layer: usize, name: &str) -> Result<Tensor> {
        let key = (layer, name.to_string());
        self.taken.insert(layer);
        if let Some(t) = self.kept.remove(&key) {
            return Ok(t);
        }
        let want = Want::whole(key);
        if !self.in_arena.contains_key(&want.key) && !self.on_nvme.contains(&want.key) && !self.requested.contains(&want) {
            return Err(Self::never_stored(&want.key));
        }
        self.wait_for(&want)
    }

    /// Rows `[start, start + len)` of a stored tensor (its first dimension), waiting for their
    /// transfer if they are not in yet. The tensor stays stored until
    /// [`ActivationStore::release`]: a kept one hands back a view of its rows.
    pub fn take_rows(&mut self, layer: usize, name: &str, start: i64, len: i64) -> Result<Tensor> {
        let key = (layer, name.to_string());
        self.taken.insert(layer);
        if let Some(t) = self.kept.get(&key) {
            let meta = Meta::of(t);
            meta.rows((start, len))?;
            return Ok(t.narrow(0, start, len));
        }
        if !self.in_arena.contains_key(&key) && !self.on_nvme.contains(&key) {
            return Err(Self::never_stored(&key));
        }
        self.wait_for(&Want { key, rows: Some((start, len)) })
    }

    /// Frees a tensor that was read by rows (its rows prefetched and not taken are dropped).
    pub fn release(&mut self, layer: usize, name: &str) -> Result<()> {
        let key = (layer, name.to_string());
        if self.kept.remove(&key).is_some() {
            return Ok(());
        }
        // No arena slot may go while a read of it is on its way.
        let pending: Vec<Want> = self.requested.iter().filter(|w| w.key == key).cloned().collect();
        for w in pending {
            drop(self.wait_for(&w)?);
        }
        self.ready.retain(|w, _| w.key != key);
        if let Some(a) = self.in_arena.remove(&key) {
            match self.row_copies.remove(&key) {
                Some(ev) => self.pending_free.push((a.tier, a.slot, ev)),
                None => {
                    if let Some(arena) = self.arena(a.tier) {
                        arena.release(a.slot);
                    }
                }
            }
        } else if self.on_nvme.remove(&key) {
            let Some((tx, _, _)) = &self.io else { return Err(Self::io_gone()) };
            tx.send(Req::Free(key)).map_err(|_| Self::io_gone())?;
        } else {
            return Err(Self::never_stored(&key));
        }
        self.reap()
    }

    /// Waits for a requested tensor or rows (requesting them first if they were not).
    fn wait_for(&mut self, want: &Want) -> Result<Tensor> {
        self.request(want)?;
        let t0 = Instant::now();
        while !self.ready.contains_key(want) {
            let Some((_, rx, _)) = &self.io else { return Err(Self::io_gone()) };
            let (w, r) = rx.recv().map_err(|_| Self::io_gone())?;
            if w.rows.is_none() {
                // An arena slot whose tensor was rebuilt whole is free again.
                if let Some(a) = self.in_arena.remove(&w.key) {
                    if let Some(arena) = self.arena(a.tier) {
                        arena.release(a.slot);
                    }
                }
                self.on_nvme.remove(&w.key);
            }
            self.ready.insert(w, r);
        }
        self.stall += t0.elapsed().as_secs_f64();
        self.requested.remove(want);
        self.reap()?;
        self.ready.remove(want).unwrap_or_else(|| Err(Self::io_gone()))
    }

    /// Entries still held (none after a complete backward).
    pub fn len(&self) -> usize {
        self.kept.len() + self.in_arena.len() + self.on_nvme.len() + self.ready.len()
    }

    /// Whether nothing is held (true after a complete backward).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ActivationStore {
    fn drop(&mut self) {
        // No copy may outlive the memory it reads or writes.
        for p in self.pending_d2h.drain(..) {
            let _ = p.ev.wait();
        }
        for (_, _, ev) in self.pending_free.drain(..) {
            let _ = ev.wait();
        }
        for (_, ev) in self.row_copies.drain() {
            let _ = ev.wait();
        }
        if let Some((tx, rx, handle)) = self.io.take() {
            drop(tx);
            drop(rx);
            let _ = handle.join();
        }
    }
}
