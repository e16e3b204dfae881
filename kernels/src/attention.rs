//! Grouped-query causal attention through libtorch's fused kernels, with the backward called
//! explicitly so that the saved tensors (q, k, v, output, logsumexp) are ours to place.
//!
//! - CPU: `_scaled_dot_product_flash_attention_for_cpu` and its backward.
//! - CUDA: `_scaled_dot_product_efficient_attention` (memory-efficient, supports float32 too) and
//!   `_efficient_attention_backward`; both are in tch's generated API, so no C++ shim is needed
//!   for this pair.
//!
//! The fused kernels take as many key/value heads as query heads. Grouped-query attention runs
//! one kernel call per kv head: its `n_rep` query heads (query head h reads kv head h / n_rep, as
//! HF's `repeat_kv` has it) against that kv head broadcast to them (a stride-0 view), so no
//! `[T, heads, head_dim]` copy of k or v exists, nor of their gradients: each group's gradients
//! are summed into its kv head as they come. (The CPU flash backward's rounding depends on how
//! many heads a call has once a sequence spans several of its blocks, so this equals the former
//! expanded call to rounding; MHA keeps one call for all heads.) The logsumexp is the statistic that makes backward
//! possible without the [T, T] score matrix; it is saved beside the output.
use tch::{Device, Kind, Tensor};

use crate::KernelError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnConfig {
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Softmax scale; 1/sqrt(head_dim) for the supported models.
    pub scale: f64,
    /// Mistral-style sliding window: query i sees keys j with i - window < j ≤ i.
    pub sliding_window: Option<i64>,
}

/// Everything backward needs, token-major where it has a token axis.
pub struct Saved {
    /// `[T, heads, head_dim]` queries after RoPE.
    pub q: Tensor,
    /// `[T, kv_heads, head_dim]` keys after RoPE.
    pub k: Tensor,
    /// `[T, kv_heads, head_dim]`
    pub v: Tensor,
    /// `[T, heads, head_dim]` attention output (before o_proj).
    pub out: Tensor,
    /// `[heads, T']` float32 logsumexp of each query's scores; T' ≥ T (the CUDA kernel pads to 32).
    pub lse: Tensor,
    /// CUDA only: the RNG state the efficient kernel reports (unused without dropout, but its
    /// backward takes it).
    pub philox: Option<(Tensor, Tensor)>,
}

/// `[T, h, d]` → `[1, h, T, d]`, a view (memory stays token-major, which the kernels accept).
fn to_bhtd(x: &Tensor) -> Tensor {
    x.transpose(0, 1).unsqueeze(0)
}

/// How attention is split into kernel calls: one call for all heads when every query head has
/// its own kv head (MHA), else one call per kv head (`calls` = kv_heads, `q_heads` = n_rep).
#[derive(Debug, Clone, Copy)]
struct Calls {
    calls: i64,
    /// Query heads per call.
    q_heads: i64,
    /// Kv heads per call (1 under grouped-query attention, broadcast to `q_heads`).
    kv_heads: i64,
}

impl Calls {
    fn of(cfg: &AttnConfig) -> Calls {
        if cfg.heads == cfg.kv_heads {
            // One call: the CPU flash backward's accumulation order depends on how many heads a
            // call has, so MHA keeps the single call it always made (bit-identical results).
            Calls { calls: 1, q_heads: cfg.heads, kv_heads: cfg.kv_heads }
        } else {
            Calls { calls: cfg.kv_heads, q_heads: cfg.heads / cfg.kv_heads, kv_heads: 1 }
        }
    }

    /// Call `c`'s query heads and kv heads as `[1, heads, T, d]` views; a single kv head is
    /// broadcast to the call's query heads (stride 0, no copy).
    fn inputs(&self, q4: &Tensor, k4: &Tensor, v4: &Tensor, c: i64) -> (Tensor, Tensor, Tensor) {
        let s = k4.size();
        let kv = |x: &Tensor| {
            let x = x.narrow(1, c * self.kv_heads, self.kv_heads);
            if self.kv_heads == self.q_heads {
                x
            } else {
                x.expand([s[0], self.q_heads, s[2], s[3]], false)
            }
        };
        (q4.narrow(1, c * self.q_heads, self.q_heads), kv(k4), kv(v4))
    }
}

