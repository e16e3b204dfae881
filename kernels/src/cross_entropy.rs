//! Next-token cross-entropy fused with the LM head, computed in token chunks so the
//! `[T, vocab]` logits never exist whole (at 128K tokens and a 128K vocabulary they would be
//! 64 GiB in float32). Labels equal to [`IGNORE_INDEX`] contribute nothing.
//!
//! Forward keeps only a float32 logsumexp per token; backward recomputes each chunk's logits,
//! which costs one more `[chunk, D] × [D, V]` product per chunk and saves `T × V` floats.
use tch::{Kind, Tensor};

use crate::accum_kind;

/// Label value that is excluded from the loss (PyTorch's and HF's convention).
pub const IGNORE_INDEX: i64 = -100;

pub struct Saved {
    /// `[T, D]` final hidden states (after the last norm).
    pub hidden: Tensor,
    /// `[T]` int64 target ids, or IGNORE_INDEX.
    pub labels: Tensor,
    /// `[T]` logsumexp of each token's logits in the accumulation dtype.
    pub lse: Tensor,
    /// Tokens per chunk.
    pub chunk: i64,
}

/// Sum of the per-token losses and the number of tokens that count.
pub struct LossSum {
    /// Scalar in the accumulation dtype (float32, or float64 for float64 inputs).
    pub sum: Tensor,
    pub count: i64,
}

fn chunks(t: i64, chunk: i64) -> impl Iterator<Item = (i64, i64)> {
    let chunk = chunk.max(1);
    (0..t).step_by(chunk as usize).map(move |s| (s, chunk.min(t - s)))
}

/// # Shapes
/// - `hidden`: `[T, D]`, `weight`: `[V, D]`, `labels`: `[T]` → scalar sum and count
pub fn forward(hidden: &Tensor, weight: &Tensor, labels: &Tensor, chunk: i64) -> (LossSum, Saved) {
    let t = hidden.size()[0];
    let acc = accum_kind(hidden.kind());
    let mut lses = Vec::new();
    let mut sum = Tensor::zeros([], (acc, hidden.device()));
    for (s, n) in chunks(t, chunk) {
        let logits = hidden.narrow(0, s, n).matmul(&weight.tr()).to_kind(acc); // [n, V]
        let lse = logits.logsumexp([1], false); // [n]
        let lab = labels.narrow(0, s, n);
        let valid = lab.ne(IGNORE_INDEX);
        let target = logits.gather(1, &lab.clamp_min(0).unsqueeze(1), false).squeeze_dim(1);
        sum += ((&lse - target) * valid.to_kind(acc)).sum(acc);
        lses.push(lse);
    }
    let lse = if lses.is_empty() { Tensor::zeros([0], (acc, hidden.device())) } else { Tensor::cat(&lses, 0) };
    let count = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
    let saved = Saved { hidden: hidden.shallow_clone(), labels: labels.shallow_clone(), lse, chunk };
    (LossSum { sum, count }, saved)
}

/// Greedy prediction (argmax of the logits) of every token, chunk by chunk: `[T]` int64.
pub fn argmax(hidden: &Tensor, weight: &Tensor, chunk: i64) -> Tensor {
    let t = hidden.size()[0];
    let parts: Vec<Tensor> = chunks(t, chunk).map(|(s, n)| hidden.narrow(0, s, n).matmul(&weight.tr()).argmax(1, false)).collect();
    if parts.is_empty() {
        Tensor::zeros([0], (Kind::Int64, hidden.device()))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// `grad_sum` is d(objective)/d(loss sum): `1/count` for a mean loss.
/// Returns `(grad_hidden [T, D], grad_weight [V, D] when asked for)`.
pub fn backward(grad_sum: f64, saved: &Saved, weight: &Tensor, need_weight_grad: bool) -> (Tensor, Option<Tensor>) {
    let h = &saved.hidden;
    let t = h.size()[0];
    let acc = accum_kind(h.kind());
    let mut dh = Vec::new();
    let mut dw = need_weight_grad.then(|| Tensor::zeros_like(weight).to_kind(acc));
    for (s, n) in chunks(t, saved.chunk) {
        let hc = h.narrow(0, s, n);
        let logits = hc.matmul(&weight.tr()).to_kind(acc);
        let lab = saved.labels.narrow(0, s, n);
        let valid = lab.ne(IGNORE_INDEX).to_kind(acc).unsqueeze(1);
        // d loss / d logits = softmax - onehot(label), zero for ignored tokens.
        let mut d = (logits - saved.lse.narrow(0, s, n).unsqueeze(1)).exp();
        let _ = d.scatter_add_(1, &lab.clamp_min(0).unsqueeze(1), &valid.neg());
        let d = (d * valid * grad_sum).to_kind(h.kind());
        dh.push(d.matmul(weight));
        if let Some(dw) = dw.as_mut() {
            *dw += d.tr().matmul(&hc).to_kind(acc);
        }
    }
    let dh = if dh.is_empty() { h.zeros_like() } else { Tensor::cat(&dh, 0) };
    (dh, dw.map(|w| w.to_kind(weight.kind())))
}
