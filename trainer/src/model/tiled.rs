//! Token tiles inside a block (ALST's tiled MLP, extended to every op but the attention kernel
//! itself): RMSNorm, the seven projections (with LoRA), RoPE and SwiGLU run over `tile` tokens
//! at a time, forward and backward, and the attention backward runs by query tiles, so no
//! `[T, intermediate]` tensor exists whole. An offloaded layer's backward holds whole only K, V,
//! their gradients, the logsumexp and the residual gradient; every other saved tensor comes from
//! the activation store one tile's rows at a time, the next tile's on their way meanwhile
//! ([`TileReader`]: MEMO's token-wise swapping inside a layer; a kept layer's tensors stay whole
//! where they are). Weight, norm and adapter gradients are summed over the
//! tiles.
//!
//! Tiles never cross a document boundary ([`tiles`]): a tile's queries are one chunk of one
//! document, whose backward takes the keys from the document's start to the tile's end
//! ([`attention::backward_query_chunk`]). The backward visits the tiles last to first
//! ([`backward_order`]).
//!
//! With MEMO's split the forward keeps only rows `[0, split)` of the recomputable tensors (the
//! other rows never exist beyond their tile) and the backward recomputes a tile's rows when it
//! reaches the tile, from the layer input and the attention output, which are stored whole, as
//! are K and V ([`block::recomputable`]). LoRA dropout masks are drawn up front for the whole
//! sequence, in the order the untiled pass draws them, and saved: tiles and their recompute read
//! the same masks (so, unlike the untiled recompute, α < 1 works with dropout on).
//!
//! Recomputed rows equal the forward's bits: a tile is recomputed whole, over the forward's tile
//! boundaries (see [`tile_is_stored`]).
use kernels::{attention, lora, rmsnorm, rope, swiglu};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::block::{self, name, BlockSaved, Context, Layout, LoraSaved, Masks};
use crate::model::layer::Layer;
use crate::model::proj::Proj;
use crate::model::stash::{Stashed, TileReader};
use offload::store::ActivationStore;

/// A tile: rows `[start, start + len)` of the document that begins at row `doc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub doc: i64,
    pub start: i64,
    pub len: i64,
}

/// The tiles of a packed sequence (document offsets `cu_seqlens`): `tile` tokens each, the last of
/// a document shorter, none crossing a document boundary.
pub fn tiles(cu_seqlens: &[i64], tile: i64) -> Vec<Tile> {
    let tile = tile.max(1);
    cu_seqlens.windows(2).flat_map(|w| (w[0]..w[1]).step_by(tile as usize).map(move |a| Tile { doc: w[0], start: a, len: tile.min(w[1] - a) })).collect()
}

/// Whether tile `[a, a+n)` lies in the stored rows `[0, split)`. A tile that does not is
/// recomputed whole, as the forward computed it (same rows, same GEMM shapes, so the same bits;
/// a row subset of a GEMM can take another kernel path). The rows of a straddling tile that were
/// stored are recomputed too: at most a tile per layer.
fn tile_is_stored(tile: &Tile, split: i64) -> bool {
    tile.start + tile.len <= split
}

/// The LoRA dropout keep-masks of the whole sequence, drawn in the untiled pass's order (q, k, v,
/// o, gate, up, down: the order its projections run) so that a seeded run draws the same masks.
fn draw_masks(layer: &Layer, ctx: &Context, t: i64, input: (Kind, Device)) -> Vec<(Proj, Tensor)> {
    if !ctx.train {
        return Vec::new();
    }
    Proj::ALL
        .into_iter()
        .filter_map(|p| {
            let lin = layer.proj(p);
            let ad = lin.lora.as_ref().filter(|ad| ad.dropout > 0.0)?;
            Some((p, lora::draw_keep(&[t, lin.weight.size()[1]], input, ad.dropout)))
        })
        .collect()
}