/// Additive mask for a sliding window, or None when the window does not bite (T ≤ window).
/// Materialises [T, T]: only for windowed models at lengths beyond their window.
fn window_mask(t: i64, cfg: &AttnConfig, kind: Kind, device: Device) -> Option<Tensor> {
    let w = cfg.sliding_window?;
    if t <= w {
        return None;
    }
    let i = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1);
    let j = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0);
    let allowed = j.le_tensor(&i).logical_and(&(&i - &j).lt(w));
    Some(Tensor::zeros([t, t], (kind, device)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY))
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig) -> Result<i64, KernelError> {
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    let t = qs.first().copied().unwrap_or(0);
    if qs != [t, cfg.heads, cfg.head_dim] || ks != [t, cfg.kv_heads, cfg.head_dim] || vs != ks {
        return Err(KernelError::shape(
            "attention",
            format!(
                "q {qs:?}, k {ks:?}, v {vs:?} do not match heads={} kv_heads={} head_dim={}",
                cfg.heads, cfg.kv_heads, cfg.head_dim
            ),
        ));
    }
    if cfg.kv_heads == 0 || cfg.heads % cfg.kv_heads != 0 {
        return Err(KernelError::shape("attention", format!("heads {} not a multiple of kv_heads {}", cfg.heads, cfg.kv_heads)));
    }
    Ok(t)
}

/// Causal attention over one sequence. Returns the output `[T, heads, head_dim]` and what
/// backward needs.
///
/// # Shapes
/// - `q`: `[T, heads, head_dim]`, `k`/`v`: `[T, kv_heads, head_dim]` → `[T, heads, head_dim]`
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig) -> Result<(Tensor, Saved), KernelError> {
    forward_packed(q, k, v, cfg, &[0, q.size().first().copied().unwrap_or(0)])
}

/// Returns `(grad_q, grad_k, grad_v)` in the forward inputs' shapes.
pub fn backward(grad_out: &Tensor, saved: &Saved, cfg: &AttnConfig) -> Result<(Tensor, Tensor, Tensor), KernelError> {
    let t = saved.q.size().first().copied().unwrap_or(0);
    backward_packed(grad_out, saved, cfg, &[0, t])
}

fn check_offsets(t: i64, cu_seqlens: &[i64]) -> Result<(), KernelError> {
    let ok = cu_seqlens.len() >= 2
        && cu_seqlens[0] == 0
        && *cu_seqlens.last().unwrap_or(&-1) == t
        && cu_seqlens.windows(2).all(|w| w[0] < w[1]);
    if ok {
        Ok(())
    } else {
        Err(KernelError::shape("attention", format!("document offsets {cu_seqlens:?} must rise strictly from 0 to T={t}")))
    }
}

/// Causal attention over several documents packed on the token axis: document `i` is tokens
/// `cu_seqlens[i]..cu_seqlens[i+1]` and attends only within itself. No `[T, T]` mask exists:
/// each document is its own kernel call on a slice (a view, no copy).
pub fn forward_packed(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig, cu_seqlens: &[i64]) -> Result<(Tensor, Saved), KernelError> {
    let t = check(q, k, v, cfg)?;
    check_offsets(t, cu_seqlens)?;
    if cu_seqlens.len() == 2 {
        return forward_one(q, k, v, cfg);
    }
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut philox = None;
    for w in cu_seqlens.windows(2) {
        let (s, n) = (w[0], w[1] - w[0]);
        let (o, sv) = forward_one(&q.narrow(0, s, n), &k.narrow(0, s, n), &v.narrow(0, s, n), cfg)?;
        outs.push(o);
        lses.push(sv.lse.narrow(1, 0, n)); // drop the CUDA kernel's padding
        philox = sv.philox;
    }
    let out = Tensor::cat(&outs, 0);
    let lse = Tensor::cat(&lses, 1);
    let saved = Saved { q: q.shallow_clone(), k: k.shallow_clone(), v: v.shallow_clone(), out: out.shallow_clone(), lse, philox };
    Ok((out, saved))
}

