// The libtorch shared object this process runs, found from one of its symbols; for the doctor's
// report (runtime.cpp) and for finding libtorch_cuda beside it (cuda_backend.cpp).
#pragma once

#include <dlfcn.h>
#include <torch/cuda.h>

namespace wizard {

// The path the loader opened libtorch from, or null when dladdr cannot tell.
inline const char* libtorch_file() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&torch::cuda::is_available), &info) == 0) return nullptr;
  return info.dli_fname;
}

}  // namespace wizard