/// Rows `[0, split)` of tensors produced tile by tile (the stored part of the recomputable
/// ones), each written into its `[split, ...]` tensor as its tiles come (no tile outlives its
/// step and nothing is concatenated).
struct Gather {
    split: i64,
    stored: Vec<(&'static str, Tensor)>,
}

impl Gather {
    fn new(split: i64) -> Gather {
        Gather { split, stored: Vec::new() }
    }

    /// Adds tile `t` (starting at row `a`): its rows below `split`.
    fn add(&mut self, name: &'static str, a: i64, t: &Tensor) {
        let n = (self.split - a).min(t.size()[0]);
        if n <= 0 {
            return;
        }
        let whole = match self.stored.iter().position(|(m, _)| *m == name) {
            Some(i) => &self.stored[i].1,
            None => {
                let mut shape = t.size();
                shape[0] = self.split;
                self.stored.push((name, Tensor::empty(shape.as_slice(), (t.kind(), t.device()))));
                &self.stored[self.stored.len() - 1].1
            }
        };
        whole.narrow(0, a, n).copy_(&t.narrow(0, 0, n));
    }

    /// The stored rows of `name` (none: an empty placeholder).
    fn take(&mut self, name: &str, like: (Kind, Device)) -> Tensor {
        match self.stored.iter().position(|(m, _)| *m == name) {
            Some(i) => self.stored.swap_remove(i).1,
            None => Tensor::empty([0], like),
        }
    }
}

/// Joins the LoRA low-rank activations of one tile into the whole-sequence lists.
fn gather_lora(all: &mut Vec<(&'static str, Vec<Tensor>)>, tile: LoraSaved) {
    for (name, xa, _keep) in tile {
        match all.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(xa),
            None => all.push((name, vec![xa])),
        }
    }
}

/// Parameter gradients summed over tiles, in the order they first appear, in the accumulation
/// dtype (a bf16 weight gradient summed in bf16 over many tiles would lose bits at every add).
#[derive(Default)]
struct GradSum(Vec<(String, Tensor, Kind)>);

impl GradSum {
    fn add(&mut self, tile: Vec<(String, Tensor)>) {
        for (n, g) in tile {
            match self.0.iter_mut().find(|(m, _, _)| *m == n) {
                Some((_, acc, _)) => *acc += g,
                None => {
                    let kind = g.kind();
                    self.0.push((n, g.to_kind(kernels::accum_kind(kind)), kind));
                }
            }
        }
    }

