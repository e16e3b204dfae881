//! Memory tiers in RAM: one anonymous mapping per tier, optionally bound to a NUMA node and
//! page-locked for CUDA once at creation, carved into exact-size extents (64-byte granules, no
//! power-of-two rounding, no allocation per tensor). Its byte budget is its capacity.
use crate::error::{OffloadError, Result};
use crate::extents::Extents;

/// Granule of arena extents: a cache line.
const GRANULE: u64 = 64;

/// An extent of an arena: where a tensor's bytes live while it waits for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Byte offset of the slot in the arena's mapping (a multiple of 64).
    pub offset: u64,
    /// Payload bytes (the extent behind it is rounded up to 64).
    pub len: u64,
}

/// A RAM tier: one mapping carved into [`Slot`]s; allocation fails once its capacity is used.
pub struct Arena {
    /// "host" or "numa": names the tier in errors and metrics.
    pub tier: &'static str,
    ptr: *mut u8,
    map_len: usize,
    extents: Extents,
    /// NUMA node the pages are bound to.
    pub node: Option<u32>,
    /// Whether the mapping is page-locked for CUDA (registered in `new`, unregistered on drop).
    pub pinned: bool,
}

// SAFETY: the arena owns its mapping exclusively; moving it moves that ownership. Concurrent
// access to distinct slots is coordinated by the store.
unsafe impl Send for Arena {}

impl Arena {
    /// Maps `capacity` bytes; `node` binds them to a NUMA node, `pin` page-locks them for CUDA
    /// (an error when CUDA is not available).
    pub fn new(tier: &'static str, capacity: u64, node: Option<u32>, pin: bool) -> Result<Arena> {
        let page = 4096u64;
        let map_len = capacity.max(1).div_ceil(page) * page;
        let err = |op: &'static str, source: std::io::Error| OffloadError::Io { path: format!("{tier} tier ({capacity} bytes)").into(), op, source };
        // SAFETY: an anonymous private mapping with no address hint; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(err("mmap", std::io::Error::last_os_error()));
        }
        let mut a = Arena { tier, ptr: ptr.cast(), map_len: map_len as usize, extents: Extents::new(capacity, GRANULE), node, pinned: false };
        if let Some(n) = node {
            // SAFETY: the mapping was just created by this arena, page-aligned, map_len long.
            unsafe { crate::numa::bind(a.ptr, a.map_len, n)? };
        }
        if pin {
            let rt = crate::cuda::runtime().ok_or_else(|| err("pin", std::io::Error::other("CUDA is not available")))?;
            // SAFETY: the mapping lives until Drop, which unregisters it before unmapping.
            unsafe { rt.register(a.ptr, a.map_len)? };
            a.pinned = true;
        }
        Ok(a)
    }

    /// Bytes the arena can hand out: its budget rounded down to 64.
    pub fn capacity(&self) -> u64 {
        self.extents.capacity()
    }

    /// Bytes of slots in use (each rounded up to 64).
    pub fn used(&self) -> u64 {
        self.extents.used()
    }

    /// Most bytes in use at once since creation.
    pub fn peak(&self) -> u64 {
        self.extents.peak()
    }

    /// Bytes not in use (possibly in several extents).
    pub fn free_bytes(&self) -> u64 {
        self.extents.free_bytes()
    }

    /// A slot for `len` bytes, or the tier-full error naming `slice`.
    pub fn alloc(&mut self, slice: &str, len: u64) -> Result<Slot> {
        match self.extents.alloc(len) {
            Some(offset) => Ok(Slot { offset, len }),
            None => Err(OffloadError::Full { tier: self.tier, slice: slice.to_string(), need: self.extents.extent_len(len), free: self.free_bytes(), capacity: self.capacity() }),
        }
    }

    /// Returns a slot's extent to the free list (coalesced with free neighbours).
    pub fn release(&mut self, s: Slot) {
        self.extents.release(s.offset, s.len);
    }

    /// Address of a slot's first byte.
    pub fn ptr(&self, s: Slot) -> *mut u8 {
        debug_assert!(s.offset + s.len <= self.map_len as u64);
        // SAFETY: slots lie inside the mapping (extents never exceed the capacity).
        unsafe { self.ptr.add(s.offset as usize) }
    }

    /// A raw view of the slot for another thread.
    pub fn view(&self, s: Slot) -> SlotView {
        SlotView { ptr: self.ptr(s), len: s.len as usize }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.pinned {
            if let Some(rt) = crate::cuda::runtime() {
                // SAFETY: registered in `new`; the store has waited for every copy.
                let _ = unsafe { rt.unregister(self.ptr) };
            }
        }
        // SAFETY: the mapping was created in `new` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.map_len) };
    }
}

/// The bytes of one slot, handed to the I/O thread, which alone touches them until it reports
/// back (the store does not release the slot before that).
#[derive(Clone, Copy)]
pub struct SlotView {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: see the type's doc: exactly one thread uses the view at a time, inside the arena's life.
unsafe impl Send for SlotView {}

impl SlotView {
    /// Bytes `range` of this view (clamped to it).
    pub fn sub(self, range: std::ops::Range<usize>) -> SlotView {
        let start = range.start.min(self.len);
        let end = range.end.clamp(start, self.len);
        // SAFETY: start ≤ len, so the pointer stays inside (or one past) the viewed bytes.
        SlotView { ptr: unsafe { self.ptr.add(start) }, len: end - start }
    }

    /// # Safety
    /// The slot must still be allocated and its arena alive, with no other thread using it.
    pub unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        // SAFETY: as the caller guarantees.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_bound_pages_land_on_their_node() {
        let node = crate::numa::current_node();
        let mut a = Arena::new("numa", 1 << 20, Some(node), false).unwrap();
        let s = a.alloc("t", 100_000).unwrap();
        // SAFETY: the slot is allocated and only this thread uses it.
        let bytes = unsafe { a.view(s).as_mut_slice() };
        bytes.fill(7);
        assert_eq!(crate::numa::node_of(bytes.as_ptr()), Some(node));
        assert_eq!(a.used(), 100_032);
        a.release(s);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn a_missing_node_and_a_full_arena_are_errors() {
        let e = Arena::new("numa", 1 << 20, Some(1000), false).err().unwrap().to_string();
        assert!(e.contains("numa node 1000") && e.contains("this machine has nodes"), "{e}");
        let mut a = Arena::new("host", 4096, None, false).unwrap();
        a.alloc("a", 4000).unwrap();
        let e = a.alloc("layer3.q", 200).unwrap_err().to_string();
        assert!(e.contains("host tier full") && e.contains("layer3.q"), "{e}");
    }

    #[test]
    fn pinning_without_cuda_is_an_error() {
        if crate::cuda::runtime().is_some() {
            return; // covered by the CUDA tests
        }
        let e = Arena::new("host", 4096, None, true).err().unwrap().to_string();
        assert!(e.contains("CUDA is not available"), "{e}");
    }
}
