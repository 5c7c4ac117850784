// libtorch's fused AdamW (`at::_fused_adamw_`, one pass over memory on CPU and CUDA), which tch
// does not bind. Tensors arrive as tch's `at::Tensor*`.
#include <ATen/ops/_fused_adamw.h>

#include <cstring>
#include <string>

namespace {
thread_local std::string optim_error;
}

extern "C" {

void wizard_optim_error(char* buf, size_t len) {
  if (len == 0) return;
  size_t n = optim_error.size() < len - 1 ? optim_error.size() : len - 1;
  std::memcpy(buf, optim_error.data(), n);
  buf[n] = '\0';
}

// One AdamW step on one flat parameter buffer; `step` is a float tensor holding the step number
// (already incremented), as torch.optim.AdamW(fused=True) passes it.
int wizard_fused_adamw(void* param, void* grad, void* exp_avg, void* exp_avg_sq, void* step, double lr, double beta1,
                       double beta2, double weight_decay, double eps) {
  try {
    auto t = [](void* handle) { return *static_cast<at::Tensor*>(handle); };
    at::_fused_adamw_({t(param)}, {t(grad)}, {t(exp_avg)}, {t(exp_avg_sq)}, {}, {t(step)}, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    optim_error = e.what();
  } catch (...) {
    optim_error = "unknown C++ exception";
  }
  return -1;
}
}
