// Tensors over a range of a file, mapped instead of read: the pages the kernel already holds for the
// file become the tensor's, with no copy into new memory (which in a VM costs more than the read).
#include <ATen/ATen.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>

#include "guard.h"

extern "C" {

// `*tensor` = a new CPU byte tensor over bytes [offset, offset + length) of the open file `fd`, which
// must lie within the file. Mapped copy-on-write (writes stay in this process); unmapped when the
// tensor's storage is freed.
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
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, start);
    if (base == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    // Whatever of it is not in memory yet is read ahead now, not a page at each first touch.
    madvise(base, mapped, MADV_WILLNEED);
    auto unmap = [base, mapped](void*) { munmap(base, mapped); };
    *tensor = new at::Tensor(at::from_blob(static_cast<char*>(base) + (offset - start), {length}, unmap, at::kByte));
  });
}

}  // extern "C"
