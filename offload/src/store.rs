//! The activation store: between a layer's forward and its backward, each saved tensor is either
//! kept where it is or handed to an I/O thread that writes it to the NVMe tier and then drops it,
//! so its memory is released only once its bytes are on disk. Backward asks for tensors back;
//! `prefetch` lets the I/O thread read the next layers while the current one computes.
//! The store knows tensors by (layer, name) only; what to place where is the caller's decision.
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::aligned::AlignedBuf;
use crate::error::{OffloadError, Result};
use crate::nvme::{NvmeTier, SliceId};

/// Where a saved tensor waits for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Stays where it was computed.
    Keep,
    /// Written to the NVMe tier; its memory is released until backward reads it back.
    Nvme,
}

/// Bytes moved and time spent, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    pub written_bytes: u64,
    pub read_bytes: u64,
    /// Most bytes resident in the NVMe tier at once.
    pub nvme_peak_bytes: u64,
    /// Time the I/O thread spent writing / reading (overlapped with compute where possible).
    pub write_seconds: f64,
    pub read_seconds: f64,
    /// Time the training thread waited for the store (backpressure on put, reads on take).
    pub stall_seconds: f64,
}

type Key = (usize, String);

enum Req {
    Write(Key, Tensor),
    Read(Key),
}

struct Meta {
    id: SliceId,
    shape: Vec<i64>,
    kind: Kind,
    device: Device,
}

/// Copies a tensor's bytes into `buf` (grown when too small); returns their count.
fn tensor_bytes_into(t: &Tensor, buf: &mut AlignedBuf) -> usize {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel();
    let len = n * t.kind().elt_size_in_bytes();
    if buf.len() < len {
        *buf = AlignedBuf::new(len);
    }
    t.copy_data_u8(&mut buf.as_mut_slice()[..len], n);
    len
}

/// Bytes handed to the I/O thread and not yet written: `put` waits while this exceeds the limit,
/// so memory held by tensors on their way to disk stays bounded.
#[derive(Default)]
struct InFlight {
    bytes: Mutex<u64>,
    written: Condvar,
}

/// The I/O thread: owns the tier, serves requests in order (so a read always follows its write).
fn worker(mut nvme: NvmeTier, rx: Receiver<Req>, done: std::sync::mpsc::Sender<(Key, Result<Tensor>)>, stats: Arc<Mutex<StoreStats>>, inflight: Arc<InFlight>) {
    let mut meta: HashMap<Key, Meta> = HashMap::new();
    let mut failed: Option<String> = None;
    // One aligned buffer reused for every transfer: a tensor is copied once into it and written
    // from it with O_DIRECT, and read into it and copied once into a new tensor.
    let mut buf = AlignedBuf::new(1);
    for req in rx {
        match req {
            Req::Write(key, t) => {
                if failed.is_some() {
                    let mut b = inflight.bytes.lock().unwrap_or_else(|e| e.into_inner());
                    *b = b.saturating_sub((t.numel() * t.kind().elt_size_in_bytes()) as u64);
                    inflight.written.notify_all();
                    continue;
                }
                let t0 = Instant::now();
                let len = tensor_bytes_into(&t, &mut buf);
                let (shape, kind, device) = (t.size(), t.kind(), t.device());
                // The source tensor is released only after its bytes were copied out.
                drop(t);
                {
                    let mut b = inflight.bytes.lock().unwrap_or_else(|e| e.into_inner());
                    *b = b.saturating_sub(len as u64);
                    inflight.written.notify_all();
                }
                match nvme.write_aligned(&format!("layer{}.{}", key.0, key.1), &mut buf, len) {
                    Ok(id) => {
                        meta.insert(key, Meta { id, shape, kind, device });
                        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.written_bytes += len as u64;
                        s.nvme_peak_bytes = s.nvme_peak_bytes.max(nvme.used());
                        s.write_seconds += t0.elapsed().as_secs_f64();
                    }
                    Err(e) => failed = Some(e.to_string()),
                }
            }
            Req::Read(key) => {
                let t0 = Instant::now();
                let r = match (&failed, meta.remove(&key)) {
                    (Some(msg), _) => Err(OffloadError::Io { path: "nvme tier".into(), op: "write", source: std::io::Error::other(msg.clone()) }),
                    (None, None) => Err(OffloadError::Io {
                        path: "activation store".into(),
                        op: "read",
                        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("layer {} tensor `{}` was never stored", key.0, key.1)),
                    }),
                    (None, Some(m)) => nvme.read_into(m.id, &mut buf).and_then(|len| {
                        nvme.free(m.id)?;
                        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.read_bytes += len as u64;
                        s.read_seconds += t0.elapsed().as_secs_f64();
                        Tensor::f_from_data_size(&buf.as_slice()[..len], &m.shape, m.kind)
                            .map(|t| t.to_device(m.device))
                            .map_err(|e| OffloadError::Io { path: "activation store".into(), op: "rebuild tensor", source: std::io::Error::other(e.to_string()) })
                    }),
                };
                if done.send((key, r)).is_err() {
                    return;
                }
            }
        }
    }
}