    /// The sums in the gradients' own dtypes.
    fn into_grads(self) -> Vec<(String, Tensor)> {
        self.0.into_iter().map(|(n, g, kind)| (n, g.to_kind(kind))).collect()
    }
}

/// [`block::forward`] over token tiles of `tile` rows, keeping `split` rows of the recomputable
/// tensors (`T`: all of them).
///
/// # Shapes
/// - `x`: `[T, D]` → `[T, D]`; the saved recomputable tensors have `min(split, T)` rows.
pub fn forward(layer: &Layer, x: &Tensor, ctx: &Context, layer_idx: usize, tile: i64, split: i64) -> Result<(Tensor, BlockSaved)> {
    let t = x.size()[0];
    let like = (x.kind(), x.device());
    let masks = draw_masks(layer, ctx, t, like);
    let mut stored_rows = Gather::new(split);
    let mut xa = Vec::new();
    let q = Tensor::empty([t, ctx.heads, ctx.head_dim], like);
    let k = Tensor::empty([t, ctx.kv_heads, ctx.head_dim], like);
    let v = Tensor::empty([t, ctx.kv_heads, ctx.head_dim], like);
    let tiles = tiles(&ctx.segments(), tile);
    for &Tile { start: a, len: n, .. } in &tiles {
        let mut ls = Vec::new();
        let pre = block::pre_attn(layer, &x.narrow(0, a, n), &ctx.cos.narrow(0, a, n), &ctx.sin.narrow(0, a, n), ctx, &mut ls, Masks::Rows { masks: &masks, start: a });
        for (whole, part) in [(&q, &pre.q), (&k, &pre.k), (&v, &pre.v)] {
            whole.narrow(0, a, n).copy_(part);
        }
        stored_rows.add(name::RSTD_ATTN, a, &pre.rstd_attn);
        stored_rows.add(name::X_ATTN, a, &pre.x_attn);
        gather_lora(&mut xa, ls);
    }
    let (o, attn) = block::attend(q, k, v, ctx, layer_idx, &ctx.cu_seqlens)?;
    // q whole is done: keep its stored rows (a copy when rows are dropped) and let the rest go
    // before the post-attention tiles. K and V are saved whole, and of a shard q too, in the
    // heads' layout (`block::recomputable`).
    let attention::Saved { q, k, v, out, lse, philox } = attn;
    let layout = if ctx.seq.is_some() { Layout::ShardedTiled } else { Layout::Tiled };
    let q = if split >= t || !block::recomputable(name::Q, layout) { q } else { q.narrow(0, 0, split.max(0)).copy() };
    let o_flat = o.view([t, ctx.heads * ctx.head_dim]);
    let y = x.empty_like();
    for &Tile { start: a, len: n, .. } in &tiles {
        let mut ls = Vec::new();
        let post = block::post_attn(layer, &x.narrow(0, a, n), &o_flat.narrow(0, a, n), ctx, &mut ls, Masks::Rows { masks: &masks, start: a });
        y.narrow(0, a, n).copy_(&post.y);
        for (nm, part) in [(name::H, &post.h), (name::RSTD_MLP, &post.rstd_mlp), (name::X_MLP, &post.x_mlp), (name::GATE, &post.gate), (name::UP, &post.up), (name::ACT, &post.act)] {
            stored_rows.add(nm, a, part);
        }
        gather_lora(&mut xa, ls);
    }
    let lora = xa
        .into_iter()
        .map(|(nm, parts)| {
            let keep_mask = masks.iter().find(|(p, _)| p.hf_name() == nm).map(|(_, m)| m.shallow_clone());
            (nm, if parts.len() == 1 { parts[0].shallow_clone() } else { Tensor::cat(&parts, 0) }, keep_mask)
        })
        .collect();
    let saved = BlockSaved {
        x: x.shallow_clone(),
        rstd_attn: stored_rows.take(name::RSTD_ATTN, like),
        x_attn: stored_rows.take(name::X_ATTN, like),
        attn: attention::Saved { q, k, v, out, lse, philox },
        h: stored_rows.take(name::H, like),
        rstd_mlp: stored_rows.take(name::RSTD_MLP, like),
        x_mlp: stored_rows.take(name::X_MLP, like),
        gate: stored_rows.take(name::GATE, like),
        up: stored_rows.take(name::UP, like),
        act: stored_rows.take(name::ACT, like),
        lora,
        kept: None,
        channels: None,
    };
    Ok((y, saved))
}

/// Saved tensors a tiled backward reads whole: K and V (every query tile attends to them), the
/// logsumexp (`[heads, T]`, not token-major) and the attention RNG state; of a shard also q and
/// the attention output (its attention backward runs whole, in the heads' layout). It reads every
/// other one tile's rows at a time ([`crate::model::stash::TileReader`]).
pub fn read_whole(name: &str, layout: Layout) -> bool {
    matches!(name, name::K | name::V | name::ATTN_LSE | name::PHILOX_SEED | name::PHILOX_OFFSET) || (layout == Layout::ShardedTiled && matches!(name, name::Q | name::ATTN_OUT))
}

/// A pass of a tiled backward over the tiles: all of a tile's backward at once ([`backward`]), or
/// for a shard ([`backward_sharded`]) the part after attention (MLP, post-attention norm,
/// o_proj), then, after the whole attention backward, the part before it (q/k/v projections,
/// input norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    All,
    Mlp,
    Qkv,
}

/// The projection a LoRA tensor (`lora_xa:{proj}`, `lora_keep:{proj}`) belongs to.
fn lora_proj(name: &str) -> Option<Proj> {
    let hf = name.strip_prefix("lora_")?.split_once(':')?.1;
    Proj::ALL.into_iter().find(|p| p.hf_name() == hf)
}

