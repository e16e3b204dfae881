//! First-fit allocation of exact-size extents in a linear space (a file or a memory arena),
//! rounded only to the space's granularity, with free neighbours coalesced. Shared by the NVMe
//! tier (4 KiB pages, for O_DIRECT) and the memory arenas (cache lines).
use std::collections::BTreeMap;

/// The allocator of one linear space: its free extents, and the bytes in use and their peak.
pub struct Extents {
    capacity: u64,
    granule: u64,
    /// Free extents: offset → length, multiples of `granule`, never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    used: u64,
    peak: u64,
}

impl Extents {
    /// A space of `capacity` bytes (rounded down to `granule`, a power of two).
    pub fn new(capacity: u64, granule: u64) -> Extents {
        debug_assert!(granule.is_power_of_two());
        let capacity = capacity / granule * granule;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Extents { capacity, granule, free, used: 0, peak: 0 }
    }

    /// Bytes of the space (the requested capacity rounded down to the granule).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of extents in use (rounded lengths).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Most bytes in use at once since creation.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// `len` rounded up to the granule (at least one granule).
    pub fn extent_len(&self, len: u64) -> u64 {
        len.max(1).div_ceil(self.granule) * self.granule
    }

    /// Offset of a new extent for `len` bytes, or None when no free extent is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let need = self.extent_len(len);
        let (off, l) = self.free.iter().find(|(_, &l)| l >= need).map(|(&o, &l)| (o, l))?;
        self.free.remove(&off);
        if l > need {
            self.free.insert(off + need, l - need);
        }
        self.used += need;
        self.peak = self.peak.max(self.used);
        Some(off)
    }

    /// Returns the extent at `off` of `len` payload bytes (as passed to `alloc`).
    pub fn release(&mut self, off: u64, len: u64) {
        let mut off = off;
        let mut len = self.extent_len(len);
        self.used -= len;
        if let Some((&po, &pl)) = self.free.range(..off).next_back() {
            if po + pl == off {
                self.free.remove(&po);
                off = po;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nl;
        }
        self.free.insert(off, len);
    }

    /// Free bytes (possibly in several extents).
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used
    }
}

#[cfg(test)]
mod tests {
    use super::Extents;

    #[test]
    fn exact_sizes_reuse_and_coalesce() {
        let mut e = Extents::new(1000, 8);
        assert_eq!(e.capacity(), 1000);
        let a = e.alloc(10).unwrap(); // 16
        let b = e.alloc(100).unwrap(); // 104
        let c = e.alloc(8).unwrap();
        assert_eq!((a, b, c), (0, 16, 120));
        assert_eq!(e.used(), 128);
        e.release(b, 100);
        // The freed extent is reused by a request of the same size, not a power of two.
        assert_eq!(e.alloc(97), Some(16));
        e.release(16, 97);
        e.release(a, 10);
        e.release(c, 8);
        assert_eq!(e.used(), 0);
        assert_eq!(e.peak(), 128);
        // Everything coalesced back into one extent.
        assert_eq!(e.alloc(1000), Some(0));
        assert_eq!(e.alloc(1), None);
    }
}
