//! LoRA linear (PEFT's definition): `y = x Wᵀ + b + s · B(A(dropout(x)))`, `s = alpha / rank`.
//! The base weight is frozen: backward never allocates a gradient for it.
use tch::{Kind, Tensor};

pub struct Saved {
    /// `[T, in]` the input (shared with whatever else reads it; not a copy).
    pub x: Tensor,
    /// `[T, in]` bool keep-mask of the dropout, when dropout is active.
    pub keep: Option<Tensor>,
    /// `[T, rank]` `A(dropout(x))`, the low-rank activation (small: rank ≪ in).
    pub xa: Tensor,
}

/// The adapter's hyper-parameters and its trainable pair.
pub struct Adapter<'a> {
    /// `[rank, in]`
    pub a: &'a Tensor,
    /// `[out, rank]`
    pub b: &'a Tensor,
    /// alpha / rank
    pub scale: f64,
    /// dropout probability on the adapter's input (training only).
    pub dropout: f64,
}

fn dropped(x: &Tensor, keep: Option<&Tensor>, p: f64) -> Tensor {
    match keep {
        Some(k) => x * k.to_kind(x.kind()) / (1.0 - p),
        None => x.shallow_clone(),
    }
}

/// # Shapes
/// - `x`: `[T, in]`, `weight`: `[out, in]`, `bias`: `[out]` → `[T, out]`
///
/// `train` enables dropout (its keep-mask is drawn from libtorch's generator, so a seeded run
/// repeats).
pub fn forward(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, ad: &Adapter, train: bool) -> (Tensor, Saved) {
    let keep = (train && ad.dropout > 0.0).then(|| draw_keep(&x.size(), (x.kind(), x.device()), ad.dropout));
    forward_with_keep(x, weight, bias, ad, keep)
}

/// The dropout keep-mask (`[T, in]` bool) for an input of this size and type, drawn from
/// libtorch's generator exactly as [`forward`] draws it.
pub fn draw_keep(size: &[i64], input: (Kind, tch::Device), p: f64) -> Tensor {
    Tensor::ones(size, input).bernoulli_float_(1.0 - p).to_kind(Kind::Bool)
}

/// [`forward`] with a given keep-mask (rows of one drawn for a longer sequence: token tiles,
/// recompute); `None` is no dropout.
pub fn forward_with_keep(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, ad: &Adapter, keep: Option<Tensor>) -> (Tensor, Saved) {
    // The adapter may be kept in a wider dtype than the base (float32 over bf16): compute it there.
    let xd = dropped(&x.to_kind(ad.a.kind()), keep.as_ref(), ad.dropout);
    let xa = xd.matmul(&ad.a.tr());
    // In place where it changes no value, so a step holds two `[T, out]` tensors here, not four.
    let mut low = xa.matmul(&ad.b.tr());
    low *= ad.scale;
    let mut y = crate::linear::apply(x, weight, bias);
    y += low.to_kind(y.kind());
    (y, Saved { x: x.shallow_clone(), keep, xa })
}

pub struct Grads {
    pub x: Tensor,
    pub a: Tensor,
    pub b: Tensor,
}

pub fn backward(grad_out: &Tensor, saved: &Saved, weight: &Tensor, ad: &Adapter) -> Grads {
    let dy = grad_out.to_kind(ad.a.kind());
    let gb = dy.tr().matmul(&saved.xa) * ad.scale; // [out, rank]
    let dxa = dy.matmul(ad.b) * ad.scale; // [T, rank]
    let xd = dropped(&saved.x.to_kind(ad.a.kind()), saved.keep.as_ref(), ad.dropout);
    let ga = dxa.tr().matmul(&xd); // [rank, in]
    // The low-rank term is added in place: two `[T, in]` tensors at once, not three.
    let mut dx = grad_out.matmul(weight);
    dx += dropped(&dxa.matmul(ad.a), saved.keep.as_ref(), ad.dropout).to_kind(grad_out.kind());
    Grads { x: dx, a: ga, b: gb }
}