/// Backward of [`forward_packed`] with the same offsets.
pub fn backward_packed(grad_out: &Tensor, saved: &Saved, cfg: &AttnConfig, cu_seqlens: &[i64]) -> Result<(Tensor, Tensor, Tensor), KernelError> {
    let t = check(&saved.q, &saved.k, &saved.v, cfg)?;
    check_offsets(t, cu_seqlens)?;
    if cu_seqlens.len() == 2 {
        return backward_one(grad_out, saved, cfg);
    }
    // Each document's gradients are written into the whole-sequence ones as they come, so the
    // pieces never exist beside a concatenated copy.
    let (dq_all, dk_all, dv_all) = (saved.q.zeros_like(), saved.k.zeros_like(), saved.v.zeros_like());
    for w in cu_seqlens.windows(2) {
        let (s, n) = (w[0], w[1] - w[0]);
        let lse = saved.lse.narrow(1, s, n);
        // The CUDA backward expects its forward's padded logsumexp; pad back to a multiple of 32.
        let lse = match &saved.philox {
            Some(_) if n % 32 != 0 => lse.constant_pad_nd([0, 32 - n % 32]),
            _ => lse,
        };
        let part = Saved {
            q: saved.q.narrow(0, s, n),
            k: saved.k.narrow(0, s, n),
            v: saved.v.narrow(0, s, n),
            out: saved.out.narrow(0, s, n),
            lse,
            philox: saved.philox.as_ref().map(|(a, b)| (a.shallow_clone(), b.shallow_clone())),
        };
        let (dq, dk, dv) = backward_one(&grad_out.narrow(0, s, n), &part, cfg)?;
        for (all, piece) in [(&dq_all, dq), (&dk_all, dk), (&dv_all, dv)] {
            // A view: this writes into `all`.
            all.narrow(0, s, n).f_copy_(&piece).map_err(|source| KernelError::Torch { op: "attention backward", source })?;
        }
    }
    Ok((dq_all, dk_all, dv_all))
}

fn forward_one(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig) -> Result<(Tensor, Saved), KernelError> {
    let t = check(q, k, v, cfg)?;
    let calls = Calls::of(cfg);
    let (q4, k4, v4) = (to_bhtd(q), to_bhtd(k), to_bhtd(v));
    if cfg.sliding_window.is_some_and(|w| t > w) && q.device() != Device::Cpu {
        return Err(KernelError::shape("attention", format!("sliding window {:?} shorter than the sequence ({t}) is not supported on CUDA yet", cfg.sliding_window)));
    }
    let mask = window_mask(t, cfg, q.kind(), q.device());
    // One call per kv head, each group's output written into its heads of `out`.
    let out = q.empty_like();
    let mut lses = Vec::with_capacity(calls.calls as usize);
    let mut philox = None;
    for g in 0..calls.calls {
        let (qg, kg, vg) = calls.inputs(&q4, &k4, &v4, g);
        let (o, lse) = match q.device() {
            Device::Cpu => Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(&qg, &kg, &vg, 0.0, mask.is_none(), mask.as_ref(), cfg.scale)
                .map_err(KernelError::torch("attention forward (cpu flash)"))?,
            _ => {
                let (o, l, seed, offset) = Tensor::f_internal_scaled_dot_product_efficient_attention(&qg, &kg, &vg, None::<Tensor>, true, 0.0, true, cfg.scale)
                    .map_err(KernelError::torch("attention forward (cuda efficient)"))?;
                philox = Some((seed, offset));
                (o, l)
            }
        };
        out.narrow(1, g * calls.q_heads, calls.q_heads).f_copy_(&o.squeeze_dim(0).transpose(0, 1)).map_err(KernelError::torch("attention forward"))?;
        lses.push(lse.squeeze_dim(0));
    }
    let lse = if lses.len() == 1 { lses.pop().unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, q.device()))) } else { Tensor::cat(&lses, 0) };
    let saved = Saved { q: q.shallow_clone(), k: k.shallow_clone(), v: v.shallow_clone(), out: out.shallow_clone(), lse, philox };
    Ok((out, saved))
}

