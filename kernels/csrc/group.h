// A c10d group as the shim hands it to Rust, and the TCPStore rendezvous every engine starts from.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "guard.h"

#include <chrono>
#include <string>

struct WizardGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

// A collective in flight; the Work holds its tensors alive.
struct WizardWork {
  c10::intrusive_ptr<c10d::Work> work;
};

namespace wizard {

// Rank 0 hosts the store at host:port and waits for the others to connect.
inline c10::intrusive_ptr<c10d::Store> rendezvous(const char* host, int port, int rank, int size, long timeout_ms) {
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = rank == 0;
  options.numWorkers = size;
  options.waitWorkers = true;
  options.timeout = std::chrono::milliseconds(timeout_ms);
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
}

}  // namespace wizard
