// The pieces of torch.distributed's c10d that strata uses, behind a C ABI: a TCPStore (under a
// key prefix when torchrun's agent hosts it), a Gloo process group, and collectives on tch's
// tensors (a tch `Tensor` holds an `at::Tensor*`). Every entry point returns nullptr on success
// or a malloc'd error message (strata_c10d_free_error): no C++ exception crosses into Rust.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "shim.hpp"

namespace {

using strata::guarded;

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::SUM);
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::MAX);
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::MIN);
    case 3:
      return c10d::ReduceOp(c10d::ReduceOp::RedOpType::PRODUCT);
    default:
      throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

void started(c10::intrusive_ptr<c10d::Work> w, strata_work** out) {
  *out = new strata_work{std::move(w)};
}

}  // namespace

extern "C" {

void strata_c10d_free_error(char* e) {
  std::free(e);
}

char* strata_store_tcp(const char* host, uint16_t port, bool is_server, int64_t timeout_ms, const char* prefix, strata_store** out) {
  strata::flight_recorder_off_unless_asked();
  return guarded([&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server;
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    if (prefix != nullptr && prefix[0] != '\0') {
      s = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s);
    }
    *out = new strata_store{std::move(s)};
  });
}

void strata_store_free(strata_store* s) {
  delete s;
}

char* strata_store_set(strata_store* s, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] { s->store->set(std::string(key), std::vector<uint8_t>(data, data + len)); });
}

// Blocks until `key` exists (or the store's timeout). The value goes into a malloc'd buffer
// (free with strata_c10d_free_error).
char* strata_store_get(strata_store* s, const char* key, uint8_t** data, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> v = s->store->get(std::string(key));
    *data = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    if (*data == nullptr) {
      throw std::bad_alloc();
    }
    std::memcpy(*data, v.data(), v.size());
    *len = v.size();
  });
}

char* strata_store_add(strata_store* s, const char* key, int64_t delta, int64_t* value) {
  return guarded([&] { *value = s->store->add(std::string(key), delta); });
}

char* strata_pg_gloo(strata_store* s, int rank, int size, int64_t timeout_ms, strata_pg** out) {
  strata::flight_recorder_off_unless_asked();
  return guarded([&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    // As torch.distributed does: GLOO_SOCKET_IFNAME names the interface, else the address this
    // host's name resolves to (loopback when it does not resolve).
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && ifname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(std::string(ifname)));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    *out = new strata_pg{c10::make_intrusive<c10d::ProcessGroupGloo>(s->store, rank, size, opts)};
  });
}

void strata_pg_free(strata_pg* pg) {
  delete pg;
}

char* strata_all_reduce(strata_pg* pg, const at::Tensor* t, int op, strata_work** out) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    started(pg->pg->allreduce(ts, o), out);
  });
}

char* strata_broadcast(strata_pg* pg, const at::Tensor* t, int root, strata_work** out) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    started(pg->pg->broadcast(ts, o), out);
  });
}

// `output` holds world × `input` along dimension 0.
char* strata_all_gather(strata_pg* pg, const at::Tensor* output, const at::Tensor* input, strata_work** out) {
  return guarded([&] {
    at::Tensor o = *output, i = *input;
    started(pg->pg->_allgather_base(o, i), out);
  });
}

// `input` holds world × `output` along dimension 0; rank r gets the reduced r-th part.
char* strata_reduce_scatter(strata_pg* pg, const at::Tensor* output, const at::Tensor* input, int op, strata_work** out) {
  return guarded([&] {
    at::Tensor o = *output, i = *input;
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = reduce_op(op);
    started(pg->pg->_reduce_scatter_base(o, i, opts), out);
  });
}

// Equal splits along dimension 0: rank r sends its j-th part to rank j and receives rank j's
// r-th part as its j-th.
char* strata_all_to_all(strata_pg* pg, const at::Tensor* output, const at::Tensor* input, strata_work** out) {
  return guarded([&] {
    at::Tensor o = *output, i = *input;
    std::vector<int64_t> none;
    started(pg->pg->alltoall_base(o, i, none, none), out);
  });
}

char* strata_barrier(strata_pg* pg, strata_work** out) {
  return guarded([&] { started(pg->pg->barrier(), out); });
}

// Waits for a collective; false in *done when the timeout passed first.
char* strata_work_wait(strata_work* w, int64_t timeout_ms, bool* done) {
  return guarded([&] { *done = w->work->wait(std::chrono::milliseconds(timeout_ms)); });
}

void strata_work_free(strata_work* w) {
  delete w;
}

}  // extern "C"
