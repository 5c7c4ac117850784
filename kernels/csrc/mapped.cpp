// Tensors over a range of a file, mapped instead of read: the pages the kernel already holds for the
// file become the tensor's, with no copy into new memory (which in a VM costs more than the read).
// A file that another process truncates while it is mapped would end this one with SIGBUS at the
// first lost page; zero pages stand in for the lost ones instead, and the loader, finding the file
// shorter when the tensor is used up, names it.
#include <ATen/ATen.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>

#include "guard.h"

namespace {

// The live mappings, as the SIGBUS handler may read them: address ranges in lock-free slots.
struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
};
constexpr int kSlots = 64;
Slot slots[kSlots];
struct sigaction previous_handler;

void on_bus_error(int signal_number, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (auto& slot : slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (begin == 0 || address < begin || address >= end) continue;
    const uintptr_t from = address & ~(page - 1);
    void* zeros = mmap(reinterpret_cast<void*>(from), end - from, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (zeros != MAP_FAILED) return;  // the faulting read runs again, on zeros
    break;
  }
  // Not a mapping of ours: what would have happened without this handler.
  if (previous_handler.sa_flags & SA_SIGINFO) return previous_handler.sa_sigaction(signal_number, info, context);
  if (previous_handler.sa_handler != SIG_DFL && previous_handler.sa_handler != SIG_IGN)
    return previous_handler.sa_handler(signal_number);
  struct sigaction fallback = {};
  fallback.sa_handler = SIG_DFL;
  sigaction(SIGBUS, &fallback, nullptr);  // the fault repeats and ends the process
}

void install_handler() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction action = {};
    action.sa_sigaction = on_bus_error;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous_handler) != 0)
      throw std::system_error(errno, std::generic_category(), "sigaction");
  });
}

// The slot now holding [begin, end), or -1 when all are taken.
int claim_slot(uintptr_t begin, uintptr_t end) {
  for (int i = 0; i < kSlots; ++i) {
    uintptr_t free = 0;
    if (slots[i].begin.compare_exchange_strong(free, begin, std::memory_order_acq_rel)) {
      slots[i].end.store(end, std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void release_slot(int i) {
  slots[i].end.store(0, std::memory_order_release);
  slots[i].begin.store(0, std::memory_order_release);
}

}  // namespace

extern "C" {

// `*tensor` = a new CPU byte tensor over bytes [offset, offset + length) of the open file `fd`, which
// must lie within the file. Mapped copy-on-write (writes stay in this process); unmapped when the
// tensor's storage is freed. Pages the file loses meanwhile read as zeros.
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
    static const int64_t page = sysconf(_SC_PAGESIZE);
    const int64_t start = offset / page * page;
    const size_t mapped = static_cast<size_t>(offset - start + length);
    install_handler();
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, start);
    if (base == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    const auto begin = reinterpret_cast<uintptr_t>(base);
    const int slot = claim_slot(begin, begin + mapped);
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

}  // extern "C"
