//! One decoder block: `h = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`,
//! `y = h + down(silu(gate(n2(h))) * up(n2(h)))`, composed from the explicit ops in `kernels`.
//!
//! This is where a layer's activations are saved: [`BlockSaved`] is the complete list, every
//! tensor token-major `[T, ...]` (but, of a sequence split over ranks, q, k, v and the logsumexp:
//! every token of this rank's heads, as attention reads them). Whoever holds a `BlockSaved` between forward and backward
//! decides where its tensors live.
use kernels::attention::{self, AttnConfig};
use kernels::rope::RopeConfig;
use kernels::{gather, linear, lora, rmsnorm, rope, swiglu};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::model::config::ModelConfig;
use crate::error::Result;
use crate::model::proj::Proj;
use crate::model::layer::Layer;
use crate::model::seq::{self, SeqParallel};
use crate::model::sparse::{self, Sparsity};

/// What every layer of one packed micro-batch shares: RoPE tables, document boundaries,
/// attention shapes, and whether this is a training pass (LoRA dropout) and what is trained.
pub struct Context {
    /// Document offsets on the token axis: document i is tokens cu_seqlens[i]..cu_seqlens[i+1].
    pub cu_seqlens: Vec<i64>,
    /// Training pass: LoRA dropout is active.
    pub train: bool,
    /// Base weights get gradients (full fine-tuning); false under LoRA.
    pub full: bool,
    /// `[T, head_dim]`
    pub cos: Tensor,
    /// `[T, head_dim]`
    pub sin: Tensor,
    pub attn: Vec<AttnConfig>,
    pub eps: f64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Sequence parallelism: this rank holds tokens `shard.start..+shard.tokens` (`cos` and `sin`
    /// are theirs); `cu_seqlens` and `attn` are the whole padded sequence's on this rank's heads.
    pub seq: Option<SeqShard>,
    /// Token sparsity: which layers attend over their informative blocks only ([`sparse`]).
    pub sparsity: Option<Arc<Sparsity>>,
    /// Per block of the sequence, whether it holds training targets ([`sparse::target_weights`]),
    /// when sparse layers rate by them.
    pub target_blocks: Option<Vec<f64>>,
    /// When set, sparse layers rated by a predictor also rate their blocks exactly and record
    /// here, per layer, how many of the exact choice the predictor chose and of how many
    /// ([`sparse::recall`]).
    pub recall: Option<std::sync::Mutex<Vec<(usize, u64, u64)>>>,
}

/// Offsets of documents of these lengths packed one after another (`cu_seqlens`).
pub fn offsets(doc_lens: &[i64]) -> Vec<i64> {
    let mut cu = vec![0];
    for n in doc_lens {
        cu.push(cu.last().copied().unwrap_or(0) + n);
    }
    cu
}

/// A [`Context`]'s sequence-parallel part.
pub struct SeqShard {
    pub group: Arc<SeqParallel>,
    pub shard: seq::Shard,
    /// Copies of each KV head ([`seq::kv_copies`]).
    pub kv_copies: i64,
}

impl Context {
    /// For documents of the given lengths packed one after another; positions restart at 0 in
    /// each document.
    pub fn new(cfg: &ModelConfig, doc_lens: &[i64], kind: Kind, device: Device) -> Context {
        let positions: Vec<i64> = doc_lens.iter().flat_map(|&n| 0..n).collect();
        Self::with_positions(cfg, &cfg.rope, &Tensor::from_slice(&positions), offsets(doc_lens), kind, device)
    }

    pub fn with_positions(cfg: &ModelConfig, rope_cfg: &RopeConfig, positions: &Tensor, cu_seqlens: Vec<i64>, kind: Kind, device: Device) -> Context {
        // Dynamic-NTK scales by the longest document, not by the packed length.
        let (cos, sin) = rope_cfg.cos_sin(positions, kind, device);
        let attn = cfg
            .sliding_window
            .iter()
            .map(|w| AttnConfig {
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                scale: 1.0 / (cfg.head_dim as f64).sqrt(),
                sliding_window: *w,
            })
            .collect();
        Context {
            cu_seqlens,
            train: false,
            full: true,
            cos,
            sin,
            attn,
            eps: cfg.rms_norm_eps,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            seq: None,
            sparsity: None,
            target_blocks: None,
            recall: None,
        }
    }

