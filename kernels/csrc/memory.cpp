// Weights in 2 MiB pages. A decode step streams every weight once, and with 4 KiB pages it walks a
// page table (two of them in a VM) every 4 KiB it reads. libtorch's CPU allocator is wrapped, before
// main: while a model loads (wizard_huge_pages_begin/end), blocks of 2 MiB or more are mapped at a
// 2 MiB boundary and advised for transparent huge pages; every other block, and every block outside
// a load, comes from libtorch's allocator as before. A block's last partial 2 MiB stays in small
// pages, so nothing is resident that was not asked for.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = 4096;

std::atomic<int> open_loads{0};

// The blocks mapped here and their lengths; never destroyed, as tensors are freed at exit too.
struct Mapped {
  std::mutex mutex;
  std::unordered_map<void*, size_t> lengths;
};
Mapped& mapped() {
  static Mapped* blocks = new Mapped;
  return *blocks;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  explicit HugePageAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage || open_loads.load(std::memory_order_relaxed) == 0) return fallback_->allocate(n);
    const size_t length = (n + kPage - 1) / kPage * kPage;
    void* reserved = mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserved == MAP_FAILED) return fallback_->allocate(n);
    char* region = static_cast<char*>(reserved);
    char* start = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(region) + kHugePage - 1) & ~(kHugePage - 1));
    if (start > region) munmap(region, start - region);
    munmap(start + length, region + kHugePage - start);
    madvise(start, length, MADV_HUGEPAGE);
    {
      std::lock_guard<std::mutex> lock(mapped().mutex);
      mapped().lengths[start] = length;
    }
    return {start, start, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  // Frees a block of either kind (raw_allocate's blocks come back here too).
  static void release(void* block);

  c10::Allocator* const fallback_;
};

HugePageAllocator* installed = nullptr;

void HugePageAllocator::release(void* block) {
  size_t length = 0;
  {
    std::lock_guard<std::mutex> lock(mapped().mutex);
    auto found = mapped().lengths.find(block);
    if (found != mapped().lengths.end()) {
      length = found->second;
      mapped().lengths.erase(found);
    }
  }
  if (length > 0) {
    munmap(block, length);
  } else if (block != nullptr) {
    installed->fallback_->raw_deleter()(block);
  }
}

__attribute__((constructor)) void install() {
  installed = new HugePageAllocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(installed, /*priority=*/1);
}

}  // namespace

extern "C" {

void wizard_huge_pages_begin() { open_loads.fetch_add(1, std::memory_order_relaxed); }

void wizard_huge_pages_end() { open_loads.fetch_sub(1, std::memory_order_relaxed); }
}
