//! Contextual token sparsity (LeMo / JENGA): in a sparse layer only the informative token blocks
//! take part in attention. Tokens are grouped in blocks of `block` (never crossing a document
//! boundary); a scorer rates every block from the layer's q and k; each document keeps its first
//! block (the attention sink) and its best-rated others up to `keep` of its blocks. The kept
//! tokens' q, k, v run causal attention over the compacted sequence (RoPE at their original
//! positions, documents still apart), and o_proj's output is added back into the kept tokens'
//! residual stream; a dropped token's attention output is zero, and it still passes through the
//! residual and the MLP. So the attention's saved tensors (the input norm's, q, k, v, the output
//! and its logsumexp) exist for kept tokens only ([`crate::model::block::BlockSaved::kept`]).
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};
use crate::model::predictor::Predictor;
use crate::model::tiled::{tiles, Tile};

/// A tensor's values on the CPU (an error, never a silent default, when libtorch cannot give them).
fn values<T>(t: &Tensor, what: &str) -> Result<Vec<T>>
where
    Vec<T>: TryFrom<Tensor, Error = tch::TchError>,
{
    Vec::<T>::try_from(t.to_device(Device::Cpu)).map_err(|e| TrainerError::Device(format!("token sparsity: reading {what}: {e}")))
}

/// How a sparse layer rates its blocks.
#[derive(Debug, Clone)]
pub enum Scorer {
    /// The reference's block map: for every (query block, key block) pair of a document, the
    /// largest over its causal token pairs of `Σ_heads ReLU(q·k / √d)`; made symmetric and summed
    /// over query blocks. Computed one query block at a time (memory `O(block · T)`), at the cost
    /// of a second attention-sized product.
    Exact,
    /// Training-free and cheap: the same map over block-mean q and k (`O((T/block)²)` pairs).
    Pooled,
    /// The learned predictor of the exact map from the layer's normed input
    /// ([`crate::model::predictor`]): two small MLPs per layer, fitted by `train predictor`.
    /// Behind a lock: a model (and its sparsity) moves between threads, and the predictor's
    /// tensors are not to be read by two at once.
    Predictor(Arc<Mutex<Predictor>>),
}

impl Scorer {
    pub fn predictor(p: Predictor) -> Scorer {
        Scorer::Predictor(Arc::new(Mutex::new(p)))
    }
}

/// Two predictor scorers are equal when they share one predictor.
impl PartialEq for Scorer {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Scorer::Predictor(a), Scorer::Predictor(b)) => Arc::ptr_eq(a, b),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

/// What a scorer reads of one layer: its normed input and its roped q and k.
pub struct LayerInputs<'a> {
    pub layer: usize,
    /// `[T, hidden]`
    pub x_norm: &'a Tensor,
    /// `[T, heads, d]`
    pub q: &'a Tensor,
    /// `[T, kv_heads, d]`
    pub k: &'a Tensor,
    /// The attention's `1/√d`.
    pub scale: f64,
}

/// A model's sparsity settings (validated by the recipe).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparsity {
    /// Tokens per block.
    pub block: i64,
    /// Fraction of each document's blocks kept, in (0, 1].
    pub keep: f64,
    /// The sparse layers (the others are dense).
    pub layers: Vec<usize>,
    pub scorer: Scorer,
    /// Rate key blocks by the query blocks that hold training targets only (where the loss comes
    /// from; every block when a document has none), and always keep those, instead of rating by
    /// every query block (the reference).
    pub target_queries: bool,
    /// MLP channel sparsity: the fraction of the intermediate channels whose gate/up/act columns
    /// a layer of `mlp_layers` saves ([`top_channels`]); 1: every channel (off).
    pub mlp_keep: f64,
    /// The layers whose MLP keeps its top channels only (independent of `layers`).
    pub mlp_layers: Vec<usize>,
}

impl Sparsity {
    /// The reference's layers for a model of `n` layers: dense in the first half and the last.
    pub fn upper_layers(n: usize) -> Vec<usize> {
        (n / 2..n.saturating_sub(1)).collect()
    }

    pub fn is_sparse(&self, layer: usize) -> bool {
        self.layers.contains(&layer)
    }

