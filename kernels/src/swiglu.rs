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
    // In place: no `[T, I]` temporary beside the result.
    let mut act = gate.silu();
    act *= up;
    (act, Saved { gate: gate.shallow_clone(), up: up.shallow_clone() })
}

/// Returns `(grad_gate, grad_up)`; silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
///
/// Element-wise products and sums in place (each the same IEEE operation as written out, so the
/// values are unchanged): σ and silu'(g) exist beside grad_up, then silu'(g) beside both results,
/// so one `[T, I]` tensor beyond the two results at any moment (what the planner counts).
pub fn backward(grad_out: &Tensor, saved: &Saved) -> (Tensor, Tensor) {
    let g = &saved.gate;
    let sig = g.sigmoid();
    // grad_up = grad_out · silu(g) = grad_out · (g·σ)
    let mut dup = g * &sig;
    dup *= grad_out;
    // silu'(g) = σ · (1 + g · (1 − σ))
    let mut dsilu = -&sig;
    dsilu += 1.0;
    dsilu *= g;
    dsilu += 1.0;
    dsilu *= &sig;
    drop(sig);
    // grad_gate = (grad_out · up) · silu'(g)
    let mut dgate = grad_out * &saved.up;
    dgate *= &dsilu;
    (dgate, dup)
}
