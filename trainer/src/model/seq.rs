//! Sequence parallelism (DeepSpeed-Ulysses): one sequence split over the `P` ranks of a group.
//!
//! Rank r holds tokens `[r·T/P, (r+1)·T/P)` of every token-local tensor (norms, projections,
//! MLP, loss), so its [`crate::model::block::BlockSaved`] and its activation store hold its shard
//! only. Attention needs every token: an all-to-all turns q, k and v from "my tokens, all heads"
//! into "all tokens, my heads" ([`SeqParallel::to_heads`]), the unchanged attention kernels run on
//! `heads / P` heads of the whole sequence, and the inverse all-to-all ([`SeqParallel::to_tokens`])
//! brings the output back. Backward: the output gradient (and the output, which is stored in the
//! token layout that o_proj reads) go to heads, the attention backward runs, and q, k and v's
//! gradients come back to tokens.
//!
//! A sequence whose length does not divide by P is padded at its end to `P·⌈T/P⌉` tokens: the
//! padding is a document of its own (it attends only to itself) and its labels are ignored, so
//! it never reaches the loss or a gradient. KV heads that do not divide by P are repeated
//! ([`kv_copies`]) until they do.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::Tensor;

use crate::error::{Result, TrainerError};

/// This rank's place in its sequence-parallel group and the group's process group.
pub struct SeqParallel {
    pub rank: usize,
    pub size: usize,
    group: Arc<dist::ProcessGroup>,
    /// Where the group's own small tensors live (NCCL takes only CUDA tensors).
    on: tch::Device,
    /// Bytes this rank has sent by all-to-all, and nanoseconds spent in them (for metrics).
    sent: AtomicU64,
    nanos: AtomicU64,
}

/// How many times each KV head is repeated so that `P` ranks get whole groups of query heads
/// with their KV heads: the least `f` with `kv_heads·f` divisible by `p`. Errors unless the query
/// heads divide by `p` and by `kv_heads·f`.
pub fn kv_copies(heads: i64, kv_heads: i64, p: i64) -> std::result::Result<i64, String> {
    if p < 1 || heads % p != 0 {
        return Err(format!("{heads} attention heads do not divide over {p} ranks (each rank attends with heads / P of them)"));
    }
    let f = p / gcd(kv_heads, p);
    if heads % (kv_heads * f) != 0 {
        return Err(format!("{kv_heads} KV heads repeated {f}× to divide over {p} ranks do not group {heads} query heads"));
    }
    Ok(f)
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The token range of one rank's shard of a sequence of `tokens` (before padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Tokens per rank, `⌈T/P⌉`.
    pub tokens: i64,
    /// This rank's first token.
    pub start: i64,
    /// `P·⌈T/P⌉`: the sequence with its padding.
    pub padded: i64,
}

/// Rank `rank` of `p`'s shard of `tokens`.
pub fn shard(tokens: i64, rank: usize, p: usize) -> Shard {
    let p = p as i64;
    let per = (tokens + p - 1) / p;
    Shard { tokens: per, start: rank as i64 * per, padded: per * p }
}

impl SeqParallel {
    /// This rank's place in `group`, whose collectives take tensors on `on`.
    pub fn new(group: Arc<dist::ProcessGroup>, on: tch::Device) -> SeqParallel {
        SeqParallel { rank: group.rank(), size: group.size(), group, on, sent: AtomicU64::new(0), nanos: AtomicU64::new(0) }
    }

    pub fn shard(&self, tokens: i64) -> Shard {
        shard(tokens, self.rank, self.size)
    }

    fn exchange(&self, x: &Tensor) -> Result<Tensor> {
        let t0 = Instant::now();
        let out = self.group.all_to_all(x).map_err(|source| TrainerError::Collective { rank: self.rank, source })?;
        // A rank keeps its own part: (P-1)/P of the tensor leaves it.
        let bytes = (x.numel() * x.kind().elt_size_in_bytes()) as u64;
        self.sent.fetch_add(bytes / self.size as u64 * (self.size as u64 - 1), Ordering::Relaxed);
        self.nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Bytes this rank has sent by all-to-all so far and the seconds they took (on CUDA the
    /// seconds include waiting for the kernels that made the tensors).
    pub fn traffic(&self) -> (u64, f64) {
        (self.sent.load(Ordering::Relaxed), self.nanos.load(Ordering::Relaxed) as f64 * 1e-9)
    }

    /// "My tokens, all heads" to "all tokens, my heads".
    ///
    /// # Shapes
    /// - `x`: `[T/P, n, d]` → `[T, n/P, d]` (this rank's heads `[r·n/P, (r+1)·n/P)`)
    pub fn to_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (p, s) = (self.size as i64, x.size());
        let (t, n, d) = (s[0], s[1], s[2]);
        // Part j of the all-to-all's input goes to rank j: my tokens of rank j's heads.
        let parts = x.view([t, p, n / p, d]).permute([1, 0, 2, 3]).contiguous(); // [P, T/P, n/P, d]
                                                                                 // Part j of its output came from rank j: rank j's tokens of my heads, in token order.
        Ok(self.exchange(&parts)?.view([p * t, n / p, d]))
    }

    /// The inverse of [`SeqParallel::to_heads`].
    ///
    /// # Shapes
    /// - `x`: `[T, n/P, d]` → `[T/P, n, d]`
    pub fn to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (p, s) = (self.size as i64, x.size());
        let (t, n, d) = (s[0] / p, s[1], s[2]);
        let back = self.exchange(&x.contiguous().view([p, t, n, d]))?; // part j: my tokens of rank j's heads
        Ok(back.permute([1, 0, 2, 3]).contiguous().view([t, p * n, d]))
    }