    /// The fraction of MLP channels `layer` saves, when it keeps fewer than all.
    pub fn mlp_keep_in(&self, layer: usize) -> Option<f64> {
        (self.mlp_keep < 1.0 && self.mlp_layers.contains(&layer)).then_some(self.mlp_keep)
    }

    /// Attention sparsity in `layers` only, every MLP channel kept.
    pub fn attention_only(block: i64, keep: f64, layers: Vec<usize>, scorer: Scorer, target_queries: bool) -> Sparsity {
        Sparsity { block, keep, layers, scorer, target_queries, mlp_keep: 1.0, mlp_layers: Vec::new() }
    }
}

/// Channels [`top_channels`] keeps of `intermediate`: `ceil(keep · intermediate)`, at least one.
pub fn kept_channels(intermediate: i64, keep: f64) -> i64 {
    ((keep * intermediate as f64).ceil() as i64).clamp(1, intermediate.max(1))
}

/// MLP channel sparsity (the reference's): the `ceil(keep · I)` intermediate channels with the
/// largest `‖silu(gate)[:, i]‖₂ + ‖up[:, i]‖₂` over all tokens, ascending. The forward stays exact
/// (every channel); the layer saves these channels' gate, up and act columns only, and its
/// backward passes the input gradient through them alone (an approximate gradient; the dropped
/// channels' weight rows get none).
///
/// The norms are summed over row chunks, so no `[T, I]` temporary exists beside the inputs.
///
/// # Shapes
/// - `gate`, `up`: `[T, I]` → `[c]` int64
pub fn top_channels(gate: &Tensor, up: &Tensor, keep: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let (t, i) = (gate.size()[0], gate.size()[1]);
    let acc = kernels::accum_kind(gate.kind());
    let (mut g2, mut u2) = (Tensor::zeros([i], (acc, gate.device())), Tensor::zeros([i], (acc, gate.device())));
    const CHUNK: i64 = 1024;
    for a in (0..t).step_by(CHUNK as usize) {
        let n = CHUNK.min(t - a);
        g2 += gate.narrow(0, a, n).silu().to_kind(acc).square().sum_dim_intlist(0, false, acc);
        u2 += up.narrow(0, a, n).to_kind(acc).square().sum_dim_intlist(0, false, acc);
    }
    let c = kept_channels(i, keep);
    let (_, idx) = (g2.sqrt() + u2.sqrt()).topk(c, 0, true, true);
    idx.sort(0, false).0
}

/// The tokens a sparse layer keeps.
#[derive(Debug)]
pub struct Selection {
    /// `[K]` int64, ascending: the kept tokens' rows.
    pub idx: Tensor,
    /// Document offsets of the compacted sequence (each document's kept tokens).
    pub cu_seqlens: Vec<i64>,
}

/// Block scores of `scorer` for one layer: the symmetric block map summed over the query
/// blocks, each weighted by `query_weight` (1 for every block: the reference).
///
/// # Shapes
/// - `at.q`: `[T, heads, d]`, `at.k`: `[T, kv_heads, d]` (after RoPE), `at.x_norm`: `[T, hidden]`
///   → one score per block of [`tiles`]`(cu_seqlens, block)`
pub fn scores(scorer: &Scorer, at: &LayerInputs, cu_seqlens: &[i64], block: i64, query_weight: Option<&[f64]>) -> Result<Vec<f64>> {
    let _guard = tch::no_grad_guard();
    let acc = kernels::accum_kind(at.q.kind());
    let (q, k) = (at.q.to_kind(acc), at.k.to_kind(acc));
    let mut out = Vec::new();
    for w in cu_seqlens.windows(2) {
        let (s, e) = (w[0], w[1]);
        let doc: Vec<Tile> = tiles(&[s, e], block);
        let m = match scorer {
            Scorer::Exact => exact_map(&q.narrow(0, s, e - s), &k.narrow(0, s, e - s), block, at.scale),
            Scorer::Pooled => pooled_map(&q.narrow(0, s, e - s), &k.narrow(0, s, e - s), &doc, s, at.scale),
            Scorer::Predictor(p) => p.lock().map_err(|_| TrainerError::Device("internal: a predictor's lock was poisoned".into()))?.map(at.layer, &at.x_norm.narrow(0, s, e - s))?,
        };
        // Symmetric, summed over (weighted) query blocks: a block's row sum and column sum.
        let sym = (&m + m.tr()).to_kind(Kind::Double);
        let w = match query_weight {
            Some(w) => Tensor::from_slice(&w[out.len()..out.len() + doc.len()]).to_device(sym.device()).unsqueeze(1),
            None => Tensor::ones([doc.len() as i64, 1], (Kind::Double, sym.device())),
        };
        out.extend(values::<f64>(&(sym * w).sum_dim_intlist(0, false, Kind::Double), "block scores")?);
    }
    Ok(out)
}