/// Whether `pass` reads saved tensor `name` at all.
fn in_pass(name: &str, pass: Pass) -> bool {
    match pass {
        Pass::All => true,
        Pass::Mlp => matches!(name, name::X | name::H | name::RSTD_MLP | name::X_MLP | name::GATE | name::UP | name::ACT) || lora_proj(name).is_some_and(|p| matches!(p, Proj::O | Proj::Gate | Proj::Up | Proj::Down)),
        Pass::Qkv => matches!(name, name::X | name::RSTD_ATTN | name::X_ATTN) || lora_proj(name).is_some_and(|p| matches!(p, Proj::Q | Proj::K | Proj::V)),
    }
}

/// Whether `pass` of the backward of tile `tl` reads its rows of saved tensor `name` (with
/// `split` rows of the recomputable tensors stored): a recomputed tile reads only what is never
/// recomputed (the layer input, the attention output, LoRA's activations and masks); a shard's
/// MLP pass reads the layer input only to recompute a tile.
pub fn tile_reads(name: &str, tl: &Tile, split: i64, layout: Layout, pass: Pass) -> bool {
    if read_whole(name, layout) || !in_pass(name, pass) {
        return false;
    }
    let stored = tile_is_stored(tl, split);
    match (pass, name) {
        (Pass::Mlp, name::X) => !stored,
        _ => stored || !block::recomputable(name, layout),
    }
}

/// Whether the reader of `pass` frees `name` when it is done: what it reads by rows and no later
/// pass reads (the layer input goes after the q/k/v pass).
pub fn released_after(name: &str, layout: Layout, pass: Pass) -> bool {
    !read_whole(name, layout) && in_pass(name, pass) && !(pass == Pass::Mlp && name == name::X)
}

/// The order in which [`backward`] visits the tiles: last to first. When a tile's queries are
/// done, every later query of its document is too, so its keys' gradients are complete and its
/// share of the input gradient (through q, K and V) is taken in one go.
pub fn backward_order(cu_seqlens: &[i64], tile: i64) -> Vec<Tile> {
    let mut order = tiles(cu_seqlens, tile);
    order.reverse();
    order
}

/// [`block::backward`] over token tiles, in [`backward_order`], reading the layer's saved
/// tensors from `saved` (from [`forward`]: `split` rows of the recomputable ones; K and V whole).
/// `dy` is consumed: its storage becomes the returned input gradient (the residual's `dy + …` is
/// added in place, tile by tile).
///
/// Per tile: the MLP, post-attention norm and o_proj backward; the tile's queries' attention
/// backward against the document's keys up to the tile's end (key gradients added into whole
/// dK, dV in the accumulation dtype); then the tile's share of the input gradient through q, K
/// and V. Whole throughout: K, V, dK, dV and the residual gradient; the rest one tile at a time.
pub fn backward(layer: &Layer, dy: Tensor, mut saved: TileReader, ctx: &Context, layer_idx: usize) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let b = Backward { layer, ctx, layer_idx, split: saved.split() };
    let mut grads = GradSum::default();
    let mut dkv = None;
    while let Some((tl, s)) = saved.next_tile()? {
        let (dk, dv) = dkv.get_or_insert_with(|| {
            let acc = (kernels::accum_kind(dy.kind()), dy.device());
            (Tensor::zeros(s.attn.k.size(), acc), Tensor::zeros(s.attn.v.size(), acc))
        });
        grads.add(b.tile(&tl, &dy, s, dk, dv)?);
    }
    saved.finish()?;
    Ok((dy, grads.into_grads()))
}

/// What a layer's backward reads throughout.
struct Backward<'a> {
    layer: &'a Layer,
    ctx: &'a Context,
    layer_idx: usize,
    split: i64,
}

