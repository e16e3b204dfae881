//! libtorch's CUDA caching allocator's figures for one device (what
//! `torch.cuda.max_memory_allocated` / `max_memory_reserved` read), through the shim
//! (`csrc/cuda_memory.cpp`). Here because this crate is the one compiled against libtorch's C++
//! headers; built where the CUDA wheel's headers are, an error elsewhere.
#[cfg(strata_nccl)]
use crate::check;
use crate::Result;

/// Bytes on one device: handed to tensors (allocated) and held from the driver (reserved:
/// allocated plus the cached free blocks), now and at their peaks since the last
/// [`reset_peaks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

#[cfg(strata_nccl)]
extern "C" {
    fn strata_cuda_memory(device: i32, out: *mut i64) -> *mut std::ffi::c_char;
    fn strata_cuda_reset_peaks(device: i32) -> *mut std::ffi::c_char;
}

#[cfg(not(strata_nccl))]
fn not_built() -> crate::DistError {
    crate::DistError::Invalid("this build of strata has no CUDA allocator statistics (built without the CUDA wheel's headers)".into())
}

/// The allocator's figures for CUDA device `device`.
pub fn stats(device: usize) -> Result<CudaMemory> {
    #[cfg(strata_nccl)]
    {
        let mut out = [0i64; 4];
        // SAFETY: `out` has the four slots the shim writes.
        check("CUDA allocator statistics", unsafe { strata_cuda_memory(device as i32, out.as_mut_ptr()) })?;
        let b = |i: usize| out[i].max(0) as u64;
        Ok(CudaMemory { allocated: b(0), allocated_peak: b(1), reserved: b(2), reserved_peak: b(3) })
    }
    #[cfg(not(strata_nccl))]
    {
        let _ = device;
        Err(not_built())
    }
}

/// Restarts device `device`'s allocated and reserved peaks from their current figures.
pub fn reset_peaks(device: usize) -> Result<()> {
    #[cfg(strata_nccl)]
    {
        // SAFETY: no pointers cross; the shim turns any C++ exception into an error.
        check("CUDA allocator peak reset", unsafe { strata_cuda_reset_peaks(device as i32) })
    }
    #[cfg(not(strata_nccl))]
    {
        let _ = device;
        Err(not_built())
    }
}