    /// Sums a number over the group (an evaluation's loss).
    pub fn sum_f64(&self, x: f64) -> Result<f64> {
        Ok(self.summed(Tensor::from_slice(&[x]))?.double_value(&[0]))
    }

    /// A one-element tensor summed over the group.
    fn summed(&self, t: Tensor) -> Result<Tensor> {
        let t = t.to_device(self.on);
        self.group.all_reduce(&t, dist::ReduceOp::Sum).map_err(|source| TrainerError::Collective { rank: self.rank, source })?;
        Ok(t)
    }

    /// Every rank's rows of `x` (`[T/P, ...]`) in token order: `[T, ...]` on every rank.
    pub fn gather_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let device = x.device();
        let all = self.group.all_gather(&x.to_device(self.on)).map_err(|source| TrainerError::Collective { rank: self.rank, source })?;
        Ok(all.to_device(device))
    }

    /// Sums a count over the group (a loss's token count when no gradient scale is given).
    pub fn sum_i64(&self, x: i64) -> Result<i64> {
        Ok(self.summed(Tensor::from_slice(&[x]))?.int64_value(&[0]))
    }
}

/// Repeats each KV head `f` times (`[T, kv, d]` → `[T, kv·f, d]`, copies of a head adjacent), so
/// that query head h still meets KV head `h / (heads / kv)`.
pub fn repeat_kv(x: &Tensor, f: i64) -> Tensor {
    if f == 1 {
        return x.shallow_clone();
    }
    x.repeat_interleave_self_int(f, 1, None)
}

/// The gradient of [`repeat_kv`]: the copies' gradients summed (`[T, kv·f, d]` → `[T, kv, d]`).
pub fn sum_kv_copies(dx: &Tensor, f: i64) -> Tensor {
    if f == 1 {
        return dx.shallow_clone();
    }
    let s = dx.size();
    dx.view([s[0], s[1] / f, f, s[2]]).sum_dim_intlist(2, false, dx.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_heads_are_repeated_until_they_divide() {
        assert_eq!(kv_copies(32, 8, 8), Ok(1));
        assert_eq!(kv_copies(32, 8, 4), Ok(1));
        assert_eq!(kv_copies(8, 2, 4), Ok(2));
        assert_eq!(kv_copies(28, 4, 7), Ok(7));
        assert_eq!(kv_copies(12, 4, 8).unwrap_err(), "12 attention heads do not divide over 8 ranks (each rank attends with heads / P of them)");
        assert!(kv_copies(12, 3, 6).is_ok()); // 3 kv heads ×2 = 6 groups of 2 query heads
        assert!(kv_copies(12, 8, 4).is_err_and(|e| e.contains("do not group")));
    }

    #[test]
    fn shards_cover_the_padded_sequence() {
        assert_eq!(shard(10, 0, 4), Shard { tokens: 3, start: 0, padded: 12 });
        assert_eq!(shard(10, 3, 4), Shard { tokens: 3, start: 9, padded: 12 });
        assert_eq!(shard(8, 1, 2), Shard { tokens: 4, start: 4, padded: 8 });
    }

    #[test]
    fn repeated_kv_heads_sum_back() {
        let x = Tensor::arange(12, (tch::Kind::Double, tch::Device::Cpu)).view([2, 3, 2]);
        let r = repeat_kv(&x, 2);
        assert_eq!(r.size(), [2, 6, 2]);
        assert_eq!(r.narrow(1, 1, 1), x.narrow(1, 0, 1));
        assert_eq!(sum_kv_copies(&r, 2), &x * 2.0);
    }
}
