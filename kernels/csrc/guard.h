// The shim's one error channel: every entry point runs its body through `guarded`, which turns a C++
// exception into status -1 and a message that Rust reads with `wizard_last_error`.
#pragma once

#include <cstring>
#include <exception>
#include <string>

namespace wizard {

// One per thread, shared by every translation unit (an inline function's static is unique).
inline std::string& last_error() {
  thread_local std::string message;
  return message;
}

inline void copy_out(const std::string& text, char* buf, size_t len) {
  if (len == 0) return;
  size_t n = text.size() < len - 1 ? text.size() : len - 1;
  std::memcpy(buf, text.data(), n);
  buf[n] = '\0';
}

template <typename F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
  } catch (...) {
    last_error() = "unknown C++ exception";
  }
  return -1;
}

}  // namespace wizard
