//! RMSNorm as Llama/Qwen2/Mistral define it: statistics in float32 (float64 stays float64),
//! then `weight * x_hat.to(input_dtype)`.
use tch::Tensor;

use crate::accum_kind;

/// What backward needs. `rstd` is tiny (one scalar a token); `x_hat` is recomputed from it.
pub struct Saved {
    /// `[T, D]` the input.
    pub x: Tensor,
    /// `[T, 1]` 1/sqrt(mean(x²)+eps) in the accumulation dtype.
    pub rstd: Tensor,
}

/// # Shapes
/// - `x`: `[T, D]`, `weight`: `[D]` → `[T, D]`
pub fn forward(x: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Saved) {
    let xf = x.to_kind(accum_kind(x.kind()));
    let rstd = (xf.square().mean_dim(-1, true, None) + eps).rsqrt();
    let y = weight * (&xf * &rstd).to_kind(x.kind());
    (y, Saved { x: x.shallow_clone(), rstd })
}

/// Returns `(grad_x, grad_weight)`; `grad_weight` is `None` when the weight is frozen.
pub fn backward(grad_out: &Tensor, saved: &Saved, weight: &Tensor, need_weight_grad: bool) -> (Tensor, Option<Tensor>) {
    let acc = accum_kind(saved.x.kind());
    let x_hat = saved.x.to_kind(acc) * &saved.rstd;
    let dy = grad_out.to_kind(acc);
    let grad_w = need_weight_grad.then(|| {
        // x_hat is rounded to the input dtype in forward before the weight multiplies it.
        (&dy * x_hat.to_kind(saved.x.kind()).to_kind(acc)).sum_dim_intlist(0, false, acc).to_kind(weight.kind())
    });
    let dx_hat = dy * weight.to_kind(acc);
    let dot = (&dx_hat * &x_hat).mean_dim(-1, true, None);
    let grad_x = (&saved.rstd * (dx_hat - x_hat * dot)).to_kind(saved.x.kind());
    (grad_x, grad_w)
}