/// Per block of [`tiles`]`(cu_seqlens, block)`: 1 when it holds a training target (`labels` not
/// ignored), else 0; a document without targets weighs all its blocks 1.
pub fn target_weights(labels: &Tensor, cu_seqlens: &[i64], block: i64) -> Result<Vec<f64>> {
    let counted = values::<i64>(labels, "the labels")?;
    let mut w = Vec::new();
    for d in cu_seqlens.windows(2) {
        let doc: Vec<f64> = tiles(&[d[0], d[1]], block).iter().map(|b| (b.start..b.start + b.len).any(|t| counted.get(t as usize).is_some_and(|&l| l != kernels::cross_entropy::IGNORE_INDEX)) as u8 as f64).collect();
        let any = doc.iter().any(|&x| x > 0.0);
        w.extend(doc.into_iter().map(|x| if any { x } else { 1.0 }));
    }
    Ok(w)
}

/// `[nb, nb]` block map of one document: entry (qb, kb), kb ≤ qb, is the largest over the
/// block pair's causal token pairs of `Σ_heads ReLU(q·k·scale)` (zero above the diagonal).
pub fn exact_map(q: &Tensor, k: &Tensor, block: i64, scale: f64) -> Tensor {
    let (t, heads, kv) = (q.size()[0], q.size()[1], k.size()[1]);
    let nb = (t + block - 1) / block;
    let rep = heads / kv.max(1);
    let map = Tensor::zeros([nb, nb], (q.kind(), q.device()));
    for qb in 0..nb {
        let (a, n) = (qb * block, block.min(t - qb * block));
        let keys = a + n; // causal: keys up to the block's end
        let qs = q.narrow(0, a, n);
        let mut pair = Tensor::zeros([n, keys], (q.kind(), q.device()));
        for h in 0..heads {
            // [n, d] · [d, keys]: one head at a time, so memory stays O(block · T).
            let s = qs.select(1, h).matmul(&k.narrow(0, 0, keys).select(1, h / rep).tr()) * scale;
            pair += s.relu();
        }
        // Causal within the diagonal block: key j ≤ query a + i.
        let i = Tensor::arange_start(a, a + n, (Kind::Int64, q.device())).unsqueeze(1);
        let j = Tensor::arange(keys, (Kind::Int64, q.device())).unsqueeze(0);
        let pair = pair.masked_fill(&j.gt_tensor(&i), 0.0);
        // The largest per key block: pad the keys to whole blocks.
        let kb = (keys + block - 1) / block;
        let padded = pair.constant_pad_nd([0, kb * block - keys]).view([n, kb, block]);
        let best = padded.amax([0, 2], false);
        map.get(qb).narrow(0, 0, kb).copy_(&best);
    }
    map
}

/// [`exact_map`] over block means: `Σ_heads ReLU(q̄_qb · k̄_kb · scale)` for kb ≤ qb.
fn pooled_map(q: &Tensor, k: &Tensor, blocks: &[Tile], doc_start: i64, scale: f64) -> Tensor {
    let mean = |x: &Tensor| Tensor::stack(&blocks.iter().map(|b| x.narrow(0, b.start - doc_start, b.len).mean_dim(0, false, x.kind())).collect::<Vec<_>>(), 0);
    let (qm, km) = (mean(q), mean(k)); // [nb, heads, d], [nb, kv, d]
    let rep = q.size()[1] / k.size()[1].max(1);
    let km = km.repeat_interleave_self_int(rep, 1, None);
    // [heads, nb, d] · [heads, d, nb] → [heads, nb, nb]
    let s = qm.transpose(0, 1).matmul(&km.permute([1, 2, 0])) * scale;
    let nb = blocks.len() as i64;
    s.relu().sum_dim_intlist(0, false, q.kind()).tril(0).view([nb, nb])
}

