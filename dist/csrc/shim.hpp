// What both shim files share: the handles' layouts (one definition, as C++ requires of types
// that cross translation units) and how an exception becomes an error message.
#pragma once

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

struct strata_store {
  c10::intrusive_ptr<c10d::Store> store;
};
struct strata_pg {
  c10::intrusive_ptr<c10d::Backend> pg;
};
struct strata_work {
  c10::intrusive_ptr<c10d::Work> work;
};

namespace strata {

// A malloc'd copy of `msg` (the Rust side frees it with strata_c10d_free_error).
inline char* error(const std::string& msg) {
  char* e = static_cast<char*>(std::malloc(msg.size() + 1));
  if (e != nullptr) {
    std::memcpy(e, msg.c_str(), msg.size() + 1);
  }
  return e;
}

// Runs f, turning any exception into an error message (c10::Error's without its C++ backtrace).
template <class F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error(e.what());
  } catch (...) {
    return error("unknown C++ exception");
  }
}

// libtorch 2.11's flight recorder (a ring of every collective, for torch.distributed's Python
// debugging tools to dump) updates its map of groups outside its lock (FlightRecorderDetail.hpp,
// `all_pg_status_`), so groups running collectives from several threads of one process corrupt it:
// seen as a spin in recordWithResetEnabled and as segfaults. strata never dumps it, so it is off
// unless the user sets TORCH_FR_BUFFER_SIZE (or TORCH_NCCL_TRACE_BUFFER_SIZE). The recorder reads
// the variable once, when the first group is made: every store and group constructor calls this.
inline void flight_recorder_off_unless_asked() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (std::getenv("TORCH_FR_BUFFER_SIZE") == nullptr && std::getenv("TORCH_NCCL_TRACE_BUFFER_SIZE") == nullptr) {
      setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
    }
  });
}

}  // namespace strata
