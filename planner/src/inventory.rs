//! What a training step holds: every tensor class with its shape formula, dtype, and bytes as a
//! function of the token count T (`fixed + per_token · T`; every activation is token-major).
use serde::{Deserialize, Serialize};

/// Which part of a step a tensor class belongs to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Group {
    /// Model weights (frozen or trained).
    Weights,
    /// Gradients of the trained tensors.
    Grads,
    /// AdamW moments and float32 master copies.
    Optimizer,
    /// One layer's activations saved for backward (the MEMO split applies to `recomputable`).
    Saved,
    /// Embedding, final norm and loss: saved or live outside the layers.
    Head,
    /// Tensors every layer reads, live for the whole step (the RoPE tables of the step's tokens).
    Context,
}

/// A class of alike tensors; one instance holds `fixed_bytes + per_token_bytes · T` bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorClass {
    /// Which part of the step holds it.
    pub group: Group,
    /// Name; for a saved tensor, the name the block saves it under.
    pub name: String,
    /// Shape formula, e.g. `[T, 4096]`.
    pub shape: String,
    /// Element type, e.g. `bfloat16`, `float32`.
    pub dtype: String,
    /// Instances (e.g. one per layer for a weight class).
    pub count: u64,
    /// Bytes of one instance independent of T.
    pub fixed_bytes: u64,
    /// Bytes of one instance per token.
    pub per_token_bytes: u64,
    /// Saved only: token-local, so tokens [αT, T) may be dropped and recomputed.
    pub recomputable: bool,
    /// Saved only: under token tiles an offloaded layer's backward reads it one tile's rows at a
    /// time (see [`OpBuffer::sliced`]); the others come back whole, ahead of the layer.
    #[serde(default)]
    pub sliced: bool,
    /// Saved only: its rows in a layer with token sparsity ([`Sparse`]).
    #[serde(default)]
    pub in_sparse: SparseRows,
    /// Saved only: `recomputable` in a sparse layer (the residual and the MLP's tensors; the
    /// pre-attention ones hold the kept tokens, not the first rows, and are always stored).
    #[serde(default)]
    pub recomputable_in_sparse: bool,
    /// Saved only: what it holds in a layer with MLP channel sparsity ([`Sparse::mlp_layers`]).
    #[serde(default)]
    pub in_channel_layers: ChannelCols,
}

/// What a saved tensor holds in a layer whose MLP saves its kept channels only (measured by
/// running such a block).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChannelCols {
    /// The same as in any other layer.
    #[default]
    Same,
    /// The kept channels' columns (the MLP's gate, up and act): this shape and per-token bytes.
    Kept {
        /// Shape formula, e.g. `[T, 2868]`.
        shape: String,
        /// Bytes per token there.
        per_token_bytes: u64,
    },
    /// Present in such layers only (the kept channels' indices).
    Only,
}

/// What a saved tensor holds in a sparse layer (measured by running a sparse block).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SparseRows {
    /// Every token's row (the MLP's tensors: dropped tokens still pass through it).
    #[default]
    All,
    /// The kept tokens' rows (what attention reads).
    Kept,
    /// The kept tokens' rows, and absent from dense layers (the kept row indices).
    OnlySparse,
}

/// Token sparsity as the planner counts it: which layers keep which share of a document's blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sparse {
    /// The sparse layers.
    pub layers: Vec<usize>,
    /// Tokens per block.
    pub block: u64,
    /// Fraction of a document's blocks kept.
    pub keep: f64,
    /// The layers with MLP channel sparsity (may differ from `layers`).
    #[serde(default)]
    pub mlp_layers: Vec<usize>,
    /// Fraction of the MLP's intermediate channels those layers save.
    #[serde(default = "one")]
    pub mlp_keep: f64,
}

fn one() -> f64 {
    1.0
}

impl Sparse {
    /// Tokens a sparse layer keeps of a step of `tokens` tokens in one document: `⌈keep·blocks⌉`
    /// whole blocks. Exact when the document's length is a multiple of the block; an upper bound
    /// when its short last block is dropped. Packed documents each keep their first block and
    /// round up, so a step of many short documents can keep more (the store spills what its
    /// tier does not hold to the next).
    pub fn kept_tokens(&self, tokens: u64) -> u64 {
        let blocks = tokens.div_ceil(self.block.max(1));
        let kept = ((self.keep * blocks as f64).ceil() as u64).clamp(blocks.min(1), blocks);
        (kept * self.block).min(tokens)
    }
}

