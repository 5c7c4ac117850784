// CUDA graphs from libtorch_cuda: a decode step captured once and replayed, so that a step costs one
// launch instead of one per op (a 1B model's step is several hundred). Part of the CUDA object that
// the binary opens at run time (kernels/src/cuda_object.rs), beside csrc/nccl.cpp.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <optional>

#include "guard.h"

struct WizardGraph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  // Capture needs a stream other than the default one; current from begin to end.
  std::optional<c10::cuda::CUDAStreamGuard> capturing;
};

extern "C" {

// The CUDA object's own error channel: its `last_error` is not the binary's.
void wizard_cuda_last_error(char* buf, size_t len) { wizard::copy_out(wizard::last_error(), buf, len); }

int wizard_graph_begin(int device, WizardGraph** out) {
  return wizard::guarded([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    {
      // What earlier steps queued must be done before anything is recorded over the same memory.
      c10::cuda::CUDAGuard on_device(index);
      c10::cuda::device_synchronize();
    }
    auto graph = std::make_unique<WizardGraph>();
    graph->device = index;
    graph->capturing.emplace(c10::cuda::getStreamFromPool(false, index));
    // Thread-local: other threads may use CUDA while this one records.
    graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    *out = graph.release();
  });
}

int wizard_graph_end(WizardGraph* graph) {
  return wizard::guarded([&] {
    // The caller's stream comes back whether or not the capture held.
    struct Restore {
      WizardGraph* graph;
      ~Restore() { graph->capturing.reset(); }
    } restore{graph};
    graph->graph.capture_end();
  });
}

int wizard_graph_replay(WizardGraph* graph) {
  return wizard::guarded([&] {
    c10::cuda::CUDAGuard on_device(graph->device);
    graph->graph.replay();
  });
}

void wizard_graph_free(WizardGraph* graph) { delete graph; }
}
