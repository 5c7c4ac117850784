// c10d process groups from libtorch itself (ProcessGroupGloo over a TCPStore; ProcessGroupNCCL in
// nccl.cpp): wizard never implements its own transport. Tensors arrive as tch's `at::Tensor*`. Every
// entry point catches C++ exceptions (a peer that dies surfaces here as a timeout or connection error).
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "group.h"

#include <cstdlib>

using wizard::guarded;

namespace {
at::Tensor& tensor(void* handle) { return *static_cast<at::Tensor*>(handle); }

// libtorch's flight recorder traces every collective in one process-wide buffer whose table of groups
// is written outside its lock (FlightRecorderDetail.hpp), so two ranks in one process (the tests)
// crash on it, and it gathers a traceback per collective. Nothing here reads that trace: it stays off
// unless the user asks for it. Set while loading, before any thread can read the environment.
[[maybe_unused]] const bool flight_recorder_left_to_user = [] {
  if (std::getenv("TORCH_FR_BUFFER_SIZE") || std::getenv("TORCH_NCCL_TRACE_BUFFER_SIZE")) return true;
  setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
  return false;
}();
}  // namespace

extern "C" {

int wizard_group_new_gloo(const char* host, int port, int rank, int size, long timeout_ms, WizardGroup** out) {
  return guarded([&] {
    auto store = wizard::rendezvous(host, port, rank, size, timeout_ms);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, gloo_options);
    *out = new WizardGroup{store, backend, std::chrono::milliseconds(timeout_ms)};
  });
}

void wizard_group_free(WizardGroup* group) {
  // NCCL tears its communicators down in shutdown(), not quietly in its destructor.
  wizard::guarded([&] { group->backend->shutdown(); });
  delete group;
}

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

int wizard_broadcast(WizardGroup* group, void* handle, int root) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{tensor(handle)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    group->backend->broadcast(tensors, options)->wait(group->timeout);
  });
}

// `output` receives every rank's `input`, in rank order; the all-gather runs (on Gloo's own
// threads) until wizard_work_wait.
int wizard_allgather_start(WizardGroup* group, void* output, void* input, WizardWork** out) {
  return guarded([&] { *out = new WizardWork{group->backend->_allgather_base(tensor(output), tensor(input))}; });
}

int wizard_work_wait(WizardGroup* group, WizardWork* work) {
  return guarded([&] { work->work->wait(group->timeout); });
}

void wizard_work_free(WizardWork* work) { delete work; }

int wizard_barrier(WizardGroup* group) {
  return guarded([&] { group->backend->barrier()->wait(group->timeout); });
}
}