impl TensorClass {
    /// Bytes of one instance at `tokens` tokens.
    pub fn bytes(&self, tokens: u64) -> u64 {
        self.fixed_bytes + self.per_token_bytes * tokens
    }

    /// Bytes of all instances.
    pub fn total(&self, tokens: u64) -> u64 {
        self.count * self.bytes(tokens)
    }
}

/// Tiles of each saved tensor an offloaded layer's tiled backward holds at once: the tile being
/// computed and the next one on its way (the trainer's `stash::TileReader` reads one ahead).
pub const TILES_HELD: u64 = 2;

/// How many rows (tokens) a buffer of one layer has.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Rows {
    /// The step's T.
    #[default]
    Tokens,
    /// The rows of the recomputable tensors an offloaded layer stores (`stored_rows(α, T)`).
    Stored,
    /// T when rows are recomputed (stored < T), else none: a whole tensor rebuilt from the
    /// stored rows and the recomputed ones.
    Rebuilt,
    /// One token tile (`min(tile_tokens, T)`).
    Tile,
}

/// A buffer of one layer's backward with its lifetime in the backward's op sequence (slots), for
/// the level-1 layout. Saved tensors appear too, live until the op that consumes them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpBuffer {
    /// Name of the buffer.
    pub name: String,
    /// Shape formula, e.g. `[T, 4096]`.
    pub shape: String,
    /// Bytes independent of T.
    pub fixed_bytes: u64,
    /// Bytes per token.
    pub per_token_bytes: u64,
    /// First op slot in which the buffer is live.
    pub start: u32,
    /// Last op slot in which the buffer is live (inclusive).
    pub end: u32,
    /// What `per_token_bytes` multiplies.
    #[serde(default)]
    pub rows: Rows,
    /// A saved tensor that an offloaded layer's tiled backward reads from its tier one tile's rows
    /// at a time: [`TILES_HELD`] tiles' rows at once, at most `rows`. A kept layer's stays whole.
    #[serde(default)]
    pub sliced: bool,
    /// What it is in a layer with MLP channel sparsity: the MLP's gradients span the kept
    /// channels only, the saved tensors are as there, and the forward holds the MLP's tensors
    /// over every channel until the kept columns are taken (a buffer of such layers only).
    #[serde(default)]
    pub in_channel_layers: ChannelCols,
}

impl OpBuffer {
    /// Bytes at `tokens` tokens with `stored` rows of the recomputable tensors kept and tiles of
    /// `tile` tokens, in an `offloaded` layer or a kept one.
    pub fn bytes(&self, tokens: u64, stored: u64, tile: u64, offloaded: bool) -> u64 {
        let rows = match self.rows {
            Rows::Tokens => tokens,
            Rows::Stored => stored.min(tokens),
            Rows::Rebuilt => if stored < tokens { tokens } else { 0 },
            Rows::Tile => tile.min(tokens),
        };
        let rows = if self.sliced && offloaded { rows.min(TILES_HELD * tile) } else { rows };
        self.fixed_bytes + self.per_token_bytes * rows
    }
}

/// Floating-point work of one layer, for step-time predictions.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LayerFlops {
    /// Forward FLOPs per token of the projections (2 · parameters).
    pub linear_per_token: f64,
    /// Forward attention FLOPs per token pair (causal: counted over T²/2 pairs).
    pub attention_per_pair: f64,
    /// Backward / forward FLOP ratio of the projections (2 with weight gradients, ~1 under LoRA).
    pub linear_backward_ratio: f64,
}

