// What the process's libtorch is and can reach: version, CUDA devices, where it was loaded from.
// Every entry point catches C++ exceptions: they must never cross into Rust.
#include <ATen/detail/CUDAHooksInterface.h>
#include <dlfcn.h>
#include <torch/cuda.h>
#include <torch/headeronly/version.h>

#include "guard.h"
#include "libtorch_file.h"

#include <stdexcept>
#include <string>

#ifdef WIZARD_WITH_CUDA
// The driver API header is self-contained (the wheel's cuda_runtime_api.h is not: it lacks crt/).
#include <cuda.h>
#endif

using wizard::copy_out;
using wizard::guarded;

extern "C" {

void wizard_last_error(char* buf, size_t len) { copy_out(wizard::last_error(), buf, len); }

void wizard_torch_version(char* buf, size_t len) { copy_out(TORCH_VERSION, buf, len); }

int wizard_libtorch_path(char* buf, size_t len) {
  const char* libtorch = wizard::libtorch_file();
  if (libtorch == nullptr) {
    wizard::last_error() = "dladdr found no shared object for libtorch";
    return -1;
  }
  copy_out(libtorch, buf, len);
  return 0;
}

int wizard_cuda_summary(int* available, int* cudnn, int* device_count, long* runtime_version) {
  return guarded([&] {
    *available = torch::cuda::is_available();
    *cudnn = *available && torch::cuda::cudnn_is_available();
    *device_count = *available ? torch::cuda::device_count() : 0;
    // Without libtorch_cuda in the process (kernels::runtime::cuda_backend) the hooks are a stub.
    const auto& hooks = at::detail::getCUDAHooks();
    *runtime_version = hooks.isBuilt() ? hooks.versionCUDART() : 0;
  });
}

int wizard_cuda_device(int index, char* name, size_t name_len, unsigned long long* total_memory, int* major,
                       int* minor) {
#ifdef WIZARD_WITH_CUDA
  return guarded([&] {
    // The driver is optional at run time, so it is opened here rather than linked.
    static void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (driver == nullptr) throw std::runtime_error("libcuda.so.1 (the NVIDIA driver) cannot be loaded");
    auto symbol = [](const char* symbol_name) {
      void* found = dlsym(driver, symbol_name);
      if (found == nullptr) throw std::runtime_error(std::string("the NVIDIA driver lacks ") + symbol_name);
      return found;
    };
    auto init = reinterpret_cast<decltype(&cuInit)>(symbol("cuInit"));
    auto get = reinterpret_cast<decltype(&cuDeviceGet)>(symbol("cuDeviceGet"));
    auto get_name = reinterpret_cast<decltype(&cuDeviceGetName)>(symbol("cuDeviceGetName"));
    auto get_memory = reinterpret_cast<decltype(&cuDeviceTotalMem)>(symbol("cuDeviceTotalMem_v2"));
    auto get_attribute = reinterpret_cast<decltype(&cuDeviceGetAttribute)>(symbol("cuDeviceGetAttribute"));
    CUdevice device;
    char text[256] = {0};
    size_t bytes = 0;
    if (init(0) != CUDA_SUCCESS || get(&device, index) != CUDA_SUCCESS ||
        get_name(text, sizeof text - 1, device) != CUDA_SUCCESS || get_memory(&bytes, device) != CUDA_SUCCESS ||
        get_attribute(major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device) != CUDA_SUCCESS ||
        get_attribute(minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device) != CUDA_SUCCESS) {
      throw std::runtime_error("the NVIDIA driver could not describe device " + std::to_string(index));
    }
    copy_out(text, name, name_len);
    *total_memory = bytes;
  });
#else
  wizard::last_error() = "wizard was built against a libtorch without CUDA";
  return -1;
#endif
}
}
