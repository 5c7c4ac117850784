// libtorch's fused AdamW (`at::_fused_adamw_`, one pass over memory on CPU and CUDA), which tch
// does not bind. Tensors arrive as tch's `at::Tensor*`.
#include <ATen/ops/_fused_adamw.h>

#include "guard.h"

extern "C" {

// One AdamW step on one flat parameter buffer; `step` is a float tensor holding the step number
// (already incremented), as torch.optim.AdamW(fused=True) passes it.
int wizard_fused_adamw(void* param, void* grad, void* exp_avg, void* exp_avg_sq, void* step, double lr, double beta1,
                       double beta2, double weight_decay, double eps) {
  return wizard::guarded([&] {
    auto t = [](void* handle) { return *static_cast<at::Tensor*>(handle); };
    at::_fused_adamw_({t(param)}, {t(grad)}, {t(exp_avg)}, {t(exp_avg_sq)}, {}, {t(step)}, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}
}
