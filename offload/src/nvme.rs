//! The NVMe tier: one preallocated file per rank, opened with O_DIRECT and unlinked at once (a
//! crash leaves nothing behind), carved into slices by a first-fit allocator over page-aligned
//! extents. Every slice carries a crc32c per `chunk` bytes, checked when it is read back (so a
//! range of a slice can be read and verified without the rest). I/O goes through
//! io_uring (queue depth `depth`, `chunk`-sized requests); where io_uring is unavailable, plain
//! pread/pwrite from the same thread.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::aligned::{round_up, AlignedBuf, ALIGN};
use crate::extents::Extents;
use crate::error::{OffloadError, Result};

/// Handle of a slice stored in the tier.
pub type SliceId = u64;

struct Slice {
    name: String,
    offset: u64,
    /// Payload bytes (the extent is rounded up to a page).
    len: u64,
    /// crc32c of each `chunk` bytes of the payload (the last of what remains).
    crcs: Vec<u32>,
}

/// How the NVMe tier issues its reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring: up to 32 requests of 1 MiB in flight.
    IoUring,
    /// pread/pwrite, when io_uring cannot be set up (old kernels, seccomp) or is turned off.
    Blocking,
}

/// The NVMe tier: an unlinked, preallocated file carved into checksummed slices.
pub struct NvmeTier {
    file: File,
    path: PathBuf,
    capacity: u64,
    extents: Extents,
    slices: HashMap<SliceId, Slice>,
    next_id: SliceId,
    ring: Option<IoUring>,
    /// Bytes per I/O request.
    chunk: usize,
    /// Whether the file is open with O_DIRECT (false on file systems that refuse it, e.g. tmpfs).
    pub direct: bool,
    staging: AlignedBuf,
}