    /// This context cut to rank `group.rank`'s shard: its rows of the RoPE tables, and attention
    /// over the whole sequence with `heads / P` query heads and `kv_heads · copies / P` KV heads.
    /// The documents must already include the padding ([`seq::Shard::padded`] tokens).
    pub fn sharded(mut self, group: Arc<SeqParallel>) -> std::result::Result<Context, String> {
        let padded = self.cu_seqlens.last().copied().unwrap_or(0);
        let p = group.size as i64;
        let shard = group.shard(padded);
        if shard.padded != padded {
            return Err(format!("internal: {padded} tokens do not divide over {p} ranks (pad them first)"));
        }
        let copies = seq::kv_copies(self.heads, self.kv_heads, p)?;
        self.cos = self.cos.narrow(0, shard.start, shard.tokens);
        self.sin = self.sin.narrow(0, shard.start, shard.tokens);
        for a in &mut self.attn {
            a.heads /= p;
            a.kv_heads = a.kv_heads * copies / p;
        }
        self.seq = Some(SeqShard { group, shard, kv_copies: copies });
        Ok(self)
    }

    /// Document boundaries on this process's rows: `cu_seqlens`, or for a shard the boundaries
    /// that fall inside it, from its first row (a document that began on an earlier rank starts
    /// at row 0 here). Token tiles never cross them.
    pub fn segments(&self) -> Vec<i64> {
        let Some(sp) = &self.seq else { return self.cu_seqlens.clone() };
        let (a, n) = (sp.shard.start, sp.shard.tokens);
        let mut v = vec![0];
        v.extend(self.cu_seqlens.iter().map(|&c| c - a).filter(|&c| c > 0 && c < n));
        v.push(n);
        v
    }
}

/// The names of a layer's saved tensors: the keys under which the activation store, the
/// placement and the planner's inventory know them (LoRA's add `lora_xa:{projection}` and
/// `lora_keep:{projection}`).
pub mod name {
    pub const X: &str = "x";
    pub const RSTD_ATTN: &str = "rstd_attn";
    pub const X_ATTN: &str = "x_attn";
    pub const Q: &str = "q";
    pub const K: &str = "k";
    pub const V: &str = "v";
    pub const ATTN_OUT: &str = "attn_out";
    pub const ATTN_LSE: &str = "attn_lse";
    pub const H: &str = "h";
    pub const RSTD_MLP: &str = "rstd_mlp";
    pub const X_MLP: &str = "x_mlp";
    pub const GATE: &str = "gate";
    pub const UP: &str = "up";
    pub const ACT: &str = "act";
    pub const PHILOX_SEED: &str = "attn_philox_seed";
    pub const PHILOX_OFFSET: &str = "attn_philox_offset";
    pub const SPARSE_KEPT: &str = "sparse_kept";
    pub const MLP_CHANNELS: &str = "mlp_channels";
}

/// The saved tensors whose columns are the MLP's intermediate channels: a layer with MLP channel
/// sparsity saves its kept channels' columns only ([`sparse::top_channels`]).
pub const CHANNELED: [&str; 3] = [name::GATE, name::UP, name::ACT];

/// Every activation one block keeps for its backward, token-major (of a shard, q, k, v and the
/// logsumexp are in the heads' layout: see [`Layout::Sharded`]).
pub struct BlockSaved {
    /// `[T, D]` the layer input (the residual stream entering the block).
    pub x: Tensor,
    /// `[T, 1]` 1/rms of `x` (input_layernorm statistics).
    pub rstd_attn: Tensor,
    /// `[T, D]` input_layernorm(x): the input of q/k/v.
    pub x_attn: Tensor,
    /// q, k, v after RoPE, attention output and its logsumexp.
    pub attn: attention::Saved,
    /// `[T, D]` residual after attention: the input of post_attention_layernorm.
    pub h: Tensor,
    /// `[T, 1]` 1/rms of `h`.
    pub rstd_mlp: Tensor,
    /// `[T, D]` post_attention_layernorm(h): the input of gate/up.
    pub x_mlp: Tensor,
    /// `[T, I]` gate projection output.
    pub gate: Tensor,
    /// `[T, I]` up projection output.
    pub up: Tensor,
    /// `[T, I]` silu(gate)·up: the input of down_proj.
    pub act: Tensor,
    /// LoRA only, per adapted projection: `[T, rank]` low-rank activation and the dropout
    /// keep-mask (`[T, in]` bool) when dropout is on. The input x is one of the tensors above.
    pub lora: Vec<(&'static str, Tensor, Option<Tensor>)>,
    /// A sparse layer's kept rows (`[K]` int64, ascending, [`sparse`]): then the input norm's
    /// tensors, q, k, v, the attention output and logsumexp and q/k/v's LoRA tensors have K rows.
    pub kept: Option<Tensor>,
    /// A layer with MLP channel sparsity: the kept intermediate channels (`[c]` int64, ascending);
    /// then gate, up and act are `[T, c]`.
    pub channels: Option<Tensor>,
}

impl BlockSaved {
    /// Every saved tensor by a name unique within the layer: the one list that accounting, the
    /// store and [`BlockSaved::from_named`] agree on.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v: Vec<(String, &Tensor)> = [
            (name::X, &self.x),
            (name::RSTD_ATTN, &self.rstd_attn),
            (name::X_ATTN, &self.x_attn),
            (name::Q, &self.attn.q),
            (name::K, &self.attn.k),
            (name::V, &self.attn.v),
            (name::ATTN_OUT, &self.attn.out),
            (name::ATTN_LSE, &self.attn.lse),
            (name::H, &self.h),
            (name::RSTD_MLP, &self.rstd_mlp),
            (name::X_MLP, &self.x_mlp),
            (name::GATE, &self.gate),
            (name::UP, &self.up),
            (name::ACT, &self.act),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        if let Some((seed, offset)) = &self.attn.philox {
            v.push((name::PHILOX_SEED.into(), seed));
            v.push((name::PHILOX_OFFSET.into(), offset));
        }
        for (proj, xa, keep) in &self.lora {
            v.push((format!("lora_xa:{proj}"), xa));
            if let Some(k) = keep {
                v.push((format!("lora_keep:{proj}"), k));
            }
        }
        if let Some(k) = &self.kept {
            v.push((name::SPARSE_KEPT.into(), k));
        }
        if let Some(c) = &self.channels {
            v.push((name::MLP_CHANNELS.into(), c));
        }
        v
    }

