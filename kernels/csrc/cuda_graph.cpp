// CUDA graphs from libtorch_cuda: a decode step captured once and replayed, so that a step costs one
// launch instead of one per op (a 1B model's step is several hundred). Part of the CUDA object that
// the binary opens at run time (kernels/src/cuda_object.rs), beside csrc/nccl.cpp.
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "guard.h"

namespace {

// One capture at a time in the process: a capture on any stream makes device-wide waits illegal,
// and libtorch's allocator keeps one list of captures under way.
std::mutex capturing_anywhere;

// Each device's capture stream, made once: cuBLAS keeps a workspace per (handle, stream), which
// would otherwise be allocated inside each capture, on whichever pool stream came up.
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex device) {
  static std::mutex lock;
  static std::map<c10::DeviceIndex, cudaStream_t> streams;
  std::lock_guard<std::mutex> held(lock);
  auto found = streams.find(device);
  if (found == streams.end()) {
    c10::cuda::CUDAGuard on_device(device);
    cudaStream_t stream;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    found = streams.emplace(device, stream).first;
  }
  return c10::cuda::getStreamFromExternal(found->second, device);
}

// What capture_begin registered with the allocators, where capture_end never got to undo it (a
// capture that failed): otherwise the allocators go on routing memory to a graph that is gone.
void unregister_failed_capture(c10::DeviceIndex device, at::cuda::MempoolId_t pool) {
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
    c10::cuda::CUDACachingAllocator::releasePool(device, pool);
  } catch (...) {  // capture_end had unregistered it
  }
  try {
    auto* host = at::getHostAllocator(at::kCUDA);
    host->end_allocate_to_pool(pool);
    host->release_pool(pool);
  } catch (...) {  // not registered with the host allocator
  }
}

}  // namespace

struct WizardGraph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  at::cuda::MempoolId_t pool;
  // Held from begin to end.
  std::unique_lock<std::mutex> only_capture;
  // The capture stream, current from begin to end.
  std::optional<c10::cuda::CUDAStreamGuard> capturing;
};

extern "C" {

// The CUDA object's own error channel: its `last_error` is not the binary's.
void wizard_cuda_last_error(char* buf, size_t len) { wizard::copy_out(wizard::last_error(), buf, len); }

int wizard_graph_begin(int device, WizardGraph** out) {
  return wizard::guarded([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    auto graph = std::make_unique<WizardGraph>();
    graph->device = index;
    graph->only_capture = std::unique_lock<std::mutex>(capturing_anywhere);
    auto stream = capture_stream(index);
    // Recorded work reads what the caller's stream queued before (the first, eager step).
    c10::cuda::getCurrentCUDAStream(index).synchronize();
    graph->capturing.emplace(stream);
    // The capture stream's cuBLAS workspaces, outside the graph's memory.
    at::cuda::getCurrentCUDABlasHandle();
    at::cuda::getCurrentCUDABlasLtHandle();
    graph->pool = at::cuda::graph_pool_handle();
    try {
      // Thread-local: other threads' unsafe calls do not break this capture.
      graph->graph.capture_begin(graph->pool, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      unregister_failed_capture(index, graph->pool);
      throw;
    }
    *out = graph.release();
  });
}

int wizard_graph_end(WizardGraph* graph) {
  return wizard::guarded([&] {
    // The caller's stream and other captures come back whether or not this one held.
    struct Restore {
      WizardGraph* graph;
      ~Restore() {
        graph->capturing.reset();
        graph->only_capture = {};
      }
    } restore{graph};
    try {
      graph->graph.capture_end();
    } catch (...) {
      unregister_failed_capture(graph->device, graph->pool);
      throw;
    }
  });
}

int wizard_graph_replay(WizardGraph* graph) {
  return wizard::guarded([&] {
    c10::cuda::CUDAGuard on_device(graph->device);
    graph->graph.replay();
  });
}

void wizard_graph_free(WizardGraph* graph) {
  try {
    delete graph;
  } catch (...) {  // a destructor that throws must not end the process
  }
}
}
