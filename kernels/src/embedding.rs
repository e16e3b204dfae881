//! Token embedding: a row gather forward, a scatter-add backward.
use tch::Tensor;

/// What backward needs: only the token ids (the output is not needed).
pub struct Saved {
    /// `[T]` int64 token ids.
    pub ids: Tensor,
}

/// # Shapes
/// - `weight`: `[V, D]`, `ids`: `[T]` int64 → `[T, D]`
pub fn forward(weight: &Tensor, ids: &Tensor) -> (Tensor, Saved) {
    let out = weight.index_select(0, ids);
    (out, Saved { ids: ids.shallow_clone() })
}

/// Gradient of the embedding table: rows of `grad_out` added at their token ids.
/// Repeated ids accumulate (index_add is deterministic on CPU).
pub fn backward(grad_out: &Tensor, saved: &Saved, vocab: i64) -> Tensor {
    let d = grad_out.size()[1];
    Tensor::zeros([vocab, d], (grad_out.kind(), grad_out.device())).index_add(0, &saved.ids, grad_out)
}