/// A tile's post-attention tensors (stored rows, or recomputed from the layer input and the
/// attention output).
struct PostRows {
    h: Tensor,
    rstd_mlp: Tensor,
    x_mlp: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

impl Backward<'_> {
    /// One tile, `s` holding its rows of the saved tensors it reads (K, V and the logsumexp
    /// whole): the MLP, post-attention norm and o_proj backward (dh into `dy`'s rows), the tile's
    /// queries' attention backward (key gradients added into `dk`, `dv`), and the tile's share of
    /// the input gradient through q, K and V (added into `dy`'s rows; the tile's rows of `dk`,
    /// `dv` are complete, see [`backward_order`]). Returns the tile's parameter gradients.
    fn tile(&self, tl: &Tile, dy: &Tensor, s: BlockSaved, dk: &Tensor, dv: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let (layer, ctx) = (self.layer, self.ctx);
        let (a, n) = (tl.start, tl.len);
        let BlockSaved { x, rstd_attn, x_attn, attn, h, rstd_mlp, x_mlp, gate, up, act, lora, .. } = s;
        let masks = keep_masks(&lora);
        let m = Masks::Rows { masks: &masks, start: 0 };
        let kept = tile_is_stored(tl, self.split);
        let (cos, sin) = cos_sin_rows(ctx, tl);
        let o_flat = attn.out.reshape([n, ctx.heads * ctx.head_dim]);
        let mut ls = lora;
        let mut g = Vec::new();
        let mut dy_t = dy.narrow(0, a, n);
        let post = kept.then_some(PostRows { h, rstd_mlp, x_mlp, gate, up, act });
        let d_out = self.post_attention(&mut dy_t, &x, &o_flat, post, &mut ls, m, &mut g)?;
        drop(o_flat);
        // This tile's queries against the document's keys up to the tile's end.
        let (x_attn, rstd_attn, q) = if kept {
            (x_attn, rstd_attn, attn.q)
        } else {
            // q only: K and V are stored whole.
            let (x_attn, st) = rmsnorm::forward(&x, &layer.input_layernorm, ctx.eps);
            let q = block::attn_proj(layer, Proj::Q, &x_attn, &cos, &sin, ctx, &mut Vec::new(), m);
            (x_attn, st.rstd, q)
        };
        let keys = a + n - tl.doc;
        let key_rows = |z: &Tensor| z.narrow(0, tl.doc, keys);
        let dq = attention::backward_query_chunk(
            &d_out.view([n, ctx.heads, ctx.head_dim]),
            &q,
            &key_rows(&attn.k),
            &key_rows(&attn.v),
            &attn.out,
            &attn.lse.narrow(1, a, n),
            attn.philox.as_ref(),
            &ctx.attn[self.layer_idx],
            &key_rows(dk),
            &key_rows(dv),
        )?;
        drop((d_out, q));
        let rows = |z: &Tensor| z.narrow(0, a, n);
        self.qkv_share(tl, &mut dy_t, x, x_attn, rstd_attn, &dq, &rows(dk), &rows(dv), &mut ls, &mut g)?;
        Ok(g)
    }

