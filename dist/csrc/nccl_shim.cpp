// ProcessGroupNCCL behind the same C ABI as the Gloo group (c10d_shim.cpp): compiled only where
// the CUDA wheel's NCCL and CUDA headers are present (build.rs). A group of ranks on GPUs, one GPU
// per rank; collectives take CUDA tensors of that GPU.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "shim.hpp"

extern "C" char* strata_pg_nccl(strata_store* s, int rank, int size, int64_t timeout_ms, int device, strata_pg** out) {
  strata::flight_recorder_off_unless_asked();
  return strata::guarded([&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    *out = new strata_pg{c10::make_intrusive<c10d::ProcessGroupNCCL>(s->store, rank, size, opts)};
  });
}
