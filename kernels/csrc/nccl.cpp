// ProcessGroupNCCL from libtorch_cuda, for ranks that each own a GPU. Part of the CUDA object, a
// shared object that the binary opens only when it needs CUDA's own API (kernels/src/cuda_object.rs);
// compiled only when the CUDA runtime, crt and CCCL headers are present (scripts/setup.sh installs
// them beside the wheel).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "group.h"

extern "C" {

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