    /// The MLP, post-attention norm and o_proj backward of one tile: dh added into `dy_t` (the
    /// tile's rows of the residual gradient); returns the gradient of the attention output
    /// (`[n, heads·head_dim]`). `post`: the stored rows, or None to recompute them from `x` and
    /// `o_flat`.
    #[allow(clippy::too_many_arguments)]
    fn post_attention(&self, dy_t: &mut Tensor, x: &Tensor, o_flat: &Tensor, post: Option<PostRows>, ls: &mut LoraSaved, m: Masks, g: &mut Vec<(String, Tensor)>) -> Result<Tensor> {
        let (layer, ctx) = (self.layer, self.ctx);
        let PostRows { h, rstd_mlp, x_mlp, gate, up, act } = match post {
            Some(p) => p,
            None => {
                let p = block::post_attn(layer, x, o_flat, ctx, &mut Vec::new(), m);
                PostRows { h: p.h, rstd_mlp: p.rstd_mlp, x_mlp: p.x_mlp, gate: p.gate, up: p.up, act: p.act }
            }
        };
        let dact = block::proj_backward(dy_t, &act, layer, Proj::Down, ctx, ls, g)?;
        drop(act);
        let (dgate, dup) = swiglu::backward(&dact, &swiglu::Saved { gate, up });
        drop(dact);
        let dx_mlp = block::proj_backward(&dgate, &x_mlp, layer, Proj::Gate, ctx, ls, g)? + block::proj_backward(&dup, &x_mlp, layer, Proj::Up, ctx, ls, g)?;
        drop((dgate, dup, x_mlp));
        let (dh_norm, dw2) = rmsnorm::backward(&dx_mlp, &rmsnorm::Saved { x: h, rstd: rstd_mlp }, &layer.post_attention_layernorm, ctx.full);
        if let Some(w) = dw2 {
            g.push(("post_attention_layernorm.weight".into(), w));
        }
        *dy_t += dh_norm; // dh = dy + dh_norm, in dy's storage
        block::proj_backward(dy_t, o_flat, layer, Proj::O, ctx, ls, g)
    }

    /// The tile's share of the input gradient through q, K and V (`dq` `[n, heads, head_dim]`,
    /// `dk`, `dv` `[n, kv_heads, head_dim]`, before RoPE's backward), added into `dy_t`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_share(&self, tl: &Tile, dy_t: &mut Tensor, x: Tensor, x_attn: Tensor, rstd_attn: Tensor, dq: &Tensor, dk: &Tensor, dv: &Tensor, ls: &mut LoraSaved, g: &mut Vec<(String, Tensor)>) -> Result<()> {
        let (layer, ctx) = (self.layer, self.ctx);
        let n = tl.len;
        let (cos, sin) = cos_sin_rows(ctx, tl);
        let kind = x.kind();
        let kvd = ctx.kv_heads * ctx.head_dim;
        let dq = rope::backward(dq, &cos, &sin).reshape([n, ctx.heads * ctx.head_dim]);
        let dk_t = rope::backward(&dk.to_kind(kind), &cos, &sin).reshape([n, kvd]);
        let dv_t = dv.to_kind(kind).reshape([n, kvd]);
        let dx_attn = block::proj_backward(&dq, &x_attn, layer, Proj::Q, ctx, ls, g)? + block::proj_backward(&dk_t, &x_attn, layer, Proj::K, ctx, ls, g)? + block::proj_backward(&dv_t, &x_attn, layer, Proj::V, ctx, ls, g)?;
        drop((dq, dk_t, dv_t, x_attn));
        let (dx_norm, dw1) = rmsnorm::backward(&dx_attn, &rmsnorm::Saved { x, rstd: rstd_attn }, &layer.input_layernorm, ctx.full);
        if let Some(w) = dw1 {
            g.push(("input_layernorm.weight".into(), w));
        }
        *dy_t += dx_norm;
        Ok(())
    }
}

/// The tile's rows of the RoPE tables.
fn cos_sin_rows(ctx: &Context, tl: &Tile) -> (Tensor, Tensor) {
    (ctx.cos.narrow(0, tl.start, tl.len), ctx.sin.narrow(0, tl.start, tl.len))
}

/// The LoRA dropout keep-masks among a tile's saved LoRA tensors, by projection.
fn keep_masks(lora: &LoraSaved) -> Vec<(Proj, Tensor)> {
    lora.iter().filter_map(|(nm, _, keep)| Some((Proj::ALL.into_iter().find(|p| p.hf_name() == *nm)?, keep.as_ref()?.shallow_clone()))).collect()
}

