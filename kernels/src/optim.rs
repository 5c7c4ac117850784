//! libtorch's fused AdamW kernel (`at::_fused_adamw_`), which tch does not bind.
use tch::Tensor;

use crate::ffi::{self, check};
use crate::KernelError;

/// AdamW hyper-parameters for one call.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Denominator epsilon.
    pub eps: f64,
}

/// Updates `param`, `exp_avg` and `exp_avg_sq` in place (all the same shape and dtype as `grad`);
/// `step` is a one-element float tensor with the 1-based step number.
pub fn fused_adamw(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    step: &Tensor,
    hp: AdamWStep,
) -> Result<(), KernelError> {
    // SAFETY: the handles are live tch tensors for the duration of the call; the kernel writes only
    // into param and the two moments, which the caller passes as tensors it owns.
    let status = unsafe {
        ffi::wizard_fused_adamw(
            ffi::tensor(param),
            ffi::tensor(grad),
            ffi::tensor(exp_avg),
            ffi::tensor(exp_avg_sq),
            ffi::tensor(step),
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
        )
    };
    check(status, "fused AdamW")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// One fused step must equal AdamW written out op by op.
    #[test]
    fn fused_step_matches_the_formula() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let (param, grad) = (Tensor::randn([1000], opts), Tensor::randn([1000], opts));
        let (m, v) = (Tensor::randn([1000], opts) * 0.1, Tensor::rand([1000], opts) * 0.01);
        let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, weight_decay: 0.1, eps: 1e-8 };
        let step = 3.0;
        let expected_m = &m * hp.beta1 + &grad * (1.0 - hp.beta1);
        let expected_v = &v * hp.beta2 + grad.square() * (1.0 - hp.beta2);
        let denom = (&expected_v / (1.0 - hp.beta2.powf(step))).sqrt() + hp.eps;
        let expected =
            &param * (1.0 - hp.lr * hp.weight_decay) - (&expected_m / denom) * (hp.lr / (1.0 - hp.beta1.powf(step)));
        let (p, m2, v2) = (param.copy(), m.copy(), v.copy());
        fused_adamw(&p, &grad, &m2, &v2, &Tensor::from_slice(&[step as f32]), hp).unwrap();
        for (got, want) in [(&p, &expected), (&m2, &expected_m), (&v2, &expected_v)] {
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{diff}");
        }
    }
}