    /// [`BlockSaved::named`], consuming the struct (for the store): the tensors are the same
    /// storage, no copies.
    pub fn into_named(self) -> Vec<(String, Tensor)> {
        self.named().into_iter().map(|(n, t)| (n, t.shallow_clone())).collect()
    }

    /// The inverse of [`BlockSaved::into_named`]; `get` returns the tensor stored under a name.
    pub fn from_named(names: &[String], mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<BlockSaved> {
        let philox = if names.iter().any(|n| n == name::PHILOX_SEED) { Some((get(name::PHILOX_SEED)?, get(name::PHILOX_OFFSET)?)) } else { None };
        let mut lora = Vec::new();
        for n in names {
            if let Some(proj) = n.strip_prefix("lora_xa:") {
                let proj: &'static str = Proj::ALL
                    .iter()
                    .map(|p| p.hf_name())
                    .find(|p| *p == proj)
                    .ok_or_else(|| crate::error::TrainerError::Device(format!("saved LoRA activation of unknown projection `{proj}`")))?;
                let keep = if names.iter().any(|m| m == &format!("lora_keep:{proj}")) { Some(get(&format!("lora_keep:{proj}"))?) } else { None };
                lora.push((proj, get(n)?, keep));
            }
        }
        Ok(BlockSaved {
            x: get(name::X)?,
            rstd_attn: get(name::RSTD_ATTN)?,
            x_attn: get(name::X_ATTN)?,
            attn: attention::Saved { q: get(name::Q)?, k: get(name::K)?, v: get(name::V)?, out: get(name::ATTN_OUT)?, lse: get(name::ATTN_LSE)?, philox },
            h: get(name::H)?,
            rstd_mlp: get(name::RSTD_MLP)?,
            x_mlp: get(name::X_MLP)?,
            gate: get(name::GATE)?,
            up: get(name::UP)?,
            act: get(name::ACT)?,
            lora,
            kept: if names.iter().any(|n| n == name::SPARSE_KEPT) { Some(get(name::SPARSE_KEPT)?) } else { None },
            channels: if names.iter().any(|n| n == name::MLP_CHANNELS) { Some(get(name::MLP_CHANNELS)?) } else { None },
        })
    }

    pub fn bytes(&self) -> usize {
        self.named().iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }
}

/// Where an adapted projection's dropout keep-mask comes from.
#[derive(Clone, Copy)]
pub(crate) enum Masks<'a> {
    /// Drawn as the projection runs (a whole-sequence pass).
    Draw,
    /// Rows `start..` of the masks drawn up front for the whole sequence (token tiles and their
    /// recompute read the same masks; a projection absent from the list has no dropout).
    Rows { masks: &'a [(Proj, Tensor)], start: i64 },
}

/// A projection's forward; under LoRA it also records the adapter's saved activations.
pub(crate) fn proj(layer: &Layer, p: Proj, x: &Tensor, ctx: &Context, lora_saved: &mut LoraSaved, masks: Masks) -> Tensor {
    let (lin, name) = (layer.proj(p), p.hf_name());
    match &lin.lora {
        None => linear::apply(x, &lin.weight, lin.bias.as_ref()),
        Some(ad) => {
            let adapter = lora::Adapter { a: &ad.a, b: &ad.b, scale: ad.scale, dropout: ad.dropout };
            let (y, s) = match masks {
                Masks::Draw => lora::forward(x, &lin.weight, lin.bias.as_ref(), &adapter, ctx.train),
                Masks::Rows { masks, start } => {
                    let keep = masks.iter().find(|(q, _)| *q == p).map(|(_, m)| m.narrow(0, start, x.size()[0]));
                    lora::forward_with_keep(x, &lin.weight, lin.bias.as_ref(), &adapter, keep)
                }
            };
            lora_saved.push((name, s.xa, s.keep));
            y
        }
    }
}

/// The saved tensors that are token-local functions of the layer input `x` and the attention
/// output: the ones MEMO's split may drop for tokens [αT, T) and recompute in backward.
pub const RECOMPUTABLE: [&str; 11] = [name::RSTD_ATTN, name::X_ATTN, name::Q, name::K, name::V, name::H, name::RSTD_MLP, name::X_MLP, name::GATE, name::UP, name::ACT];

/// How a layer's forward ran, which decides what its saved tensors are and what MEMO's split
/// may recompute ([`recomputable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The whole sequence at once.
    Whole,
    /// Over token tiles ([`crate::model::tiled`]).
    Tiled,
    /// One shard of a sequence split over ranks ([`seq`]): q, k and v are saved as attention
    /// read them, every token of this rank's heads.
    Sharded,
    /// A shard over token tiles: the token-local ops by tiles, attention whole in the heads'
    /// layout between them ([`crate::model::tiled::backward_sharded`]).
    ShardedTiled,
    /// A layer with token sparsity ([`sparse`]), the whole sequence at once: attention's tensors
    /// hold the kept tokens' rows.
    Sparse,
}

impl Layout {
    /// Token-local ops run over tiles.
    pub fn tiled(self) -> bool {
        matches!(self, Layout::Tiled | Layout::ShardedTiled)
    }

