// Autocast (mixed precision in a chosen dtype) and the CUDA caching allocator's statistics, which
// tch does not bind. Device types and dtypes arrive as c10's enum values.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CachingDeviceAllocator.h>

#include "guard.h"

extern "C" {

// Turns autocast on for `device_type` in `dtype`, writing the previous state for the matching exit.
int wizard_autocast_enter(int device_type, int dtype, int* was_enabled, int* previous_dtype) {
  return wizard::guarded([&] {
    auto device = static_cast<c10::DeviceType>(device_type);
    *was_enabled = at::autocast::is_autocast_enabled(device);
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::increment_nesting();
  });
}

int wizard_autocast_exit(int device_type, int was_enabled, int previous_dtype) {
  return wizard::guarded([&] {
    auto device = static_cast<c10::DeviceType>(device_type);
    // The cast-weight cache lives as long as the outermost region, as in torch.autocast.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device, was_enabled != 0);
    at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(previous_dtype));
  });
}

// Bytes the CUDA caching allocator holds for tensors on device `index` now and at peak, and has
// reserved from the driver.
int wizard_cuda_memory(int index, int64_t* allocated, int64_t* peak_allocated, int64_t* reserved) {
  return wizard::guarded([&] {
    // The allocator's per-device state exists only once CUDA is initialised.
    at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(index));
    auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *peak_allocated = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
  });
}
}