fn backward_one(grad_out: &Tensor, saved: &Saved, cfg: &AttnConfig) -> Result<(Tensor, Tensor, Tensor), KernelError> {
    let t = check(&saved.q, &saved.k, &saved.v, cfg)?;
    let mask = match &saved.philox {
        None => window_mask(t, cfg, saved.q.kind(), saved.q.device()),
        Some(_) => None,
    };
    let (dk, dv) = (saved.k.empty_like(), saved.v.empty_like());
    let dq = flash_backward(grad_out, saved, mask.is_none(), mask.as_ref(), cfg, KeyGrads::Write(&dk, &dv))?;
    Ok((dq, dk, dv))
}

/// Where [`flash_backward`] puts the key and value gradients (`[m, kv_heads, d]` each).
#[derive(Clone, Copy)]
enum KeyGrads<'a> {
    /// Written over (the whole-sequence backward: every key's gradient comes from one call).
    Write(&'a Tensor, &'a Tensor),
    /// Added to, in their own dtype (a query tile's share, summed over tiles in float32): no
    /// key-length gradient exists beside them but one kv group's kernel output.
    Add(&'a Tensor, &'a Tensor),
}

/// The fused backward over `saved.q` (`[n, heads, d]`) against `saved.k`/`saved.v` (`[m,
/// kv_heads, d]`, m ≥ n): `causal` is the top-left diagonal (square blocks), `mask` an additive
/// `[n, m]` mask instead. `saved.out` and `saved.lse` are the forward's for these queries over
/// all the keys they attend to: with them, the gradients over any subset of those keys are that
/// subset's exact share (the kernel rebuilds the probabilities from the logsumexp).
///
/// Returns dq; dk and dv go where `key_grads` says.
fn flash_backward(grad_out: &Tensor, saved: &Saved, causal: bool, mask: Option<&Tensor>, cfg: &AttnConfig, key_grads: KeyGrads) -> Result<Tensor, KernelError> {
    let (n, m) = (saved.q.size()[0], saved.k.size()[0]);
    let calls = Calls::of(cfg);
    let (q4, k4, v4) = (to_bhtd(&saved.q), to_bhtd(&saved.k), to_bhtd(&saved.v));
    let (go4, out4) = (to_bhtd(&grad_out.contiguous()), to_bhtd(&saved.out));
    // Each group's gradients go into the whole-sequence ones as they come; a kv head's is the
    // sum over its query heads.
    let dq = saved.q.empty_like();
    for g in 0..calls.calls {
        let (qg, kg, vg) = calls.inputs(&q4, &k4, &v4, g);
        let heads = |x: &Tensor| x.narrow(1, g * calls.q_heads, calls.q_heads);
        let lse = saved.lse.narrow(0, g * calls.q_heads, calls.q_heads).unsqueeze(0);
        let (dqg, dkg, dvg) = match &saved.philox {
            None => Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(&heads(&go4), &qg, &kg, &vg, &heads(&out4), &lse, 0.0, causal, mask, cfg.scale)
                .map_err(KernelError::torch("attention backward (cpu flash)"))?,
            Some((seed, offset)) => {
                // _efficient_attention_backward takes [B, T, H, D] tensors.
                let bthd = |x: &Tensor| x.transpose(1, 2);
                // The kernel takes the output's row stride to be heads·head_dim of this call: a
                // group's slice of it (and of its gradient) must be made dense.
                let (go, out) = (bthd(&heads(&go4)).contiguous(), bthd(&heads(&out4)).contiguous());
                let (dq, dk, dv, _dbias) = Tensor::f_internal_efficient_attention_backward(
                    &go,
                    &bthd(&qg),
                    &bthd(&kg),
                    &bthd(&vg),
                    None::<Tensor>,
                    &out,
                    None::<Tensor>,
                    None::<Tensor>,
                    n,
                    m,
                    &lse,
                    0.0,
                    seed,
                    offset,
                    if causal { 1 } else { 0 }, // causal: the diagonal from the top left
                    false,
                    cfg.scale,
                    None,
                    None,
                    false,
                )
                .map_err(KernelError::torch("attention backward (cuda efficient)"))?;
                (bthd(&dq), bthd(&dk), bthd(&dv))
            }
        };
        // [1, heads, T, d] → [T, heads, d]; a broadcast kv head's gradient is the sum over the
        // call's query heads.
        let tok = |x: &Tensor| x.squeeze_dim(0).transpose(0, 1);
        let kv = |x: &Tensor| if calls.kv_heads == calls.q_heads { x.shallow_clone() } else { x.sum_dim_intlist(1, true, x.kind()) };
        dq.narrow(1, g * calls.q_heads, calls.q_heads).f_copy_(&tok(&dqg)).map_err(KernelError::torch("attention backward"))?;
        let group = |x: &Tensor| x.narrow(1, g * calls.kv_heads, calls.kv_heads);
        match key_grads {
            KeyGrads::Write(dk, dv) => {
                group(dk).f_copy_(&tok(&kv(&dkg))).map_err(KernelError::torch("attention backward"))?;
                group(dv).f_copy_(&tok(&kv(&dvg))).map_err(KernelError::torch("attention backward"))?;
            }
            KeyGrads::Add(dk, dv) => {
                let _ = group(dk).f_add_(&tok(&kv(&dkg))).map_err(KernelError::torch("attention backward"))?;
                let _ = group(dv).f_add_(&tok(&kv(&dvg))).map_err(KernelError::torch("attention backward"))?;
            }
        }
    }
    Ok(dq)
}