/// What a training step of a model holds, for the planner: tensor classes, op buffers, FLOPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inventory {
    /// The model in one line (architecture and dimensions).
    pub model: String,
    /// Number of transformer layers.
    pub layers: usize,
    /// Dtype of activations.
    pub dtype: String,
    /// Device the saved-tensor figures were taken on (by running one block's forward).
    pub probed_on: String,
    /// Weights, gradients and optimizer state: sizes that do not depend on T.
    pub statics: Vec<TensorClass>,
    /// One layer's saved tensors.
    pub saved: Vec<TensorClass>,
    /// Outside the layers: the head's tensors and the step-wide context (by their group).
    pub head: Vec<TensorClass>,
    /// Tokens per tile of a block's token-local ops; None: the whole sequence at once.
    #[serde(default)]
    pub tile_tokens: Option<u64>,
    /// Whole-sequence blocks: the op of a layer's backward (in [`Inventory::backward`]'s
    /// numbering) from which the next layers' saved tensors (`lookahead`) arrive beside its
    /// buffers; 0: from its start.
    #[serde(default)]
    pub prefetch_at_op: u32,
    /// One layer's forward transients with lifetimes in its op sequence.
    pub forward: Vec<OpBuffer>,
    /// One layer's backward buffers with lifetimes in its op sequence (the level-1 layout's input).
    pub backward: Vec<OpBuffer>,
    /// One layer's floating-point work.
    pub flops: LayerFlops,
    /// Forward FLOPs per token of the LM head.
    pub head_flops_per_token: f64,
    /// Token sparsity; None: every layer dense.
    #[serde(default)]
    pub sparse: Option<Sparse>,
}

impl Inventory {
    /// Rows of one tile at `tokens` tokens.
    pub fn tile(&self, tokens: u64) -> u64 {
        self.tile_tokens.map_or(tokens, |t| t.clamp(1, tokens.max(1)))
    }

    /// Layer `layer`'s forward working set beyond its saved tensors (the best-fit peak of its
    /// [`Inventory::forward_in`]) at `tokens` tokens with `stored` rows of the recomputable
    /// tensors kept.
    pub fn forward_work(&self, layer: usize, tokens: u64, stored: u64) -> u64 {
        let tile = self.tile(tokens);
        let forward = self.forward_in(layer);
        if forward.iter().all(|b| b.rows == Rows::Tokens && b.fixed_bytes == 0) {
            // Whole-sequence buffers all scale with T: the peak at one token, scaled.
            let one: Vec<crate::layout::Buf> = forward.iter().map(|b| crate::layout::Buf::new(b.name.clone(), b.per_token_bytes, b.start, b.end)).collect();
            return crate::layout::greedy(&one).peak * tokens;
        }
        let bufs: Vec<crate::layout::Buf> = forward.iter().map(|b| crate::layout::Buf::new(b.name.clone(), b.bytes(tokens, stored, tile, false), b.start, b.end)).collect();
        crate::layout::greedy(&bufs).peak
    }

    /// Layer `layer`'s forward transients (`forward` as that layer has them).
    pub fn forward_in(&self, layer: usize) -> Vec<OpBuffer> {
        self.buffers_in(&self.forward, layer)
    }

    /// Layer `layer`'s backward buffers (`backward` as that layer has them).
    pub fn backward_in(&self, layer: usize) -> Vec<OpBuffer> {
        self.buffers_in(&self.backward, layer)
    }

    fn buffers_in(&self, list: &[OpBuffer], layer: usize) -> Vec<OpBuffer> {
        let channels = self.has_mlp_channels(layer);
        list.iter()
            .filter_map(|b| match (&b.in_channel_layers, channels) {
                (ChannelCols::Only, false) => None,
                (ChannelCols::Kept { shape, per_token_bytes }, true) => Some(OpBuffer { shape: shape.clone(), per_token_bytes: *per_token_bytes, ..b.clone() }),
                _ => Some(b.clone()),
            })
            .collect()
    }

    /// Bytes of all statics (at T = 0: they do not depend on the token count).
    pub fn static_bytes(&self) -> u64 {
        self.statics.iter().map(|c| c.total(0)).sum()
    }

