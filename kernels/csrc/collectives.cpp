// c10d process groups from libtorch itself (ProcessGroupGloo over a TCPStore): wizard never
// implements its own transport. Tensors arrive as tch's `at::Tensor*`. Every entry point catches
// C++ exceptions (a peer that dies surfaces here as a timeout or connection error).
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "guard.h"

#include <chrono>
#include <string>

using wizard::guarded;

namespace {
at::Tensor& tensor(void* handle) { return *static_cast<at::Tensor*>(handle); }
}  // namespace

struct WizardGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

extern "C" {

// Rank 0 hosts the store at host:port; every rank connects to it, then Gloo rendezvous runs through it.
int wizard_group_new_gloo(const char* host, int port, int rank, int size, long timeout_ms, WizardGroup** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<std::uint16_t>(port);
    options.isServer = rank == 0;
    options.numWorkers = size;
    options.waitWorkers = true;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    c10::intrusive_ptr<c10d::Store> base_store = store;
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(base_store, rank, size, gloo_options);
    *out = new WizardGroup{base_store, backend, std::chrono::milliseconds(timeout_ms)};
  });
}

void wizard_group_free(WizardGroup* group) { delete group; }

int wizard_allreduce_sum(WizardGroup* group, void* handle) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{tensor(handle)};
    group->backend->allreduce(tensors)->wait(group->timeout);
  });
}

// `input` is the concatenation of `size` equal chunks; rank r receives the sum of everyone's chunk r.
int wizard_reduce_scatter_sum(WizardGroup* group, void* output, void* input) {
  return guarded([&] { group->backend->_reduce_scatter_base(tensor(output), tensor(input))->wait(group->timeout); });
}

// `output` receives every rank's `input`, in rank order.
int wizard_allgather(WizardGroup* group, void* output, void* input) {
  return guarded([&] { group->backend->_allgather_base(tensor(output), tensor(input))->wait(group->timeout); });
}

int wizard_broadcast(WizardGroup* group, void* handle, int root) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{tensor(handle)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    group->backend->broadcast(tensors, options)->wait(group->timeout);
  });
}

int wizard_barrier(WizardGroup* group) {
  return guarded([&] { group->backend->barrier()->wait(group->timeout); });
}
}
