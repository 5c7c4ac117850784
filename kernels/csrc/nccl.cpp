// ProcessGroupNCCL from libtorch_cuda, for ranks that each own a GPU. Built as a shared object that
// the binary opens only when a group uses NCCL (kernels/src/nccl.rs); compiled only when the CUDA
// runtime, crt and CCCL headers are present (scripts/setup.sh installs them beside the wheel).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "group.h"

extern "C" {

// This object's own error channel: its `last_error` is not the binary's.
void wizard_nccl_last_error(char* buf, size_t len) { wizard::copy_out(wizard::last_error(), buf, len); }

int wizard_group_new_nccl(const char* host, int port, int rank, int size, long timeout_ms, int device,
                          WizardGroup** out) {
  return wizard::guarded([&] {
    auto store = wizard::rendezvous(host, port, rank, size, timeout_ms);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
    // Binding the device lets barriers and the first collective use it without guessing.
    backend->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    *out = new WizardGroup{store, backend, std::chrono::milliseconds(timeout_ms)};
  });
}
}
