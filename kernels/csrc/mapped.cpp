// Tensors over a range of a file, mapped instead of read: the pages the kernel already holds for the
// file become the tensor's, with no copy into new memory (which in a VM costs more than the read).
// A page the file loses while it is mapped (another process truncates it, or its storage fails)
// would end this process with SIGBUS at first touch; a zero page stands in for it instead, and the
// file's count of lost pages grows, so that the loader, asking once the tensor is used up, refuses
// what it made.
#include <ATen/ATen.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <mutex>
#include <map>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

#include "guard.h"

namespace {

// The live mappings, as the SIGBUS handler reads them: lock-free slots (a 1B model's quantized
// directory keeps about 200 mapped at once while it loads).
struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint64_t> device{0};
  std::atomic<uint64_t> inode{0};
  std::atomic<uint64_t> lost{0};
};
static_assert(std::atomic<uintptr_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free);
constexpr int kSlots = 4096;
Slot slots[kSlots];
uintptr_t page_size = 0;
struct sigaction previous_handler;

// Pages lost by the mappings now gone, per file (device, inode); with the live slots' counts, under
// the lock whenever a count moves from a slot to here.
std::mutex lost_mutex;
std::map<std::pair<uint64_t, uint64_t>, uint64_t> lost_by_file;

void on_bus_error(int signal_number, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  // A SIGBUS sent by kill() (si_code <= 0) carries no address.
  const bool fault = info->si_code > 0;
  for (auto& slot : slots) {
    if (!fault) break;
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    // A slot released and claimed again between the two loads would pair one mapping's start with
    // another's end.
    if (begin == 0 || address < begin || address >= end || slot.begin.load(std::memory_order_acquire) != begin)
      continue;
    // Counted first: no moment where a page reads as zeros and the count has not moved.
    slot.lost.fetch_add(1, std::memory_order_acq_rel);
    const uintptr_t from = address & ~(page_size - 1);
    void* zeros = mmap(reinterpret_cast<void*>(from), end - from, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (zeros == MAP_FAILED) break;
    return;  // the faulting read runs again, on zeros
  }
  // Not a mapping of ours: what would have happened without this handler.
  if (previous_handler.sa_flags & SA_SIGINFO) {
    if (previous_handler.sa_sigaction != nullptr) return previous_handler.sa_sigaction(signal_number, info, context);
  } else if (previous_handler.sa_handler == SIG_IGN) {
    if (!fault) return;  // a fault cannot be ignored: it would repeat forever
  } else if (previous_handler.sa_handler != SIG_DFL) {
    return previous_handler.sa_handler(signal_number);
  }
  struct sigaction fallback = {};
  fallback.sa_handler = SIG_DFL;
  sigaction(SIGBUS, &fallback, nullptr);
  raise(SIGBUS);  // delivered as the handler returns: the process ends as it would have
}

void install_handler() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    if (sigaction(SIGBUS, nullptr, &previous_handler) != 0)
      throw std::system_error(errno, std::generic_category(), "sigaction");
    struct sigaction action = {};
    action.sa_sigaction = on_bus_error;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, nullptr) != 0) throw std::system_error(errno, std::generic_category(), "sigaction");
  });
}

// The slot now holding [begin, end) of the file (device, inode), or -1 when all are taken.
int claim_slot(uintptr_t begin, uintptr_t end, uint64_t device, uint64_t inode) {
  for (int i = 0; i < kSlots; ++i) {
    uintptr_t free = 0;
    if (slots[i].begin.compare_exchange_strong(free, begin, std::memory_order_acq_rel)) {
      slots[i].device.store(device, std::memory_order_relaxed);
      slots[i].inode.store(inode, std::memory_order_relaxed);
      slots[i].lost.store(0, std::memory_order_relaxed);
      slots[i].end.store(end, std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void release_slot(int i) {
  Slot& slot = slots[i];
  slot.end.store(0, std::memory_order_release);
  if (slot.lost.load(std::memory_order_acquire) > 0) {
    std::lock_guard<std::mutex> lock(lost_mutex);
    const std::pair<uint64_t, uint64_t> file(slot.device.load(std::memory_order_relaxed),
                                             slot.inode.load(std::memory_order_relaxed));
    lost_by_file[file] += slot.lost.exchange(0, std::memory_order_acq_rel);
  }
  slot.begin.store(0, std::memory_order_release);
}

}  // namespace

extern "C" {

// `*tensor` = a new CPU byte tensor over bytes [offset, offset + length) of the open file `fd`, which
// must lie within the file. Mapped copy-on-write (writes stay in this process); unmapped when the
// tensor's storage is freed. Pages the file loses meanwhile read as zeros (counted: wizard_mapped_file_lost).
int wizard_map_bytes(int fd, int64_t offset, int64_t length, void** tensor) {
  return wizard::guarded([&] {
    struct stat file;
    if (fstat(fd, &file) != 0) throw std::system_error(errno, std::generic_category(), "fstat");
    if (offset < 0 || length < 0 || offset + length > file.st_size)
      throw std::invalid_argument("bytes " + std::to_string(offset) + ".." + std::to_string(offset + length) +
                                  " are not within the file's " + std::to_string(file.st_size));
    if (length == 0) {
      *tensor = new at::Tensor(at::empty({0}, at::kByte));
      return;
    }
    install_handler();
    const auto page = static_cast<int64_t>(page_size);
    const int64_t start = offset / page * page;
    const size_t mapped = static_cast<size_t>(offset - start + length);
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, start);
    if (base == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    const auto begin = reinterpret_cast<uintptr_t>(base);
    // To its last page's end: a read past the tensor within that page touches the mapping too.
    const uintptr_t end = (begin + mapped + page_size - 1) / page_size * page_size;
    const int slot = claim_slot(begin, end, file.st_dev, file.st_ino);
    if (slot < 0) {
      munmap(base, mapped);
      throw std::runtime_error("too many mapped tensors at once");
    }
    // Whatever of it is not in memory yet is read ahead now, not a page at each first touch.
    madvise(base, mapped, MADV_WILLNEED);
    auto unmap = [base, mapped, slot](void*) {
      release_slot(slot);
      munmap(base, mapped);
    };
    *tensor = new at::Tensor(at::from_blob(static_cast<char*>(base) + (offset - start), {length}, unmap, at::kByte));
  });
}

// `*lost` = how often mappings of the open file `fd`, live or gone, lost pages in this process (each
// time, the rest of the mapping from the faulting page reads as zeros): a count that moved while a
// load used the file's tensors spoils them.
int wizard_mapped_file_lost(int fd, uint64_t* lost) {
  return wizard::guarded([&] {
    struct stat file;
    if (fstat(fd, &file) != 0) throw std::system_error(errno, std::generic_category(), "fstat");
    const uint64_t device = file.st_dev, inode = file.st_ino;
    std::lock_guard<std::mutex> lock(lost_mutex);
    auto gone = lost_by_file.find({device, inode});
    *lost = gone == lost_by_file.end() ? 0 : gone->second;
    for (const auto& slot : slots) {
      if (slot.begin.load(std::memory_order_acquire) == 0) continue;
      const uint64_t count = slot.lost.load(std::memory_order_acquire);
      if (slot.device.load(std::memory_order_relaxed) == device && slot.inode.load(std::memory_order_relaxed) == inode)
        *lost += count;
    }
  });
}

}  // extern "C"