/// One query chunk's share of a causal attention backward: the chunk's queries are rows `[a, a+n)`
/// of a document whose keys are `k`, `v` up to the chunk's end (`[m, kv_heads, d]`, m = a − start
/// + n, the document's first row at key 0). `out`, `grad_out` (`[n, heads, d]`) and `lse`
/// (`[heads, n]`, the forward's) are the chunk's rows. The gradients of keys before the chunk
/// come from a non-causal call, those of the chunk's own keys from a causal (square) one: no
/// `[n, m]` mask, and backward holds one chunk of q, its output and gradients at a time.
///
/// Returns the chunk's `dq`; the key and value gradients are added to `dk`, `dv` (`[m, kv_heads,
/// d]`, any floating dtype: float32 sums bf16 shares without loss).
#[allow(clippy::too_many_arguments)]
pub fn backward_query_chunk(grad_out: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, philox: Option<&(Tensor, Tensor)>, cfg: &AttnConfig, dk: &Tensor, dv: &Tensor) -> Result<Tensor, KernelError> {
    let (n, m) = (q.size().first().copied().unwrap_or(0), k.size().first().copied().unwrap_or(0));
    if q.size() != [n, cfg.heads, cfg.head_dim] || k.size() != [m, cfg.kv_heads, cfg.head_dim] || v.size() != k.size() || dk.size() != k.size() || dv.size() != k.size() || m < n || lse.size().get(1) != Some(&n) {
        return Err(KernelError::shape("attention chunk backward", format!("q {:?}, k {:?}, v {:?}, dk {:?}, lse {:?} for heads={} kv_heads={} head_dim={}", q.size(), k.size(), v.size(), dk.size(), lse.size(), cfg.heads, cfg.kv_heads, cfg.head_dim)));
    }
    let off = m - n; // keys before the chunk's diagonal
    // The CUDA backward takes its forward's logsumexp padded to a multiple of 32 queries.
    let lse = match philox {
        Some(_) if n % 32 != 0 => lse.constant_pad_nd([0, 32 - n % 32]),
        _ => lse.shallow_clone(),
    };
    let against = |from: i64, len: i64| Saved {
        q: q.shallow_clone(),
        k: k.narrow(0, from, len),
        v: v.narrow(0, from, len),
        out: out.shallow_clone(),
        lse: lse.shallow_clone(),
        philox: philox.map(|(a, b)| (a.shallow_clone(), b.shallow_clone())),
    };
    let into = |from: i64, len: i64| (dk.narrow(0, from, len), dv.narrow(0, from, len));
    if let Some(w) = cfg.sliding_window.filter(|&w| off + n > w) {
        // A window that bites: query i (key index off + i) sees keys j with off + i - w < j ≤ off + i;
        // only keys from off - w + 1 on can be seen, so the mask is [n, n + w - 1] at most.
        if philox.is_some() {
            return Err(KernelError::shape("attention", format!("sliding window {w} shorter than the sequence is not supported on CUDA yet")));
        }
        let lo = (off - w + 1).max(0);
        let i = Tensor::arange_start(off, off + n, (Kind::Int64, q.device())).unsqueeze(1);
        let j = Tensor::arange_start(lo, m, (Kind::Int64, q.device())).unsqueeze(0);
        let allowed = j.le_tensor(&i).logical_and(&(&i - &j).lt(w));
        let mask = Tensor::zeros([n, m - lo], (q.kind(), q.device())).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        let (dk, dv) = into(lo, m - lo);
        return flash_backward(grad_out, &against(lo, m - lo), false, Some(&mask), cfg, KeyGrads::Add(&dk, &dv));
    }
    let (dk_own, dv_own) = into(off, n);
    let dq = flash_backward(grad_out, &against(off, n), true, None, cfg, KeyGrads::Add(&dk_own, &dv_own))?;
    if off == 0 {
        return Ok(dq);
    }
    let (dk_before, dv_before) = into(0, off);
    let dq_before = flash_backward(grad_out, &against(0, off), false, None, cfg, KeyGrads::Add(&dk_before, &dv_before))?;
    Ok(dq_before + dq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The former implementation: k/v expanded to every query head (HF's `repeat_kv`) in one call.
    fn expanded(q: &Tensor, k: &Tensor, v: &Tensor, go: &Tensor, cfg: &AttnConfig) -> (Tensor, Tensor, Tensor, Tensor) {
        let n_rep = cfg.heads / cfg.kv_heads;
        let rep = |x: &Tensor| {
            let s = x.size();
            x.unsqueeze(2).expand([s[0], s[1], n_rep, s[2], s[3]], false).reshape([s[0], s[1] * n_rep, s[2], s[3]])
        };
        let (q4, k4, v4) = (to_bhtd(q), rep(&to_bhtd(k)), rep(&to_bhtd(v)));
        let t = q.size()[0];
        let mask = window_mask(t, cfg, q.kind(), q.device());
        let (o, l) = Tensor::internal_scaled_dot_product_flash_attention_for_cpu(&q4, &k4, &v4, 0.0, mask.is_none(), mask.as_ref(), cfg.scale);
        let (dq, dk, dv) = Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(&to_bhtd(&go.contiguous()), &q4, &k4, &v4, &o, &l, 0.0, mask.is_none(), mask.as_ref(), cfg.scale);
        let back = |x: &Tensor| x.squeeze_dim(0).transpose(0, 1).contiguous();
        let red = |g: &Tensor| {
            let s = g.size();
            back(&g.reshape([s[0], s[1] / n_rep, n_rep, s[2], s[3]]).sum_dim_intlist(2, false, g.kind()))
        };
        (back(&o), back(&dq), red(&dk), red(&dv))
    }

    #[test]
    fn one_call_per_kv_group_equals_the_expanded_call() {
        tch::manual_seed(7);
        for (h, kv, d, t, window) in [(8, 2, 64, 77, None), (6, 3, 32, 130, Some(40)), (4, 4, 16, 33, None), (12, 1, 64, 50, None), (4, 4, 32, 2550, None), (8, 2, 32, 2550, None)] {
            for kind in [Kind::Float, Kind::Double] {
                let cfg = AttnConfig { heads: h, kv_heads: kv, head_dim: d, scale: 1.0 / (d as f64).sqrt(), sliding_window: window };
                let q = Tensor::randn([t, h, d], (kind, Device::Cpu));
                let k = Tensor::randn([t, kv, d], (kind, Device::Cpu));
                let v = Tensor::randn([t, kv, d], (kind, Device::Cpu));
                let go = Tensor::randn([t, h, d], (kind, Device::Cpu));
                let (o, saved) = forward(&q, &k, &v, &cfg).unwrap();
                let (dq, dk, dv) = backward(&go, &saved, &cfg).unwrap();
                let (o2, dq2, dk2, dv2) = expanded(&q, &k, &v, &go, &cfg);
                for (name, a, b) in [("out", &o, &o2), ("dq", &dq, &dq2), ("dk", &dk, &dk2), ("dv", &dv, &dv2)] {
                    let diff = (a - b).abs().max().double_value(&[]);
                    // The CPU flash backward accumulates in an order that depends on how many
                    // heads a call has once a sequence spans several of its blocks: beyond that,
                    // equal to rounding (MHA keeps its single call, so stays bit-identical).
                    let exact = kv == h || t < 256 || name == "out";
                    let tol = if kind == Kind::Double { 1e-12 } else { 1e-5 } * b.abs().max().double_value(&[]).max(1.0);
                    assert!(if exact { a.equal(b) } else { diff <= tol }, "h={h} kv={kv} d={d} t={t} {kind:?}: {name} differs by {diff}");
                }
            }
        }
    }

    #[test]
    fn query_chunks_sum_to_the_whole_backward() {
        tch::manual_seed(3);
        for (h, kv, d, t, window, chunk) in [(8, 2, 16, 100, None, 32), (4, 4, 16, 77, None, 10), (6, 3, 16, 90, Some(20), 16), (4, 1, 8, 50, Some(7), 50), (4, 2, 8, 40, None, 1)] {
            let cfg = AttnConfig { heads: h, kv_heads: kv, head_dim: d, scale: 1.0 / (d as f64).sqrt(), sliding_window: window };
            let opts = (Kind::Double, Device::Cpu);
            let (q, k, v, go) = (Tensor::randn([t, h, d], opts), Tensor::randn([t, kv, d], opts), Tensor::randn([t, kv, d], opts), Tensor::randn([t, h, d], opts));
            let (o, saved) = forward(&q, &k, &v, &cfg).unwrap();
            let (dq, dk, dv) = backward(&go, &saved, &cfg).unwrap();
            let (dq2, dk2, dv2) = (q.zeros_like(), k.zeros_like(), v.zeros_like());
            for a in (0..t).step_by(chunk as usize) {
                let n = chunk.min(t - a);
                let dqc = backward_query_chunk(&go.narrow(0, a, n), &q.narrow(0, a, n), &k.narrow(0, 0, a + n), &v.narrow(0, 0, a + n), &o.narrow(0, a, n), &saved.lse.narrow(1, a, n), None, &cfg, &dk2.narrow(0, 0, a + n), &dv2.narrow(0, 0, a + n)).unwrap();
                dq2.narrow(0, a, n).copy_(&dqc);
            }
            for (name, a, b) in [("dq", &dq2, &dq), ("dk", &dk2, &dk), ("dv", &dv2, &dv)] {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff <= 1e-12 * b.abs().max().double_value(&[]), "h={h} kv={kv} t={t} window={window:?} chunk={chunk}: {name} differs by {diff}");
            }
        }
    }
}
