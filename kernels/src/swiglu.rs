//! The SwiGLU gate `silu(gate) * up` of the Llama MLP (`down(silu(gate(x)) * up(x))`).
//! The projections are [`crate::linear`]; this op is the element-wise part between them.
use tch::Tensor;

pub struct Saved {
    /// `[T, I]` gate projection output.
    pub gate: Tensor,
    /// `[T, I]` up projection output.
    pub up: Tensor,
}

/// # Shapes
/// - `gate`, `up`: `[T, I]` → `[T, I]`
pub fn forward(gate: &Tensor, up: &Tensor) -> (Tensor, Saved) {
    (gate.silu() * up, Saved { gate: gate.shallow_clone(), up: up.shallow_clone() })
}

/// Returns `(grad_gate, grad_up)`; silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
pub fn backward(grad_out: &Tensor, saved: &Saved) -> (Tensor, Tensor) {
    let sig = saved.gate.sigmoid();
    let silu = &saved.gate * &sig;
    let dsilu = &sig * (sig.ones_like() + &saved.gate * (sig.ones_like() - &sig));
    (grad_out * &saved.up * dsilu, grad_out * silu)
}
