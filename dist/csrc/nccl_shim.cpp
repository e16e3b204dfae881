// ProcessGroupNCCL behind the same C ABI as the Gloo group (c10d_shim.cpp): compiled only where
// the CUDA wheel's NCCL and CUDA headers are present (build.rs). A group of ranks on GPUs, one GPU
// per rank; collectives take CUDA tensors of that GPU.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

struct strata_store {
  c10::intrusive_ptr<c10d::Store> store;
};
struct strata_pg {
  c10::intrusive_ptr<c10d::Backend> pg;
};

namespace {
char* nccl_error(const std::string& msg) {
  char* e = static_cast<char*>(std::malloc(msg.size() + 1));
  if (e != nullptr) {
    std::memcpy(e, msg.c_str(), msg.size() + 1);
  }
  return e;
}
}  // namespace

extern "C" char* strata_pg_nccl(strata_store* s, int rank, int size, int64_t timeout_ms, int device, strata_pg** out) {
  try {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    *out = new strata_pg{c10::make_intrusive<c10d::ProcessGroupNCCL>(s->store, rank, size, opts)};
    return nullptr;
  } catch (const c10::Error& e) {
    return nccl_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return nccl_error(e.what());
  } catch (...) {
    return nccl_error("unknown C++ exception");
  }
}
