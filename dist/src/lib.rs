//! torch.distributed's engine from Rust: a c10d `TCPStore` (torchrun's rendezvous), a Gloo
//! process group and its collectives on tch tensors, through a small C++ shim compiled against
//! the venv's libtorch (`csrc/c10d_shim.cpp`). Errors are values: every shim call returns a
//! message instead of throwing, and a collective waits with a timeout.
pub mod cuda_memory;
use std::ffi::{c_char, CStr, CString};
use std::time::Duration;

use tch::Tensor;

#[repr(C)]
struct RawStore {
    _private: [u8; 0],
}
#[repr(C)]
struct RawPg {
    _private: [u8; 0],
}
#[repr(C)]
struct RawWork {
    _private: [u8; 0],
}

extern "C" {
    fn strata_c10d_free_error(e: *mut c_char);
    fn strata_store_tcp(host: *const c_char, port: u16, is_server: bool, timeout_ms: i64, prefix: *const c_char, out: *mut *mut RawStore) -> *mut c_char;
    fn strata_store_free(s: *mut RawStore);
    fn strata_store_set(s: *mut RawStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    fn strata_store_get(s: *mut RawStore, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> *mut c_char;
    fn strata_store_add(s: *mut RawStore, key: *const c_char, delta: i64, value: *mut i64) -> *mut c_char;
    fn strata_pg_gloo(s: *mut RawStore, rank: i32, size: i32, timeout_ms: i64, out: *mut *mut RawPg) -> *mut c_char;
    fn strata_pg_free(pg: *mut RawPg);
    #[cfg(strata_nccl)]
    fn strata_pg_nccl(s: *mut RawStore, rank: i32, size: i32, timeout_ms: i64, device: i32, out: *mut *mut RawPg) -> *mut c_char;
    fn strata_all_reduce(pg: *mut RawPg, t: *const torch_sys::C_tensor, op: i32, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_broadcast(pg: *mut RawPg, t: *const torch_sys::C_tensor, root: i32, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_all_gather(pg: *mut RawPg, output: *const torch_sys::C_tensor, input: *const torch_sys::C_tensor, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_reduce_scatter(pg: *mut RawPg, output: *const torch_sys::C_tensor, input: *const torch_sys::C_tensor, op: i32, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_all_to_all(pg: *mut RawPg, output: *const torch_sys::C_tensor, input: *const torch_sys::C_tensor, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_barrier(pg: *mut RawPg, out: *mut *mut RawWork) -> *mut c_char;
    fn strata_work_wait(w: *mut RawWork, timeout_ms: i64, done: *mut bool) -> *mut c_char;
    fn strata_work_free(w: *mut RawWork);
}

/// What went wrong in c10d (its message), or a collective that did not finish in time.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{op}: {msg}")]
    C10d { op: &'static str, msg: String },
    #[error("{op} did not complete within {secs:.0} s (a rank stopped or is stuck?)")]
    Timeout { op: &'static str, secs: f64 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// Turns a shim return value into a Result (freeing the message).
fn check(op: &'static str, e: *mut c_char) -> Result<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim, freed once here.
    let msg = unsafe {
        let m = CStr::from_ptr(e).to_string_lossy().into_owned();
        strata_c10d_free_error(e);
        m
    };
    Err(DistError::C10d { op, msg: msg.lines().take(3).collect::<Vec<_>>().join(" ") })
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Invalid(format!("`{s}` contains a NUL byte")))
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// A c10d key-value store: torchrun's rendezvous and the process group's bootstrap.
pub struct Store {
    raw: *mut RawStore,
}

// SAFETY: c10d's TCPStore serializes its client's requests internally; the handle is freed once.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A TCPStore at `host:port`: hosting it (`server`, rank 0 without torchrun's agent) or as a
    /// client (retrying until `timeout`), keys under `prefix` when not empty.
    pub fn tcp(host: &str, port: u16, server: bool, timeout: Duration, prefix: &str) -> Result<Store> {
        let (h, p) = (cstr(host)?, cstr(prefix)?);
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings and out-pointer for the duration of the call.
        check("TCPStore", unsafe { strata_store_tcp(h.as_ptr(), port, server, millis(timeout), p.as_ptr(), &mut raw) })?;
        Ok(Store { raw })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstr(key)?;
        // SAFETY: live handle, C string, and a slice valid for the call.
        check("store set", unsafe { strata_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value of `key`, waiting for it to be set (up to the store's timeout).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstr(key)?;
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: live handle and valid out-pointers.
        check("store get", unsafe { strata_store_get(self.raw, k.as_ptr(), &mut data, &mut len) })?;
        // SAFETY: on success the shim malloc'd `len` bytes at `data`; copied, then freed once.
        let v = unsafe {
            let v = std::slice::from_raw_parts(data, len).to_vec();
            strata_c10d_free_error(data.cast());
            v
        };
        Ok(v)
    }

    /// Adds `delta` to the counter `key`; its new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstr(key)?;
        let mut v = 0;
        // SAFETY: live handle and valid out-pointer.
        check("store add", unsafe { strata_store_add(self.raw, k.as_ptr(), delta, &mut v) })?;
        Ok(v)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from strata_store_tcp and is freed once.
        unsafe { strata_store_free(self.raw) }
    }
}

/// How a collective combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Max = 1,
    Min = 2,
    Product = 3,
}

/// A collective in flight (Gloo runs it on its own threads).
pub struct Work {
    raw: *mut RawWork,
    op: &'static str,
    timeout: Duration,
    /// The tensors the collective reads and writes, held until it completed.
    _tensors: Vec<Tensor>,
}

// SAFETY: c10d's Work is waited on from any thread; the handle is freed once.
unsafe impl Send for Work {}

impl Work {
    /// Waits for the collective (an error when it failed or the group's timeout passed).
    pub fn wait(self) -> Result<()> {
        let mut done = false;
        // SAFETY: live handle and valid out-pointer.
        check(self.op, unsafe { strata_work_wait(self.raw, millis(self.timeout), &mut done) })?;
        if !done {
            return Err(DistError::Timeout { op: self.op, secs: self.timeout.as_secs_f64() });
        }
        Ok(())
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: the handle came from the shim and is freed once; c10d keeps what a collective
        // still running needs alive through its own references.
        unsafe { strata_work_free(self.raw) }
    }
}

/// A process group over `size` ranks: Gloo (CPU tensors, and CUDA ones through host memory) or
/// NCCL (CUDA tensors).
pub struct ProcessGroup {
    raw: *mut RawPg,
    rank: usize,
    size: usize,
    timeout: Duration,
    // The store outlives the group built on it.
    _store: std::sync::Arc<Store>,
}

// SAFETY: c10d process groups guard their own state (Gloo's work queue and NCCL's communicator
// map are behind mutexes; torch's DDP issues collectives from its reducer thread while the main
// thread issues others), and their handles are freed once. Ranks match collectives by the order
// they are issued in, which a caller sharing a group between threads must keep; strata issues
// them from the training thread only.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// A Gloo group of `size` ranks meeting through `store`; collectives fail after `timeout`.
    pub fn gloo(store: std::sync::Arc<Store>, rank: usize, size: usize, timeout: Duration) -> Result<ProcessGroup> {
        if rank >= size {
            return Err(DistError::Invalid(format!("rank {rank} of a group of {size}")));
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store handle and valid out-pointer.
        check("ProcessGroupGloo", unsafe { strata_pg_gloo(store.raw, rank as i32, size as i32, millis(timeout), &mut raw) })?;
        Ok(ProcessGroup { raw, rank, size, timeout, _store: store })
    }

    /// An NCCL group of `size` ranks, this one on CUDA device `device`; collectives take CUDA
    /// tensors of that device. An error where strata was built without NCCL (no CUDA wheel).
    pub fn nccl(store: std::sync::Arc<Store>, rank: usize, size: usize, timeout: Duration, device: usize) -> Result<ProcessGroup> {
        if rank >= size {
            return Err(DistError::Invalid(format!("rank {rank} of a group of {size}")));
        }
        #[cfg(strata_nccl)]
        {
            let mut raw = std::ptr::null_mut();
            // SAFETY: live store handle and valid out-pointer.
            check("ProcessGroupNCCL", unsafe { strata_pg_nccl(store.raw, rank as i32, size as i32, millis(timeout), device as i32, &mut raw) })?;
            Ok(ProcessGroup { raw, rank, size, timeout, _store: store })
        }
        #[cfg(not(strata_nccl))]
        {
            let _ = (store, timeout, device);
            Err(DistError::Invalid("this build of strata has no NCCL (built without the CUDA wheel's NCCL headers): use dist.backend = \"gloo\"".into()))
        }
    }

    /// Whether NCCL was built in.
    pub fn has_nccl() -> bool {
        cfg!(strata_nccl)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn started(&self, op: &'static str, tensors: Vec<Tensor>, f: impl FnOnce(*mut *mut RawWork) -> *mut c_char) -> Result<Work> {
        let mut raw = std::ptr::null_mut();
        check(op, f(&mut raw))?;
        Ok(Work { raw, op, timeout: self.timeout, _tensors: tensors })
    }

    /// Starts reducing `t` in place across the ranks.
    pub fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        // SAFETY: the tensor handle is valid for the call; Work holds a reference until done.
        self.started("all_reduce", vec![t.shallow_clone()], |out| unsafe { strata_all_reduce(self.raw, t.as_ptr(), op as i32, out) })
    }

    /// Reduces `t` in place across the ranks.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_async(t, op)?.wait()
    }

    /// Overwrites `t` with rank `root`'s.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        // SAFETY: as in all_reduce_async.
        self.started("broadcast", vec![t.shallow_clone()], |out| unsafe { strata_broadcast(self.raw, t.as_ptr(), root as i32, out) })?.wait()
    }

    /// Every rank's `input` one after another along dimension 0, in rank order.
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let mut shape = input.size();
        shape[0] *= self.size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: as in all_reduce_async.
        self.started("all_gather", vec![output.shallow_clone(), input.shallow_clone()], |out| unsafe { strata_all_gather(self.raw, output.as_ptr(), input.as_ptr(), out) })?.wait()?;
        Ok(output)
    }

    /// The reduction over ranks of part `rank` of `input` (`size` equal parts along dimension 0).
    pub fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut shape = input.size();
        if shape.is_empty() || shape[0] % self.size as i64 != 0 {
            return Err(DistError::Invalid(format!("reduce_scatter of shape {shape:?} over {} ranks", self.size)));
        }
        shape[0] /= self.size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: as in all_reduce_async.
        self.started("reduce_scatter", vec![output.shallow_clone(), input.shallow_clone()], |out| unsafe {
            strata_reduce_scatter(self.raw, output.as_ptr(), input.as_ptr(), op as i32, out)
        })?
        .wait()?;
        Ok(output)
    }

    /// Part j of `input` (`size` equal parts along dimension 0) goes to rank j; part j of the
    /// result came from rank j.
    pub fn all_to_all(&self, input: &Tensor) -> Result<Tensor> {
        let shape = input.size();
        if shape.is_empty() || shape[0] % self.size as i64 != 0 {
            return Err(DistError::Invalid(format!("all_to_all of shape {shape:?} over {} ranks", self.size)));
        }
        let output = input.empty_like();
        // SAFETY: as in all_reduce_async.
        self.started("all_to_all", vec![output.shallow_clone(), input.shallow_clone()], |out| unsafe { strata_all_to_all(self.raw, output.as_ptr(), input.as_ptr(), out) })?.wait()?;
        Ok(output)
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live group handle and a valid out-pointer.
        self.started("barrier", Vec::new(), |out| unsafe { strata_barrier(self.raw, out) })?.wait()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from strata_pg_gloo and is freed once.
        unsafe { strata_pg_free(self.raw) }
    }
}