    /// The sequence is split over ranks.
    pub fn sharded(self) -> bool {
        matches!(self, Layout::Sharded | Layout::ShardedTiled)
    }
}

/// Whether MEMO's split may drop rows of saved tensor `name`: the [`RECOMPUTABLE`] ones, except
/// - K and V under token tiles: every query tile's backward needs them whole, and rebuilding them
///   would read the layer input twice (once for them, once for its tile); storing them costs
///   `2 × kv_heads × head_dim` per token, at most the layer input's width under GQA;
/// - q, K and V of a sharded sequence: their rows are every token of this rank's heads, and
///   rebuilding them would take the all-to-all again;
/// - in a sparse layer all but the residual `h` and the MLP's: attention's tensors hold the kept
///   tokens' rows, not the first rows of the sequence ([`recompute_sparse_tail`]).
pub fn recomputable(name: &str, layout: Layout) -> bool {
    RECOMPUTABLE.contains(&name)
        && match layout {
            Layout::Whole => true,
            Layout::Tiled => name != name::K && name != name::V,
            Layout::Sharded | Layout::ShardedTiled => name != name::Q && name != name::K && name != name::V,
            Layout::Sparse => !PRE_ATTENTION.contains(&name),
        }
}

/// The recomputable tensors made before attention: a sparse layer stores them (their rows are
/// the kept tokens').
const PRE_ATTENTION: [&str; 5] = [name::RSTD_ATTN, name::X_ATTN, name::Q, name::K, name::V];

/// Rows `[from, T)` of a sparse layer's recomputable tensors (the residual `h` and the MLP's) from
/// the layer input `x` (`[T, D]`), the kept tokens' attention output `attn_out` (`[K, heads,
/// head_dim]`) and their rows `kept` (`[K]`, ascending). o_proj runs over all K rows, as the
/// forward did (the same GEMM, so the same bits), and the tail's are added into `x`'s rows.
pub fn recompute_sparse_tail(layer: &Layer, x: &Tensor, attn_out: &Tensor, kept: &Tensor, ctx: &Context, from: i64) -> Vec<(&'static str, Tensor)> {
    let (t, k) = (x.size()[0], kept.size()[0]);
    let x_tail = x.narrow(0, from, t - from);
    let in_tail = kept.ge(from).sum(Kind::Int64).int64_value(&[]);
    let h = if in_tail == 0 {
        x_tail.copy()
    } else {
        let mut ls = Vec::new();
        let o = proj(layer, Proj::O, &attn_out.reshape([k, ctx.heads * ctx.head_dim]), ctx, &mut ls, Masks::Draw);
        gather::add_rows(&x_tail, &(kept.narrow(0, k - in_tail, in_tail) - from), &o.narrow(0, k - in_tail, in_tail))
    };
    let post = mlp(layer, h, ctx, &mut Vec::new(), Masks::Draw);
    vec![(name::H, post.h), (name::RSTD_MLP, post.rstd_mlp), (name::X_MLP, post.x_mlp), (name::GATE, post.gate), (name::UP, post.up), (name::ACT, post.act)]
}

/// Token-local work before attention, on any rows of the layer input.
pub(crate) struct PreAttn {
    pub rstd_attn: Tensor,
    pub x_attn: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

pub(crate) fn pre_attn(layer: &Layer, x: &Tensor, cos: &Tensor, sin: &Tensor, ctx: &Context, ls: &mut LoraSaved, m: Masks) -> PreAttn {
    let (x_attn, s1) = rmsnorm::forward(x, &layer.input_layernorm, ctx.eps);
    let q = attn_proj(layer, Proj::Q, &x_attn, cos, sin, ctx, ls, m);
    let k = attn_proj(layer, Proj::K, &x_attn, cos, sin, ctx, ls, m);
    let v = attn_proj(layer, Proj::V, &x_attn, cos, sin, ctx, ls, m);
    PreAttn { rstd_attn: s1.rstd, x_attn, q, k, v }
}

/// One of q, k, v from the normed layer input, `[T, heads, head_dim]` (q and k roped): each is
/// its own GEMM, so a recompute that needs only some of them gets [`pre_attn`]'s values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attn_proj(layer: &Layer, p: Proj, x_attn: &Tensor, cos: &Tensor, sin: &Tensor, ctx: &Context, ls: &mut LoraSaved, m: Masks) -> Tensor {
    let t = x_attn.size()[0];
    let heads = if p == Proj::Q { ctx.heads } else { ctx.kv_heads };
    let y = proj(layer, p, x_attn, ctx, ls, m).view([t, heads, ctx.head_dim]);
    if p == Proj::V {
        y
    } else {
        rope::forward(&y, cos, sin)
    }
}

/// Token-local work after attention (o_proj, residual, MLP), on any rows.
pub(crate) struct PostAttn {
    pub h: Tensor,
    pub rstd_mlp: Tensor,
    pub x_mlp: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub act: Tensor,
    pub y: Tensor,
}

pub(crate) fn post_attn(layer: &Layer, x: &Tensor, o_flat: &Tensor, ctx: &Context, ls: &mut LoraSaved, m: Masks) -> PostAttn {
    let h = x + proj(layer, Proj::O, o_flat, ctx, ls, m);
    mlp(layer, h, ctx, ls, m)
}

/// The MLP half of a block from the residual after attention `h`.
pub(crate) fn mlp(layer: &Layer, h: Tensor, ctx: &Context, ls: &mut LoraSaved, m: Masks) -> PostAttn {
    let (x_mlp, s2) = rmsnorm::forward(&h, &layer.post_attention_layernorm, ctx.eps);
    let gate = proj(layer, Proj::Gate, &x_mlp, ctx, ls, m);
    let up = proj(layer, Proj::Up, &x_mlp, ctx, ls, m);
    let (act, _) = swiglu::forward(&gate, &up);
    let y = &h + proj(layer, Proj::Down, &act, ctx, ls, m);
    PostAttn { h, rstd_mlp: s2.rstd, x_mlp, gate, up, act, y }
}

pub(crate) type LoraSaved = Vec<(&'static str, Tensor, Option<Tensor>)>;

/// # Shapes
/// - `x`: `[T, D]` → `[T, D]`
pub fn forward(layer: &Layer, x: &Tensor, ctx: &Context, layer_idx: usize) -> Result<(Tensor, BlockSaved)> {
    let mut ls = Vec::new();
    let pre = pre_attn(layer, x, &ctx.cos, &ctx.sin, ctx, &mut ls, Masks::Draw);
    // A sparse layer keeps its informative blocks' rows of everything attention reads.
    let sel = match ctx.sparsity.as_ref().filter(|s| s.is_sparse(layer_idx)) {
        Some(s) => {
            let at = sparse::LayerInputs { layer: layer_idx, x_norm: &pre.x_attn, q: &pre.q, k: &pre.k, scale: ctx.attn[layer_idx].scale };
            let rated = sparse::scores(&s.scorer, &at, &ctx.cu_seqlens, s.block, ctx.target_blocks.as_deref())?;
            if let (sparse::Scorer::Predictor(_), Some(sink)) = (&s.scorer, &ctx.recall) {
                let exact = sparse::scores(&sparse::Scorer::Exact, &at, &ctx.cu_seqlens, s.block, ctx.target_blocks.as_deref())?;
                let (hits, of) = sparse::recall(&ctx.cu_seqlens, s.block, s.keep, &exact, &rated, ctx.target_blocks.as_deref());
                sink.lock().map_err(|_| crate::error::TrainerError::Device("internal: the recall record was poisoned".into()))?.push((layer_idx, hits, of));
            }
            Some(sparse::select(&ctx.cu_seqlens, s.block, s.keep, &rated, ctx.target_blocks.as_deref(), x.device()))
        }
        None => None,
    };
    let PreAttn { rstd_attn, x_attn, q, k, v } = match &sel {
        None => pre,
        Some(s) => {
            for (_, xa, keep) in ls.iter_mut() {
                *xa = gather::rows(xa, &s.idx);
                *keep = keep.as_ref().map(|m| gather::rows(m, &s.idx));
            }
            let r = |z: &Tensor| gather::rows(z, &s.idx);
            PreAttn { rstd_attn: r(&pre.rstd_attn), x_attn: r(&pre.x_attn), q: r(&pre.q), k: r(&pre.k), v: r(&pre.v) }
        }
    };
    let cu = sel.as_ref().map_or(&ctx.cu_seqlens, |s| &s.cu_seqlens);
    let (o, attn_saved) = attend(q, k, v, ctx, layer_idx, cu)?;
    let o_flat = o.view([o.size()[0], ctx.heads * ctx.head_dim]);
    let post = match &sel {
        None => post_attn(layer, x, &o_flat, ctx, &mut ls, Masks::Draw),
        Some(s) => {
            // Dropped tokens' attention output is zero: x passes unchanged into h.
            let h = gather::add_rows(x, &s.idx, &proj(layer, Proj::O, &o_flat, ctx, &mut ls, Masks::Draw));
            mlp(layer, h, ctx, &mut ls, Masks::Draw)
        }
    };
    // MLP channel sparsity: the forward was exact; only the kept channels' columns are saved.
    let channels = match ctx.sparsity.as_ref().and_then(|s| s.mlp_keep_in(layer_idx)) {
        Some(keep) => {
            mlp_not_adapted(layer)?;
            Some(sparse::top_channels(&post.gate, &post.up, keep))
        }
        None => None,
    };
    let post = match &channels {
        Some(c) => PostAttn { gate: post.gate.index_select(1, c), up: post.up.index_select(1, c), act: post.act.index_select(1, c), ..post },
        None => post,
    };
    let saved = BlockSaved {
        x: x.shallow_clone(),
        rstd_attn,
        x_attn,
        attn: attn_saved,
        h: post.h,
        rstd_mlp: post.rstd_mlp,
        x_mlp: post.x_mlp,
        gate: post.gate,
        up: post.up,
        act: post.act,
        lora: ls,
        kept: sel.map(|s| s.idx),
        channels,
    };
    Ok((post.y, saved))
}

/// Attention over the packed documents of q, k, v (`[T, heads or kv_heads, head_dim]`): here,
/// or for a sharded sequence over every token of this rank's heads between two all-to-alls
/// (each tensor dropped once it has gone). The saved output is in the token layout o_proj reads;
/// the saved q, k, v and logsumexp are as the kernel read them.
pub(crate) fn attend(q: Tensor, k: Tensor, v: Tensor, ctx: &Context, l: usize, cu_seqlens: &[i64]) -> Result<(Tensor, attention::Saved)> {
    let Some(sp) = &ctx.seq else {
        return Ok(attention::forward_packed(&q, &k, &v, &ctx.attn[l], cu_seqlens)?);
    };
    let g = &sp.group;
    let (qh, kh) = (g.to_heads(&q)?, g.to_heads(&seq::repeat_kv(&k, sp.kv_copies))?);
    drop((q, k));
    let vh = g.to_heads(&seq::repeat_kv(&v, sp.kv_copies))?;
    drop(v);
    let (o, mut saved) = attention::forward_packed(&qh, &kh, &vh, &ctx.attn[l], &ctx.cu_seqlens)?;
    let o = g.to_tokens(&o)?;
    saved.out = o.shallow_clone();
    Ok((o, saved))
}

/// The gradients of q, k, v (`[T, heads or kv_heads, head_dim]`) from the attention output's.
pub(crate) fn attend_backward(grad_out: &Tensor, saved: attention::Saved, ctx: &Context, l: usize, cu_seqlens: &[i64]) -> Result<(Tensor, Tensor, Tensor)> {
    let Some(sp) = &ctx.seq else {
        return Ok(attention::backward_packed(grad_out, &saved, &ctx.attn[l], cu_seqlens)?);
    };
    let g = &sp.group;
    let grad_out = g.to_heads(grad_out)?;
    let saved = attention::Saved { out: g.to_heads(&saved.out)?, ..saved };
    let (dq, dk, dv) = attention::backward_packed(&grad_out, &saved, &ctx.attn[l], &ctx.cu_seqlens)?;
    drop((grad_out, saved));
    Ok((g.to_tokens(&dq)?, seq::sum_kv_copies(&g.to_tokens(&dk)?, sp.kv_copies), seq::sum_kv_copies(&g.to_tokens(&dv)?, sp.kv_copies)))
}

/// Recomputes the [`RECOMPUTABLE`] tensors for tokens `from..T` from the layer input and the
/// attention output (MEMO's token-wise recompute: all of it token-local, no attention).
/// Returns them by name. LoRA dropout must be off (its masks are not redrawn).
///
/// Bit-identity with the forward values rests on libtorch's CPU kernels giving the same bits for
/// a row subset as for the whole matrix; that holds for GEMMs of two or more rows (a single row
/// takes a GEMV path), so callers recompute at least two rows (see `Model::forward_backward_with`).
pub fn recompute_tail(layer: &Layer, x: &Tensor, attn_out: &Tensor, ctx: &Context, from: i64) -> Vec<(&'static str, Tensor)> {
    let t = x.size()[0];
    let n = t - from;
    let mut ls = Vec::new();
    let rows = |a: &Tensor| a.narrow(0, from, n);
    let mut v = if ctx.seq.is_some() {
        // A shard stores q, K and V whole (in the heads' layout): only the input norm's tensors.
        let (x_attn, st) = rmsnorm::forward(&rows(x), &layer.input_layernorm, ctx.eps);
        vec![(name::RSTD_ATTN, st.rstd), (name::X_ATTN, x_attn)]
    } else {
        let pre = pre_attn(layer, &rows(x), &rows(&ctx.cos), &rows(&ctx.sin), ctx, &mut ls, Masks::Draw);
        vec![(name::RSTD_ATTN, pre.rstd_attn), (name::X_ATTN, pre.x_attn), (name::Q, pre.q), (name::K, pre.k), (name::V, pre.v)]
    };
    let o_flat = rows(attn_out).reshape([n, ctx.heads * ctx.head_dim]);
    let post = post_attn(layer, &rows(x), &o_flat, ctx, &mut ls, Masks::Draw);
    v.extend([
        (name::H, post.h),
        (name::RSTD_MLP, post.rstd_mlp),
        (name::X_MLP, post.x_mlp),
        (name::GATE, post.gate),
        (name::UP, post.up),
        (name::ACT, post.act),
    ]);
    v
}

/// Gradients of one projection, pushed under its HF / PEFT sub-names.
pub(crate) fn proj_backward(dy: &Tensor, x: &Tensor, layer: &Layer, p: Proj, ctx: &Context, lora_saved: &mut LoraSaved, grads: &mut Vec<(String, Tensor)>) -> Result<Tensor> {
    let (lin, name) = (layer.proj(p), p.hf_name());
    if let Some(ad) = &lin.lora {
        let pos = lora_saved
            .iter()
            .position(|(n, _, _)| *n == name)
            .ok_or_else(|| crate::error::TrainerError::Device(format!("no saved LoRA activation for `{name}`")))?;
        let (_, xa, keep) = lora_saved.swap_remove(pos);
        let adapter = lora::Adapter { a: &ad.a, b: &ad.b, scale: ad.scale, dropout: ad.dropout };
        let g = lora::backward(dy, &lora::Saved { x: x.shallow_clone(), keep, xa }, &lin.weight, &adapter);
        grads.push((format!("{name}.lora_A.weight"), g.a));
        grads.push((format!("{name}.lora_B.weight"), g.b));
        return Ok(g.x);
    }
    let g = linear::backward(dy, &linear::Saved { x: x.shallow_clone() }, &lin.weight, ctx.full, ctx.full && lin.bias.is_some());
    if let Some(w) = g.weight {
        grads.push((format!("{name}.weight"), w));
    }
    if let Some(b) = g.bias {
        grads.push((format!("{name}.bias"), b));
    }
    Ok(g.x)
}

/// MLP channel sparsity runs on projections without adapters (the reference trains LoRA on the
/// attention's projections only).
fn mlp_not_adapted(layer: &Layer) -> Result<()> {
    match Proj::MLP.into_iter().find(|&p| layer.proj(p).lora.is_some()) {
        Some(p) => Err(crate::error::TrainerError::Device(format!("MLP channel sparsity with a LoRA adapter on `{}` is not built: leave the MLP's projections out of lora.targets or keep every channel", p.hf_name()))),
        None => Ok(()),
    }
}

/// [`proj_backward`] of an MLP projection through the kept intermediate channels `channels`
/// only: down_proj's input columns, gate/up_proj's output rows. Under full fine-tuning the
/// dropped channels' weight (and bias) entries get a zero gradient. The projection carries no
/// adapter: the forward that chose the channels refused one ([`mlp_not_adapted`]).
fn proj_backward_channels(dy: &Tensor, x: &Tensor, layer: &Layer, p: Proj, channels: &Tensor, ctx: &Context, grads: &mut Vec<(String, Tensor)>) -> Result<Tensor> {
    let (lin, name) = (layer.proj(p), p.hf_name());
    // down_proj's weight is [D, I] (channels are its columns); gate/up_proj's [I, D] (rows).
    let dim = if p == Proj::Down { 1 } else { 0 };
    let w = lin.weight.index_select(dim, channels);
    let g = linear::backward(dy, &linear::Saved { x: x.shallow_clone() }, &w, ctx.full, ctx.full && lin.bias.is_some());
    if let Some(gw) = g.weight {
        grads.push((format!("{name}.weight"), lin.weight.zeros_like().index_copy(dim, channels, &gw)));
    }
    if let (Some(gb), Some(b)) = (g.bias, &lin.bias) {
        grads.push((format!("{name}.bias"), if dim == 0 { b.zeros_like().index_copy(0, channels, &gb) } else { gb }));
    }
    Ok(g.x)
}

/// Consumes the layer's saved activations; returns the gradient of the block input and the
/// parameter gradients under their names relative to `model.layers.{i}`.
///
/// `mlp_done` runs once the MLP's saved tensors and gradients are gone, before attention (op
/// [`crate::plan::inventory::PREFETCH_AT_OP`] of the planner's level-1 layout): the model asks
/// for the next layers' saved tensors there, so they arrive beside the attention's buffers and
/// not at the MLP backward's peak.
pub fn backward(layer: &Layer, dy: Tensor, s: BlockSaved, ctx: &Context, layer_idx: usize, mlp_done: &mut dyn FnMut() -> Result<()>) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let mut grads = Vec::new();
    // Each saved tensor is released right after the op that consumes it, which is what the
    // planner's level-1 layout of this backward assumes (`inventory::backward_buffers`).
    let BlockSaved { x, rstd_attn, x_attn, attn, h, rstd_mlp, x_mlp, gate, up, act, lora, kept, channels } = s;
    let mut ls = lora;
    // MLP (with channel sparsity, through the kept channels only)
    let mut mlp_back = |dy: &Tensor, x: &Tensor, p: Proj, grads: &mut Vec<(String, Tensor)>| match &channels {
        None => proj_backward(dy, x, layer, p, ctx, &mut ls, grads),
        Some(c) => proj_backward_channels(dy, x, layer, p, c, ctx, grads),
    };
    let dact = mlp_back(&dy, &act, Proj::Down, &mut grads)?;
    drop(act);
    let (dgate, dup) = swiglu::backward(&dact, &swiglu::Saved { gate, up });
    drop(dact);
    let dx_mlp = mlp_back(&dgate, &x_mlp, Proj::Gate, &mut grads)? + mlp_back(&dup, &x_mlp, Proj::Up, &mut grads)?;
    drop((dgate, dup, x_mlp));
    let (dh_norm, dw2) = rmsnorm::backward(&dx_mlp, &rmsnorm::Saved { x: h, rstd: rstd_mlp }, &layer.post_attention_layernorm, ctx.full);
    drop(dx_mlp);
    if let Some(w) = dw2 {
        grads.push(("post_attention_layernorm.weight".into(), w));
    }
    let dh = dy + dh_norm;
    mlp_done()?;
    // Attention: on every row, or a sparse layer's kept rows (`kept`).
    let (dh_a, x, cos, sin, cu) = match &kept {
        None => (dh.shallow_clone(), x, ctx.cos.shallow_clone(), ctx.sin.shallow_clone(), ctx.cu_seqlens.clone()),
        Some(idx) => (gather::rows(&dh, idx), gather::rows(&x, idx), gather::rows(&ctx.cos, idx), gather::rows(&ctx.sin, idx), sparse::compacted(&ctx.cu_seqlens, idx)?),
    };
    let t = dh_a.size()[0];
    let do_ = proj_backward(&dh_a, &attn.out.view([t, ctx.heads * ctx.head_dim]), layer, Proj::O, ctx, &mut ls, &mut grads)?;
    drop(dh_a);
    let (dq, dk, dv) = attend_backward(&do_.view([t, ctx.heads, ctx.head_dim]), attn, ctx, layer_idx, &cu)?;
    drop(do_);
    let dq = rope::backward(&dq, &cos, &sin).reshape([t, ctx.heads * ctx.head_dim]);
    let dk = rope::backward(&dk, &cos, &sin).reshape([t, ctx.kv_heads * ctx.head_dim]);
    let dv = dv.reshape([t, ctx.kv_heads * ctx.head_dim]);
    let dx_attn = proj_backward(&dq, &x_attn, layer, Proj::Q, ctx, &mut ls, &mut grads)?
        + proj_backward(&dk, &x_attn, layer, Proj::K, ctx, &mut ls, &mut grads)?
        + proj_backward(&dv, &x_attn, layer, Proj::V, ctx, &mut ls, &mut grads)?;
    drop((dq, dk, dv, x_attn));
    let (dx_norm, dw1) = rmsnorm::backward(&dx_attn, &rmsnorm::Saved { x, rstd: rstd_attn }, &layer.input_layernorm, ctx.full);
    if let Some(w) = dw1 {
        grads.push(("input_layernorm.weight".into(), w));
    }
    Ok((
        match &kept {
            None => dh + dx_norm,
            Some(idx) => gather::add_rows(&dh, idx, &dx_norm),
        },
        grads,
    ))
}