impl NvmeTier {
    /// Creates and preallocates `capacity` bytes in `dir` for `rank`. `io_uring = false` forces
    /// the blocking engine.
    pub fn create(dir: &Path, capacity: u64, rank: usize, io_uring: bool) -> Result<NvmeTier> {
        let capacity = round_up(capacity as usize) as u64;
        let path = dir.join(format!("strata-offload-{}-rank{rank}.bin", std::process::id()));
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| OffloadError::Io { path, op, source }
        };
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create_new(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false).map_err(io("open"))?, false),
            Err(e) => return Err(io("open")(e)),
        };
        // Nothing but this process's descriptor refers to the file from here on.
        std::fs::remove_file(&path).map_err(io("unlink"))?;
        // SAFETY: fd is a valid open descriptor owned by `file` for the duration of the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, capacity as libc::off_t) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => {
                    return Err(OffloadError::NoSpace { path, bytes: capacity, source: e })
                }
                // File systems without fallocate: reserve lazily (writes may then hit ENOSPC,
                // which is reported per slice).
                Some(libc::EOPNOTSUPP) => file.set_len(capacity).map_err(io("truncate"))?,
                _ => return Err(io("fallocate")(e)),
            }
        }
        let ring = if io_uring { IoUring::new(32).ok() } else { None };
        Ok(NvmeTier {
            file,
            path,
            capacity,
            extents: Extents::new(capacity, ALIGN as u64),
            slices: HashMap::new(),
            next_id: 1,
            ring,
            chunk: 1 << 20,
            direct,
            staging: AlignedBuf::new(1),
        })
    }

    /// The engine in use: blocking when io_uring could not be set up or was turned off.
    pub fn engine(&self) -> Engine {
        if self.ring.is_some() {
            Engine::IoUring
        } else {
            Engine::Blocking
        }
    }

    /// Bytes of the file: the requested capacity rounded up to a page.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of extents in use.
    pub fn used(&self) -> u64 {
        self.extents.used()
    }

    fn alloc(&mut self, name: &str, len: u64) -> Result<u64> {
        self.extents.alloc(len).ok_or_else(|| OffloadError::Full {
            tier: "nvme",
            slice: name.to_string(),
            need: self.extents.extent_len(len),
            free: self.extents.free_bytes(),
            capacity: self.capacity,
        })
    }

    fn release(&mut self, off: u64, len: u64) {
        self.extents.release(off, len);
    }

    /// Stores `data` as a new slice named `name` (the name appears in errors). Copies `data`
    /// into an aligned staging buffer first; [`NvmeTier::write_aligned`] avoids that copy.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<SliceId> {
        let ext = round_up(data.len().max(1));
        let mut staging = std::mem::replace(&mut self.staging, AlignedBuf::new(1));
        if staging.len() < ext {
            staging = AlignedBuf::new(ext);
        }
        staging.as_mut_slice()[..data.len()].copy_from_slice(data);
        let r = self.write_aligned(name, &mut staging, data.len());
        self.staging = staging;
        r
    }

    /// Stores the first `len` bytes of `buf` as a new slice, straight from the buffer (its bytes
    /// past `len` up to the page boundary are zeroed).
    pub fn write_aligned(&mut self, name: &str, buf: &mut AlignedBuf, len: usize) -> Result<SliceId> {
        let ext = round_up(len.max(1));
        if ext > buf.len() {
            return Err(OffloadError::Io {
                path: self.path.clone(),
                op: "write",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("buffer of {} bytes holds no {len}-byte slice `{name}`", buf.len())),
            });
        }
        let off = self.alloc(name, len as u64)?;
        buf.as_mut_slice()[len..ext].fill(0);
        let crcs = buf.as_slice()[..len].chunks(self.chunk).map(crc32c::crc32c).collect();
        if let Err(e) = self.io(true, off, buf.as_mut_slice().as_mut_ptr(), ext) {
            self.release(off, len as u64);
            return Err(e);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slices.insert(id, Slice { name: name.to_string(), offset: off, len: len as u64, crcs });
        Ok(id)
    }

    /// Payload length of a stored slice.
    pub fn slice_len(&self, id: SliceId) -> Result<usize> {
        Ok(self.slices.get(&id).ok_or(OffloadError::UnknownSlice(id))?.len as usize)
    }

    /// Reads a slice back, verifying its checksum.
    pub fn read(&mut self, id: SliceId) -> Result<Vec<u8>> {
        let mut staging = std::mem::replace(&mut self.staging, AlignedBuf::new(1));
        let r = self.read_into(id, &mut staging).map(|n| staging.as_slice()[..n].to_vec());
        self.staging = staging;
        r
    }

    /// Reads a slice into `buf` (grown when too small), verifying its checksums; returns its length.
    pub fn read_into(&mut self, id: SliceId, buf: &mut AlignedBuf) -> Result<usize> {
        let len = self.slice_len(id)?;
        if len == 0 {
            // An empty slice has nothing to read or verify.
            return Ok(0);
        }
        // A range from byte 0 starts at byte 0 of the buffer.
        self.read_range_into(id, 0, len, buf)?;
        Ok(len)
    }

    /// Reads bytes `[start, start + len)` of a slice: the whole checksummed chunks that cover
    /// them go into `buf` (grown when too small) and are verified; returns where the asked bytes
    /// begin in `buf` and how many bytes were read from the file.
    pub fn read_range_into(&mut self, id: SliceId, start: usize, len: usize, buf: &mut AlignedBuf) -> Result<(usize, usize)> {
        let chunk = self.chunk;
        let (off, total, name) = {
            let s = self.slices.get(&id).ok_or(OffloadError::UnknownSlice(id))?;
            (s.offset, s.len as usize, s.name.clone())
        };
        if start + len > total {
            return Err(OffloadError::Io {
                path: self.path.clone(),
                op: "read",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bytes [{start}, {}) of the {total}-byte slice `{name}`", start + len)),
            });
        }
        if len == 0 {
            return Ok((0, 0));
        }
        let (first, last) = (start / chunk, (start + len).div_ceil(chunk));
        let (from, to) = (first * chunk, (last * chunk).min(total));
        let ext = round_up((to - from).max(1));
        if buf.len() < ext {
            *buf = AlignedBuf::new(ext);
        }
        self.io(false, off + from as u64, buf.as_mut_slice().as_mut_ptr(), ext)?;
        let s = self.slices.get(&id).ok_or(OffloadError::UnknownSlice(id))?;
        for (i, bytes) in buf.as_slice()[..to - from].chunks(chunk).enumerate() {
            let (expected, found) = (s.crcs[first + i], crc32c::crc32c(bytes));
            if found != expected {
                let at = (from + i * chunk) as u64;
                return Err(OffloadError::Checksum { path: self.path.clone(), slice: name, offset: off + at, len: bytes.len() as u64, expected, found });
            }
        }
        Ok((start - from, ext))
    }

    /// Waits until written data is on the device (fsync).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|source| OffloadError::Io { path: self.path.clone(), op: "fsync", source })
    }

    /// Returns a slice's extent to the free list.
    pub fn free(&mut self, id: SliceId) -> Result<()> {
        let s = self.slices.remove(&id).ok_or(OffloadError::UnknownSlice(id))?;
        self.release(s.offset, s.len);
        Ok(())
    }

    /// Test hook: flips one byte of a stored slice on disk (simulating media corruption).
    #[doc(hidden)]
    pub fn corrupt_byte_for_test(&mut self, id: SliceId, at: u64) -> Result<()> {
        let off = self.slices.get(&id).ok_or(OffloadError::UnknownSlice(id))?.offset;
        let page = off + at / 4096 * 4096;
        let mut buf = AlignedBuf::new(4096);
        let fd = self.file.as_raw_fd();
        let io = |op| {
            let path = self.path.clone();
            move |source| OffloadError::Io { path, op, source }
        };
        // SAFETY: buf is a live 4096-byte aligned buffer; fd is open for the life of self.
        let n = unsafe { libc::pread(fd, buf.as_mut_slice().as_mut_ptr().cast(), 4096, page as libc::off_t) };
        if n != 4096 {
            return Err(io("pread")(std::io::Error::last_os_error()));
        }
        buf.as_mut_slice()[(at % 4096) as usize] ^= 0xff;
        // SAFETY: as above.
        let n = unsafe { libc::pwrite(fd, buf.as_slice().as_ptr().cast(), 4096, page as libc::off_t) };
        if n != 4096 {
            return Err(io("pwrite")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Moves `len` bytes (a multiple of the page size) between `base` and the file.
    ///
    /// `base` must point into a live [`AlignedBuf`] of at least `len` bytes that nothing else
    /// touches during the call (the callers pass a buffer they hold by `&mut`).
    fn io(&mut self, write: bool, off: u64, base: *mut u8, len: usize) -> Result<()> {
        let op = if write { "write" } else { "read" };
        let err = |source: std::io::Error| OffloadError::Io { path: self.path.clone(), op, source };
        let fd = self.file.as_raw_fd();
        let chunk = self.chunk;
        let Some(ring) = self.ring.as_mut() else {
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(chunk);
                // SAFETY: [base+done, base+done+n) lies inside the caller's buffer (len ≤ its size)
                // and fd is open for the life of self.
                let r = unsafe {
                    let p = base.add(done);
                    if write {
                        libc::pwrite(fd, p as *const libc::c_void, n, (off + done as u64) as libc::off_t)
                    } else {
                        libc::pread(fd, p as *mut libc::c_void, n, (off + done as u64) as libc::off_t)
                    }
                };
                if r <= 0 {
                    let e = if r == 0 { std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short transfer") } else { std::io::Error::last_os_error() };
                    return Err(err(e));
                }
                done += r as usize;
            }
            return Ok(());
        };
        let depth = ring.params().sq_entries() as usize;
        let mut next = 0usize; // next byte to submit
        let mut inflight = 0usize;
        let mut failed: Option<std::io::Error> = None;
        while next < len || inflight > 0 {
            while next < len && inflight < depth {
                let n = (len - next).min(chunk);
                // SAFETY: see the blocking branch; the buffer outlives the request because this
                // function waits for every completion before it returns.
                let p = unsafe { base.add(next) };
                let entry = if write {
                    opcode::Write::new(types::Fd(fd), p as *const u8, n as u32).offset(off + next as u64).build()
                } else {
                    opcode::Read::new(types::Fd(fd), p, n as u32).offset(off + next as u64).build()
                }
                .user_data(n as u64);
                // SAFETY: the entry's buffer stays valid until its completion is reaped below.
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    break;
                }
                next += n;
                inflight += 1;
            }
            ring.submit_and_wait(1).map_err(&err)?;
            for cqe in ring.completion() {
                inflight -= 1;
                let want = cqe.user_data() as i32;
                if cqe.result() < 0 {
                    failed.get_or_insert(std::io::Error::from_raw_os_error(-cqe.result()));
                } else if cqe.result() != want {
                    failed.get_or_insert(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("short transfer: {} of {want} bytes", cqe.result())));
                }
            }
        }
        match failed {
            Some(e) => Err(err(e)),
            None => Ok(()),
        }
    }
}
