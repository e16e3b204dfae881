// libtorch's CUDA caching allocator's own figures for one device: what it has handed to tensors
// (allocated) and what it holds from the driver (reserved: allocated plus cached free blocks), now
// and at their peaks since the last reset. What `torch.cuda.max_memory_allocated` /
// `max_memory_reserved` read. Compiled with the NCCL shim, where the CUDA wheel's headers are.
#include <cstdint>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include "shim.hpp"

// out: allocated now, allocated peak, reserved now, reserved peak (bytes).
extern "C" char* strata_cuda_memory(int device, int64_t* out) {
  return strata::guarded([&] {
    TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "no CUDA device ", device);
    const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
  });
}

// Restarts both peaks from the current figures.
extern "C" char* strata_cuda_reset_peaks(int device) {
  return strata::guarded([&] {
    TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "no CUDA device ", device);
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}