/// Each document's first block, the blocks `forced` marks (> 0: blocks holding training targets,
/// whose tokens would otherwise lose their attention), and its best-rated others, at least
/// `ceil(keep · blocks)` in all (ties to the earlier block); `scores` as [`scores`] gives them.
/// Deterministic for given scores.
pub fn select(cu_seqlens: &[i64], block: i64, keep: f64, scores: &[f64], forced: Option<&[f64]>, device: Device) -> Selection {
    let mut idx = Vec::new();
    let mut cu = vec![0i64];
    for (doc, choice) in choose(cu_seqlens, block, keep, scores, forced) {
        for b in choice.kept {
            idx.extend(doc[b].start..doc[b].start + doc[b].len);
        }
        cu.push(idx.len() as i64);
    }
    Selection { idx: Tensor::from_slice(&idx).to_device(device), cu_seqlens: cu }
}

/// One document's kept blocks (ascending) and how many of them were chosen by score.
struct Choice {
    kept: Vec<usize>,
    /// The blocks chosen by their scores, not kept whatever their scores (first, forced).
    rated: Vec<usize>,
}

/// [`select`]'s decision per document: its blocks and its choice.
fn choose(cu_seqlens: &[i64], block: i64, keep: f64, scores: &[f64], forced: Option<&[f64]>) -> Vec<(Vec<Tile>, Choice)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for w in cu_seqlens.windows(2) {
        let doc = tiles(&[w[0], w[1]], block);
        let nb = doc.len();
        let want = ((keep * nb as f64).ceil() as usize).clamp(1.min(nb), nb);
        let must = |b: usize| b == 0 || forced.is_some_and(|f| f[at + b] > 0.0);
        let mut kept: Vec<usize> = (0..nb).filter(|&b| must(b)).collect();
        let mut order: Vec<usize> = (0..nb).filter(|&b| !must(b)).collect();
        order.sort_by(|&a, &b| scores[at + b].total_cmp(&scores[at + a]).then(a.cmp(&b)));
        let rated: Vec<usize> = order.into_iter().take(want.saturating_sub(kept.len())).collect();
        kept.extend(&rated);
        kept.sort_unstable();
        out.push((doc, Choice { kept, rated }));
        at += nb;
    }
    out
}

/// How many of the blocks `exact` scores choose by score (not kept whatever their score: each
/// document's first and the forced ones) `predicted` scores choose too, and of how many: a
/// predictor's recall of the exact top-k.
pub fn recall(cu_seqlens: &[i64], block: i64, keep: f64, exact: &[f64], predicted: &[f64], forced: Option<&[f64]>) -> (u64, u64) {
    let (want, got) = (choose(cu_seqlens, block, keep, exact, forced), choose(cu_seqlens, block, keep, predicted, forced));
    let mut hits = 0u64;
    let mut total = 0u64;
    for ((_, w), (_, g)) in want.iter().zip(&got) {
        total += w.rated.len() as u64;
        hits += w.rated.iter().filter(|b| g.rated.contains(b)).count() as u64;
    }
    (hits, total)
}

