//! Rows of a token-major tensor taken out and put back: token sparsity runs a layer's attention on
//! the kept tokens only (`rows`), and adds its output back into the residual stream of every token
//! (`add_rows`: a dropped token's attention output is zero).
use tch::Tensor;

/// Rows `idx` of `x`, in `idx`'s order.
///
/// # Shapes
/// - `x`: `[T, ...]`, `idx`: `[K]` int64 → `[K, ...]`
pub fn rows(x: &Tensor, idx: &Tensor) -> Tensor {
    x.index_select(0, idx)
}

/// The gradient of [`rows`]: `dy`'s rows at `idx` in a zero `[t, ...]` (indices distinct).
///
/// # Shapes
/// - `dy`: `[K, ...]` → `[t, ...]`
pub fn rows_backward(dy: &Tensor, idx: &Tensor, t: i64) -> Tensor {
    let mut shape = dy.size();
    shape[0] = t;
    Tensor::zeros(shape.as_slice(), (dy.kind(), dy.device())).index_add(0, idx, dy)
}

/// `x` with `y`'s rows added into rows `idx` (the others unchanged). Its gradient is the output's
/// for `x` and [`rows`] of it for `y`.
///
/// # Shapes
/// - `x`: `[T, ...]`, `y`: `[K, ...]`, `idx`: `[K]` int64 → `[T, ...]`
pub fn add_rows(x: &Tensor, idx: &Tensor, y: &Tensor) -> Tensor {
    x.index_add(0, idx, y)
}