/// [`backward`] for one shard of a sequence split over ranks ([`crate::model::seq`]): its
/// attention runs over every token of the rank's heads, so no tile's queries can be done alone.
/// Two passes over the tiles (last to first) around one whole attention backward:
/// 1. per tile the MLP, post-attention norm and o_proj backward (dh into `dy`'s rows), the
///    attention output's gradient written into a whole `[T, heads·head_dim]`;
/// 2. the attention backward between all-to-alls ([`block::attend_backward`]): q, K, V's
///    gradients for this shard's tokens, whole;
/// 3. per tile the share of the input gradient through q, K and V, added into `dy`'s rows.
///
/// The saved tensors come from `store` through a [`TileReader`] per pass: q, K, V (the heads'
/// layout), the attention output and the logsumexp whole, the others a tile's rows at a time.
#[allow(clippy::too_many_arguments)]
pub fn backward_sharded(layer: &Layer, dy: Tensor, store: &mut ActivationStore, l: usize, stashed: &Stashed, tile: i64, ahead: &[(usize, Vec<String>)], ctx: &Context) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let b = Backward { layer, ctx, layer_idx: l, split: stashed.split };
    let order = backward_order(&ctx.segments(), tile);
    let t = dy.size()[0];
    let mut grads = GradSum::default();
    let d_out = Tensor::empty([t, ctx.heads * ctx.head_dim], (dy.kind(), dy.device()));
    let mut attn = None;
    let mut reader = TileReader::new(store, l, stashed, order.clone(), ahead, Pass::Mlp)?;
    while let Some((tl, s)) = reader.next_tile()? {
        let (a, n) = (tl.start, tl.len);
        let BlockSaved { x, attn: whole, h, rstd_mlp, x_mlp, gate, up, act, lora, .. } = s;
        let masks = keep_masks(&lora);
        let post = tile_is_stored(&tl, b.split).then_some(PostRows { h, rstd_mlp, x_mlp, gate, up, act });
        let (mut ls, mut g) = (lora, Vec::new());
        let o_flat = whole.out.narrow(0, a, n).reshape([n, ctx.heads * ctx.head_dim]);
        let d = b.post_attention(&mut dy.narrow(0, a, n), &x, &o_flat, post, &mut ls, Masks::Rows { masks: &masks, start: 0 }, &mut g)?;
        d_out.narrow(0, a, n).copy_(&d);
        grads.add(g);
        attn = Some(whole);
    }
    reader.finish()?;
    let Some(attn) = attn else { return Ok((dy, grads.into_grads())) };
    let (dq, dk, dv) = block::attend_backward(&d_out.view([t, ctx.heads, ctx.head_dim]), attn, ctx, l, &ctx.cu_seqlens)?;
    drop(d_out);
    let mut reader = TileReader::new(store, l, stashed, order, &[], Pass::Qkv)?;
    while let Some((tl, s)) = reader.next_tile()? {
        let BlockSaved { x, rstd_attn, x_attn, lora, .. } = s;
        let (x_attn, rstd_attn) = if tile_is_stored(&tl, b.split) {
            (x_attn, rstd_attn)
        } else {
            let (x_attn, st) = rmsnorm::forward(&x, &layer.input_layernorm, ctx.eps);
            (x_attn, st.rstd)
        };
        let rows = |z: &Tensor| z.narrow(0, tl.start, tl.len);
        let (mut ls, mut g) = (lora, Vec::new());
        b.qkv_share(&tl, &mut dy.narrow(0, tl.start, tl.len), x, x_attn, rstd_attn, &rows(&dq), &rows(&dk), &rows(&dv), &mut ls, &mut g)?;
        grads.add(g);
    }
    reader.finish()?;
    Ok((dy, grads.into_grads()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_sequence_once_within_documents() {
        let spans = |cu: &[i64], tile| tiles(cu, tile).iter().map(|t| (t.doc, t.start, t.len)).collect::<Vec<_>>();
        assert_eq!(spans(&[0, 10], 4), [(0, 0, 4), (0, 4, 4), (0, 8, 2)]);
        assert_eq!(spans(&[0, 3], 8), [(0, 0, 3)]);
        assert_eq!(spans(&[0, 5, 7], 3), [(0, 0, 3), (0, 3, 2), (5, 5, 2)]);
        assert_eq!(spans(&[0, 1, 3], 1), [(0, 0, 1), (1, 1, 1), (1, 2, 1)]);
    }
}