/// The compacted documents of kept rows `idx` (ascending) of a sequence with `cu_seqlens`.
pub fn compacted(cu_seqlens: &[i64], idx: &Tensor) -> Result<Vec<i64>> {
    let rows = values::<i64>(idx, "the kept rows")?;
    let mut cu = vec![0i64];
    let mut r = 0usize;
    for &end in &cu_seqlens[1..] {
        while r < rows.len() && rows[r] < end {
            r += 1;
        }
        cu.push(r as i64);
    }
    Ok(cu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_document_keeps_its_first_block_and_its_best() {
        // Two documents: 10 tokens (blocks of 4: 3 blocks) and 5 (2 blocks).
        let cu = [0, 10, 15];
        let scores = [0.0, 1.0, 5.0, 0.0, 9.0];
        let s = select(&cu, 4, 0.5, &scores, None, Device::Cpu);
        // Doc 0: ceil(1.5) = 2 blocks: the first and block 2 (score 5); doc 1: 1 block, the first.
        assert_eq!(Vec::<i64>::try_from(&s.idx).unwrap(), [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]);
        assert_eq!(s.cu_seqlens, [0, 6, 10]);
        assert_eq!(compacted(&cu, &s.idx).unwrap(), s.cu_seqlens);
        // Keep everything: every row, in order.
        let all = select(&cu, 4, 1.0, &scores, None, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&all.idx).unwrap(), (0..15).collect::<Vec<i64>>());
        // Ties go to the earlier block.
        let t = select(&[0, 12], 4, 0.6, &[0.0, 3.0, 3.0], None, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&t.idx).unwrap(), [0, 1, 2, 3, 4, 5, 6, 7]);
        // A forced block (training targets) is kept whatever its score, within the count.
        let f = select(&[0, 12], 4, 0.6, &[0.0, 3.0, 1.0], Some(&[0.0, 0.0, 1.0]), Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&f.idx).unwrap(), [0, 1, 2, 3, 8, 9, 10, 11]);
    }

    #[test]
    fn target_blocks_are_those_holding_counted_labels() {
        // Document 0 (10 tokens, blocks of 4) has a target in its last block only; document 1
        // (5 tokens) has none, so all its blocks count.
        let mut labels = vec![-100i64; 15];
        labels[9] = 7;
        let w = target_weights(&Tensor::from_slice(&labels), &[0, 10, 15], 4).unwrap();
        assert_eq!(w, [0.0, 0.0, 1.0, 1.0, 1.0]);
        // Weighted scores: only the target block's row and column count.
        tch::manual_seed(5);
        let q = Tensor::randn([10, 2, 4], (Kind::Double, Device::Cpu));
        let k = Tensor::randn([10, 2, 4], (Kind::Double, Device::Cpu));
        let m = exact_map(&q, &k, 4, 0.5);
        let x = Tensor::zeros([10, 8], (Kind::Double, Device::Cpu));
        let at = LayerInputs { layer: 0, x_norm: &x, q: &q, k: &k, scale: 0.5 };
        let s = scores(&Scorer::Exact, &at, &[0, 10], 4, Some(&[0.0, 0.0, 1.0])).unwrap();
        for b in 0..3i64 {
            let want = m.double_value(&[2, b]) + m.double_value(&[b, 2]);
            assert!((s[b as usize] - want).abs() < 1e-12, "block {b}");
        }
    }

    #[test]
    fn the_exact_map_is_the_blockwise_maximum_of_relu_scores() {
        tch::manual_seed(3);
        let (t, heads, kv, d, block) = (11, 4, 2, 8, 4);
        let q = Tensor::randn([t, heads, d], (Kind::Double, Device::Cpu));
        let k = Tensor::randn([t, kv, d], (Kind::Double, Device::Cpu));
        let m = exact_map(&q, &k, block, 0.5);
        // Naive: every pair, heads summed, causal, then the maximum per block pair.
        let kr = k.repeat_interleave_self_int(heads / kv, 1, None);
        let pair = (q.transpose(0, 1).matmul(&kr.permute([1, 2, 0])) * 0.5).relu().sum_dim_intlist(0, false, Kind::Double); // [T, T]
        for qb in 0..3i64 {
            for kb in 0..3i64 {
                let mut best = 0.0f64;
                for i in qb * block..((qb + 1) * block).min(t) {
                    for j in kb * block..((kb + 1) * block).min(t) {
                        if j <= i {
                            best = best.max(pair.double_value(&[i, j]));
                        }
                    }
                }
                assert!((m.double_value(&[qb, kb]) - best).abs() < 1e-12, "({qb}, {kb})");
            }
        }
        let x = Tensor::zeros([t, heads * d], (Kind::Double, Device::Cpu));
        let s = scores(&Scorer::Exact, &LayerInputs { layer: 0, x_norm: &x, q: &q, k: &k, scale: 0.5 }, &[0, t], block, None).unwrap();
        let want: Vec<f64> = (0..3).map(|b| (0..3).map(|o| m.double_value(&[o, b]) + m.double_value(&[b, o])).sum()).collect();
        assert_eq!(s, want);
    }
}
