//! Dense projection `y = x Wᵀ + b` (bias optional: Qwen2's q/k/v have one).
use tch::Tensor;

/// What backward needs: the input. The weight is a parameter and is passed to backward.
pub struct Saved {
    /// `[T, in]`
    pub x: Tensor,
}

/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`, `bias`: `[out]` → `[T, out]`
pub fn forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> (Tensor, Saved) {
    (apply(x, weight, bias), Saved { x: x.shallow_clone() })
}

/// The forward computation alone, for recompute and evaluation.
pub fn apply(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let y = x.matmul(&weight.tr());
    match bias {
        Some(b) => y + b,
        None => y,
    }
}

/// Gradients of a linear layer. Frozen parameters (LoRA's base, say) get none, so no
/// `[out, in]` tensor is ever allocated for them.
pub struct Grads {
    pub x: Tensor,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

pub fn backward(grad_out: &Tensor, saved: &Saved, weight: &Tensor, need_weight_grad: bool, need_bias_grad: bool) -> Grads {
    Grads {
        x: grad_out.matmul(weight),
        weight: need_weight_grad.then(|| grad_out.tr().matmul(&saved.x)),
        bias: need_bias_grad.then(|| grad_out.sum_dim_intlist(0, false, grad_out.kind())),
    }
}
