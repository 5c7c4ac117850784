// Opens libtorch's CUDA backend before main, where an NVIDIA driver is. libtorch settles on its CUDA
// hooks or a CPU-only stub at its first CUDA question, for the rest of the process: loading the
// backend before any code runs means no code can ask first. The backend is not linked because it
// brings ~350 MiB of CUDA libraries into every process, CPU-only ones too. This object is linked
// whole (build.rs), so every binary that links the kernels crate runs the constructor.
#include <dlfcn.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "guard.h"
#include "libtorch_file.h"

namespace {

// The states kernels::runtime::CudaBackend names, in its order.
enum State { kLoaded = 0, kNoDriver = 1, kNotBuilt = 2, kFailed = 3 };

// Plain data, so that it is set before any dynamic initializer could read it.
struct Outcome {
  int state;
  char message[1024];
};
Outcome outcome{kFailed, "libtorch's CUDA backend was not looked for"};

void fail(const char* message) {
  outcome.state = kFailed;
  std::strncpy(outcome.message, message, sizeof outcome.message - 1);
}

__attribute__((constructor)) void open_cuda_backend() {
  const char* libtorch = wizard::libtorch_file();
  if (libtorch == nullptr) return fail("dladdr found no shared object for libtorch");
  std::string torch_cuda = libtorch;
  torch_cuda = torch_cuda.substr(0, torch_cuda.rfind('/') + 1) + "libtorch_cuda.so";
  if (access(torch_cuda.c_str(), F_OK) != 0) {
    outcome.state = kNotBuilt;
    return;
  }
  if (dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL) == nullptr) {
    outcome.state = kNoDriver;
    return;
  }
  if (dlopen(torch_cuda.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* error = dlerror();
    return fail(error != nullptr ? error : "libtorch_cuda.so did not load");
  }
  outcome.state = kLoaded;
}

}  // namespace

extern "C" int wizard_cuda_backend(char* message, size_t len) {
  wizard::copy_out(outcome.message, message, len);
  return outcome.state;
}