pub struct ActivationStore {
    kept: HashMap<Key, Tensor>,
    /// Keys written to the NVMe tier and not yet taken.
    offloaded: HashSet<Key>,
    /// Keys whose read was requested.
    requested: HashSet<Key>,
    ready: HashMap<Key, Result<Tensor>>,
    io: Option<(SyncSender<Req>, Receiver<(Key, Result<Tensor>)>, JoinHandle<()>)>,
    shared: Arc<Mutex<StoreStats>>,
    stall: f64,
    nvme_capacity: Option<u64>,
    inflight: Arc<InFlight>,
    max_inflight: u64,
}

impl ActivationStore {
    /// A store that can only keep tensors (no lower tier configured).
    pub fn resident() -> ActivationStore {
        ActivationStore {
            kept: HashMap::new(),
            offloaded: HashSet::new(),
            requested: HashSet::new(),
            ready: HashMap::new(),
            io: None,
            shared: Arc::new(Mutex::new(StoreStats::default())),
            stall: 0.0,
            nvme_capacity: None,
            inflight: Arc::new(InFlight::default()),
            max_inflight: u64::MAX,
        }
    }

    /// A store with an NVMe tier of `capacity` bytes in `dir`, served by its own I/O thread.
    /// While `max_inflight` bytes wait to be written, `put` blocks (bounding the memory held by
    /// tensors not yet on disk; one tensor larger than the bound still goes through alone).
    pub fn with_nvme(dir: &Path, capacity: u64, rank: usize, io_uring: bool, max_inflight: u64) -> Result<ActivationStore> {
        let nvme = NvmeTier::create(dir, capacity, rank, io_uring)?;
        let cap = nvme.capacity();
        let mut s = Self::resident();
        let (tx, rx) = sync_channel::<Req>(16);
        let (dtx, drx) = channel();
        let stats = s.shared.clone();
        let inflight = s.inflight.clone();
        s.max_inflight = max_inflight;
        let handle = std::thread::Builder::new()
            .name("strata-nvme-io".into())
            .spawn(move || worker(nvme, rx, dtx, stats, inflight))
            .map_err(|e| OffloadError::Io { path: dir.to_path_buf(), op: "spawn I/O thread", source: e })?;
        s.io = Some((tx, drx, handle));
        s.nvme_capacity = Some(cap);
        Ok(s)
    }

    /// Capacity of the NVMe tier, when there is one.
    pub fn nvme_capacity(&self) -> Option<u64> {
        self.nvme_capacity
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = *self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.stall_seconds = self.stall;
        s
    }

    fn io_gone() -> OffloadError {
        OffloadError::Io { path: "nvme tier".into(), op: "I/O thread", source: std::io::Error::other("the I/O thread stopped") }
    }

    /// Hands a saved tensor to the store. With `Tier::Nvme` the tensor goes to the I/O thread,
    /// which releases it once written.
    pub fn put(&mut self, layer: usize, name: &str, t: Tensor, tier: Tier) -> Result<()> {
        let key = (layer, name.to_string());
        match (&self.io, tier) {
            (Some((tx, _, _)), Tier::Nvme) => {
                let t0 = Instant::now();
                let n = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
                {
                    let mut b = self.inflight.bytes.lock().unwrap_or_else(|e| e.into_inner());
                    while *b > 0 && *b + n > self.max_inflight {
                        b = self.inflight.written.wait(b).unwrap_or_else(|e| e.into_inner());
                    }
                    *b += n;
                }
                tx.send(Req::Write(key.clone(), t)).map_err(|_| Self::io_gone())?;
                self.stall += t0.elapsed().as_secs_f64();
                self.offloaded.insert(key);
            }
            _ => {
                self.kept.insert(key, t);
            }
        }
        Ok(())
    }

    /// Asks the I/O thread to read these tensors back now, ahead of `take`.
    pub fn prefetch(&mut self, layer: usize, names: &[String]) -> Result<()> {
        let Some((tx, _, _)) = &self.io else { return Ok(()) };
        for n in names {
            let key = (layer, n.clone());
            if self.offloaded.contains(&key) && self.requested.insert(key.clone()) {
                tx.send(Req::Read(key)).map_err(|_| Self::io_gone())?;
            }
        }
        Ok(())
    }

    /// Takes a saved tensor back, waiting for its read if it is not in yet.
    pub fn take(&mut self, layer: usize, name: &str) -> Result<Tensor> {
        let key = (layer, name.to_string());
        if let Some(t) = self.kept.remove(&key) {
            return Ok(t);
        }
        if !self.offloaded.remove(&key) {
            return Err(OffloadError::Io {
                path: "activation store".into(),
                op: "take",
                source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("layer {layer} tensor `{name}` was never stored")),
            });
        }
        let Some((tx, rx, _)) = &self.io else { return Err(Self::io_gone()) };
        if self.requested.insert(key.clone()) {
            tx.send(Req::Read(key.clone())).map_err(|_| Self::io_gone())?;
        }
        let t0 = Instant::now();
        while !self.ready.contains_key(&key) {
            let (k, r) = rx.recv().map_err(|_| Self::io_gone())?;
            self.ready.insert(k, r);
        }
        self.stall += t0.elapsed().as_secs_f64();
        self.requested.remove(&key);
        self.ready.remove(&key).unwrap_or_else(|| Err(Self::io_gone()))
    }

    /// Entries still held (none after a complete backward).
    pub fn len(&self) -> usize {
        self.kept.len() + self.offloaded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ActivationStore {
    fn drop(&mut self) {
        if let Some((tx, rx, handle)) = self.io.take() {
            drop(tx);
            drop(rx);
            let _ = handle.join();
        }
    }
}