    /// Whether `layer` runs with token sparsity.
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse.as_ref().is_some_and(|s| s.layers.contains(&layer))
    }

    /// Whether `layer`'s MLP saves its kept channels only.
    pub fn has_mlp_channels(&self, layer: usize) -> bool {
        self.sparse.as_ref().is_some_and(|s| s.mlp_keep < 1.0 && s.mlp_layers.contains(&layer))
    }

    /// Layer `layer`'s saved tensors with the first `split` of `tokens` rows of the recomputable
    /// ones stored, in the order the block saves them, with their bytes and whether they are
    /// recomputable there; in a sparse layer those attention reads hold the kept tokens only, in
    /// a layer with MLP channel sparsity the MLP's hold the kept channels only.
    pub fn layer_tensors(&self, layer: usize, tokens: u64, split: u64) -> impl Iterator<Item = (&TensorClass, u64, bool)> {
        let kept = self.sparse.as_ref().filter(|_| self.is_sparse(layer)).map(|s| s.kept_tokens(tokens));
        let channels = self.has_mlp_channels(layer);
        self.saved.iter().filter_map(move |c| {
            let per_token = match (&c.in_channel_layers, channels) {
                (ChannelCols::Only, false) => return None,
                (ChannelCols::Kept { per_token_bytes, .. }, true) => *per_token_bytes,
                _ => c.per_token_bytes,
            };
            let recomputable = if kept.is_some() { c.recomputable_in_sparse } else { c.recomputable };
            let rows = match (c.in_sparse, kept) {
                (SparseRows::OnlySparse, None) => return None,
                (SparseRows::Kept | SparseRows::OnlySparse, Some(k)) => k,
                _ if recomputable => split,
                _ => tokens,
            };
            Some((c, c.fixed_bytes + per_token * rows, recomputable))
        })
    }

    /// Layer `layer`'s saved bytes with the first `split` of `tokens` rows of the recomputable
    /// tensors stored: (always-stored bytes, recomputable bytes).
    pub fn layer_saved(&self, layer: usize, tokens: u64, split: u64) -> (u64, u64) {
        let (mut whole, mut rec) = (0, 0);
        for (_, b, recomputable) in self.layer_tensors(layer, tokens, split) {
            *(if recomputable { &mut rec } else { &mut whole }) += b;
        }
        (whole, rec)
    }

    /// Every layer's saved bytes, all rows stored.
    pub fn saved_bytes(&self, tokens: u64) -> u64 {
        (0..self.layers).map(|l| self.layer_saved(l, tokens, tokens)).map(|(w, r)| w + r).sum()
    }

    /// One offloaded layer's stored tensors with `split` rows of the recomputable ones, in the
    /// order the block saves them, with their classes (a recomputable one storing no rows is
    /// absent).
    fn stored(&self, layer: usize, tokens: u64, split: u64) -> impl Iterator<Item = (&TensorClass, u64)> {
        self.layer_tensors(layer, tokens, split).filter(move |(_, _, recomputable)| split > 0 || !recomputable).map(|(c, b, _)| (c, b))
    }

    /// What an offloaded layer's backward reads back whole, ahead of it, with `split` rows of the
    /// recomputable tensors stored: every stored tensor, or under token tiles the ones not read
    /// tile by tile.
    pub fn layer_read_whole(&self, layer: usize, tokens: u64, split: u64) -> u64 {
        self.stored(layer, tokens, split).filter(|(c, _)| !c.sliced).map(|(_, b)| b).sum()
    }

    /// The largest single tensor any layer stores with `split` rows (what the NVMe tier's
    /// staging buffer grows to).
    pub fn largest_stored(&self, tokens: u64, split: u64) -> u64 {
        (0..self.layers).flat_map(|l| self.stored(l, tokens, split).map(|(_, b)| b)).max().unwrap_or(0)
    }

    /// Layer `layer`'s stored tensors when offloaded with `split` rows of the recomputable ones,
    /// in the order the block saves them (what [`crate::placement::Placement::fill`] places).
    pub fn stored_tensors(&self, layer: usize, tokens: u64, split: u64) -> Vec<crate::placement::StoredTensor> {
        self.stored(layer, tokens, split).map(|(c, bytes)| crate::placement::StoredTensor { name: c.name.clone(), bytes }).collect()
    }

    /// Bytes a tier holds for layer `layer` stored with `split` rows, each tensor rounded up to
    /// the tier's granule (as its allocator does).
    pub fn layer_tier_bytes(&self, layer: usize, tokens: u64, split: u64, granule: u64) -> u64 {
        self.stored(layer, tokens, split).map(|(_, b)| b.max(1).div_ceil(granule) * granule).sum()
    }
}

/// Rows of the recomputable tensors an offloaded layer stores for α: `round(α·T)`, all of them
/// when that leaves fewer than two rows to recompute (one-row GEMMs take another code path, which
/// would break bit-identity with the resident run).
pub fn stored_rows(alpha: f64, tokens: i64) -> i64 {
    match (alpha * tokens as f64).round() as i64 {
        s if s >= tokens - 1 => tokens,
        s => s.max(0),
    }
}
