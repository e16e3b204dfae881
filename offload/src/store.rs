//! The activation store: between a layer's forward and its backward, each saved tensor is either
//! kept where it is or written to the NVMe tier and dropped, then read back on request.
//! The store knows tensors by (layer, name) only; what to place where is the caller's decision.
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

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

enum Entry {
    Kept(Tensor),
    Nvme { id: SliceId, shape: Vec<i64>, kind: Kind, device: Device },
}

/// Bytes moved and held, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    pub written_bytes: u64,
    pub read_bytes: u64,
    /// Most bytes resident in the NVMe tier at once.
    pub nvme_peak_bytes: u64,
    pub write_seconds: f64,
    pub read_seconds: f64,
}

pub struct ActivationStore {
    nvme: Option<NvmeTier>,
    entries: HashMap<(usize, String), Entry>,
    pub stats: StoreStats,
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel();
    let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, n);
    buf
}

impl ActivationStore {
    /// A store that can only keep tensors (no lower tier configured).
    pub fn resident() -> ActivationStore {
        ActivationStore { nvme: None, entries: HashMap::new(), stats: StoreStats::default() }
    }

    /// A store with an NVMe tier of `capacity` bytes in `dir`.
    pub fn with_nvme(dir: &Path, capacity: u64, rank: usize, io_uring: bool) -> Result<ActivationStore> {
        Ok(ActivationStore { nvme: Some(NvmeTier::create(dir, capacity, rank, io_uring)?), entries: HashMap::new(), stats: StoreStats::default() })
    }

    pub fn nvme(&self) -> Option<&NvmeTier> {
        self.nvme.as_ref()
    }

    /// Hands a saved tensor to the store. With `Tier::Nvme` its bytes are written now and the
    /// store holds no reference to the tensor afterwards.
    pub fn put(&mut self, layer: usize, name: &str, t: Tensor, tier: Tier) -> Result<()> {
        let entry = match (tier, self.nvme.as_mut()) {
            (Tier::Keep, _) | (Tier::Nvme, None) => Entry::Kept(t),
            (Tier::Nvme, Some(nvme)) => {
                let t0 = std::time::Instant::now();
                let bytes = tensor_bytes(&t);
                let id = nvme.write(&format!("layer{layer}.{name}"), &bytes)?;
                self.stats.written_bytes += bytes.len() as u64;
                self.stats.nvme_peak_bytes = self.stats.nvme_peak_bytes.max(nvme.used());
                self.stats.write_seconds += t0.elapsed().as_secs_f64();
                Entry::Nvme { id, shape: t.size(), kind: t.kind(), device: t.device() }
            }
        };
        self.entries.insert((layer, name.to_string()), entry);
        Ok(())
    }

    /// Takes a saved tensor back (reading and verifying it if it was written out).
    pub fn take(&mut self, layer: usize, name: &str) -> Result<Tensor> {
        let entry = self.entries.remove(&(layer, name.to_string())).ok_or_else(|| OffloadError::Io {
            path: "activation store".into(),
            op: "take",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("layer {layer} tensor `{name}` was never stored")),
        })?;
        match entry {
            Entry::Kept(t) => Ok(t),
            Entry::Nvme { id, shape, kind, device } => {
                let nvme = self.nvme.as_mut().ok_or(OffloadError::UnknownSlice(id))?;
                let t0 = std::time::Instant::now();
                let bytes = nvme.read(id)?;
                nvme.free(id)?;
                self.stats.read_bytes += bytes.len() as u64;
                self.stats.read_seconds += t0.elapsed().as_secs_f64();
                let t = Tensor::f_from_data_size(&bytes, &shape, kind).map_err(|e| OffloadError::Io {
                    path: "activation store".into(),
                    op: "rebuild tensor",
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(t.to_device(device))
            }
        }
    }

    /// Entries still held (should be none after a complete backward).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
