//! Token tiles inside a block (ALST's tiled MLP, extended to every op but the attention kernel
//! itself): RMSNorm, the seven projections (with LoRA), RoPE and SwiGLU run over `tile` tokens
//! at a time, forward and backward, and the attention backward runs by query tiles, so no
//! `[T, intermediate]` tensor exists whole and a layer's backward holds whole only its input, the
//! residual gradient, the attention output, K, V and their gradients. Weight, norm and adapter
//! gradients are summed over the tiles.
//!
//! Tiles never cross a document boundary ([`tiles`]): a tile's queries are one chunk of one
//! document, whose backward takes the keys from the document's start to the tile's end
//! ([`attention::backward_query_chunk`]).
//!
//! With MEMO's split the forward keeps only rows `[0, split)` of the recomputable tensors (the
//! other rows never exist beyond their tile) and the backward recomputes a tile's rows when it
//! reaches the tile, from the layer input and the attention output, which are stored whole.
//! LoRA dropout masks are drawn up front for the whole sequence, in the order the untiled pass
//! draws them, and saved: tiles and their recompute read the same masks (so, unlike the untiled
//! recompute, α < 1 works with dropout on).
//!
//! Recomputed rows equal the forward's bits: a tile is recomputed whole, over the forward's tile
//! boundaries (see [`stored`]).
use kernels::{attention, lora, rmsnorm, rope, swiglu};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::model::block::{self, name, BlockSaved, Context, LoraSaved, Masks};
use crate::model::layer::Layer;
use crate::model::proj::Proj;

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
fn stored(a: i64, n: i64, split: i64) -> bool {
    a + n <= split
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

/// The tile's rows of every adapter's saved activations (for its projection's backward).
fn lora_rows(lora: &LoraSaved, a: i64, n: i64) -> LoraSaved {
    lora.iter().map(|(name, xa, keep)| (*name, xa.narrow(0, a, n), keep.as_ref().map(|k| k.narrow(0, a, n)))).collect()
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
    let mut keep = Gather::new(split);
    let mut xa = Vec::new();
    let q = Tensor::empty([t, ctx.heads, ctx.head_dim], like);
    let k = Tensor::empty([t, ctx.kv_heads, ctx.head_dim], like);
    let v = Tensor::empty([t, ctx.kv_heads, ctx.head_dim], like);
    let tiles = tiles(&ctx.cu_seqlens, tile);
    for &Tile { start: a, len: n, .. } in &tiles {
        let mut ls = Vec::new();
        let pre = block::pre_attn(layer, &x.narrow(0, a, n), &ctx.cos.narrow(0, a, n), &ctx.sin.narrow(0, a, n), ctx, &mut ls, Masks::Rows { masks: &masks, start: a });
        for (whole, part) in [(&q, &pre.q), (&k, &pre.k), (&v, &pre.v)] {
            whole.narrow(0, a, n).copy_(part);
        }
        keep.add(name::RSTD_ATTN, a, &pre.rstd_attn);
        keep.add(name::X_ATTN, a, &pre.x_attn);
        gather_lora(&mut xa, ls);
    }
    let (o, attn) = attention::forward_packed(&q, &k, &v, &ctx.attn[layer_idx], &ctx.cu_seqlens)?;
    let o_flat = o.view([t, ctx.heads * ctx.head_dim]);
    let y = x.empty_like();
    for &Tile { start: a, len: n, .. } in &tiles {
        let mut ls = Vec::new();
        let post = block::post_attn(layer, &x.narrow(0, a, n), &o_flat.narrow(0, a, n), ctx, &mut ls, Masks::Rows { masks: &masks, start: a });
        y.narrow(0, a, n).copy_(&post.y);
        for (nm, part) in [(name::H, &post.h), (name::RSTD_MLP, &post.rstd_mlp), (name::X_MLP, &post.x_mlp), (name::GATE, &post.gate), (name::UP, &post.up), (name::ACT, &post.act)] {
            keep.add(nm, a, part);
        }
        gather_lora(&mut xa, ls);
    }
    let stored = |whole: &Tensor| if split >= t { whole.shallow_clone() } else { whole.narrow(0, 0, split.max(0)).copy() };
    let lora = xa
        .into_iter()
        .map(|(nm, parts)| {
            let keep_mask = masks.iter().find(|(p, _)| p.hf_name() == nm).map(|(_, m)| m.shallow_clone());
            (nm, if parts.len() == 1 { parts[0].shallow_clone() } else { Tensor::cat(&parts, 0) }, keep_mask)
        })
        .collect();
    let saved = BlockSaved {
        x: x.shallow_clone(),
        rstd_attn: keep.take(name::RSTD_ATTN, like),
        x_attn: keep.take(name::X_ATTN, like),
        attn: attention::Saved { q: stored(&q), k: stored(&k), v: stored(&v), out: attn.out, lse: attn.lse, philox: attn.philox },
        h: keep.take(name::H, like),
        rstd_mlp: keep.take(name::RSTD_MLP, like),
        x_mlp: keep.take(name::X_MLP, like),
        gate: keep.take(name::GATE, like),
        up: keep.take(name::UP, like),
        act: keep.take(name::ACT, like),
        lora,
    };
    Ok((y, saved))
}

/// [`block::backward`] over token tiles, for a [`BlockSaved`] from [`forward`] with `split` rows
/// of its recomputable tensors (a tensor with no rows stored may be any placeholder). `dy` is
/// consumed: its storage becomes the returned input gradient (the residual's `dy + …` is added in
/// place, tile by tile).
///
/// Order: K and V whole (stored, or rebuilt from recomputed tiles); then per tile the MLP,
/// post-attention norm and o_proj backward, the tile's queries' attention backward (key gradients
/// summed into whole dK, dV in the accumulation dtype) and q's share of the input gradient; then
/// per tile K's and V's share (RMSNorm's backward is linear in its output gradient, so the two
/// shares add).
pub fn backward(layer: &Layer, dy: Tensor, s: BlockSaved, ctx: &Context, layer_idx: usize, tile: i64, split: i64) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let t = dy.size()[0];
    let (qd, kvd) = (ctx.heads * ctx.head_dim, ctx.kv_heads * ctx.head_dim);
    let BlockSaved { x, rstd_attn, x_attn, attn, h, rstd_mlp, x_mlp, gate, up, act, lora } = s;
    let masks: Vec<(Proj, Tensor)> = lora
        .iter()
        .filter_map(|(nm, _, keep)| Some((Proj::ALL.into_iter().find(|p| p.hf_name() == *nm)?, keep.as_ref()?.shallow_clone())))
        .collect();
    let m = |start: i64| Masks::Rows { masks: &masks, start };
    let mut grads = GradSum::default();
    let tiles = tiles(&ctx.cu_seqlens, tile);
    let (kind, dev) = (x.kind(), x.device());

    // K and V whole: every later query attends to them.
    let (k, v) = if split >= t {
        (attn.k.shallow_clone(), attn.v.shallow_clone())
    } else {
        let (k, v) = (Tensor::empty([t, ctx.kv_heads, ctx.head_dim], (kind, dev)), Tensor::empty([t, ctx.kv_heads, ctx.head_dim], (kind, dev)));
        if split > 0 {
            k.narrow(0, 0, split).copy_(&attn.k);
            v.narrow(0, 0, split).copy_(&attn.v);
        }
        for &Tile { start: a, len: n, .. } in tiles.iter().filter(|tl| !stored(tl.start, tl.len, split)) {
            let pre = block::pre_attn(layer, &x.narrow(0, a, n), &ctx.cos.narrow(0, a, n), &ctx.sin.narrow(0, a, n), ctx, &mut Vec::new(), m(a));
            let skip = (split - a).max(0);
            k.narrow(0, a + skip, n - skip).copy_(&pre.k.narrow(0, skip, n - skip));
            v.narrow(0, a + skip, n - skip).copy_(&pre.v.narrow(0, skip, n - skip));
        }
        (k, v)
    };
    let acc = kernels::accum_kind(kind);
    let (dk, dv) = (Tensor::zeros([t, ctx.kv_heads, ctx.head_dim], (acc, dev)), Tensor::zeros([t, ctx.kv_heads, ctx.head_dim], (acc, dev)));
    let o_flat = attn.out.view([t, qd]);
    for &Tile { doc, start: a, len: n } in &tiles {
        let rows = |z: &Tensor| z.narrow(0, a, n);
        let kept = stored(a, n, split);
        let (cos, sin) = (rows(&ctx.cos), rows(&ctx.sin));
        // MLP, post-attention norm and o_proj.
        let (h_t, rstd_t, xm_t, gate_t, up_t, act_t) = if kept {
            (rows(&h), rows(&rstd_mlp), rows(&x_mlp), rows(&gate), rows(&up), rows(&act))
        } else {
            let p = block::post_attn(layer, &rows(&x), &rows(&o_flat), ctx, &mut Vec::new(), m(a));
            (p.h, p.rstd_mlp, p.x_mlp, p.gate, p.up, p.act)
        };
        let mut ls = lora_rows(&lora, a, n);
        let mut g = Vec::new();
        let mut dy_t = dy.narrow(0, a, n);
        let dact = block::proj_backward(&dy_t, &act_t, layer, Proj::Down, ctx, &mut ls, &mut g)?;
        drop(act_t);
        let (dgate, dup) = swiglu::backward(&dact, &swiglu::Saved { gate: gate_t, up: up_t });
        drop(dact);
        let dx_mlp = block::proj_backward(&dgate, &xm_t, layer, Proj::Gate, ctx, &mut ls, &mut g)? + block::proj_backward(&dup, &xm_t, layer, Proj::Up, ctx, &mut ls, &mut g)?;
        drop((dgate, dup, xm_t));
        let (dh_norm, dw2) = rmsnorm::backward(&dx_mlp, &rmsnorm::Saved { x: h_t, rstd: rstd_t }, &layer.post_attention_layernorm, ctx.full);
        if let Some(w) = dw2 {
            g.push(("post_attention_layernorm.weight".into(), w));
        }
        dy_t += dh_norm; // dh = dy + dh_norm, in dy's storage
        let do_t = block::proj_backward(&dy_t, &rows(&o_flat), layer, Proj::O, ctx, &mut ls, &mut g)?;
        // This tile's queries against the document's keys up to the tile's end.
        let (x_attn_t, rstd_attn_t, q_t) = if kept {
            (rows(&x_attn), rows(&rstd_attn), rows(&attn.q))
        } else {
            let p = block::pre_attn(layer, &rows(&x), &cos, &sin, ctx, &mut Vec::new(), m(a));
            (p.x_attn, p.rstd_attn, p.q)
        };
        let keys = a + n - doc;
        let (dq_t, parts) = attention::backward_query_chunk(
            &do_t.view([n, ctx.heads, ctx.head_dim]),
            &q_t,
            &k.narrow(0, doc, keys),
            &v.narrow(0, doc, keys),
            &attn.out.narrow(0, a, n),
            &attn.lse.narrow(1, a, n),
            attn.philox.as_ref(),
            &ctx.attn[layer_idx],
        )?;
        drop((do_t, q_t));
        for (k0, dkp, dvp) in parts {
            let len = dkp.size()[0];
            let mut into = dk.narrow(0, doc + k0, len);
            into += dkp.to_kind(acc);
            let mut into = dv.narrow(0, doc + k0, len);
            into += dvp.to_kind(acc);
        }
        // q's share of the input gradient.
        let dq_t = rope::backward(&dq_t, &cos, &sin).reshape([n, qd]);
        let dx_attn = block::proj_backward(&dq_t, &x_attn_t, layer, Proj::Q, ctx, &mut ls, &mut g)?;
        let (dx_norm, dw1) = rmsnorm::backward(&dx_attn, &rmsnorm::Saved { x: rows(&x), rstd: rstd_attn_t }, &layer.input_layernorm, ctx.full);
        if let Some(w) = dw1 {
            g.push(("input_layernorm.weight".into(), w));
        }
        dy_t += dx_norm;
        grads.add(g);
    }
    drop((h, rstd_mlp, x_mlp, gate, up, act, o_flat, attn, k, v));

    // K's and V's share of the input gradient, tile by tile.
    for &Tile { start: a, len: n, .. } in &tiles {
        let (x_attn_t, rstd_t) = if stored(a, n, split) {
            (x_attn.narrow(0, a, n), rstd_attn.narrow(0, a, n))
        } else {
            let (xn, s) = rmsnorm::forward(&x.narrow(0, a, n), &layer.input_layernorm, ctx.eps);
            (xn, s.rstd)
        };
        let dk_t = rope::backward(&dk.narrow(0, a, n).to_kind(kind), &ctx.cos.narrow(0, a, n), &ctx.sin.narrow(0, a, n)).reshape([n, kvd]);
        let dv_t = dv.narrow(0, a, n).to_kind(kind).reshape([n, kvd]);
        let mut ls = lora_rows(&lora, a, n);
        let mut g = Vec::new();
        let dx_attn = block::proj_backward(&dk_t, &x_attn_t, layer, Proj::K, ctx, &mut ls, &mut g)? + block::proj_backward(&dv_t, &x_attn_t, layer, Proj::V, ctx, &mut ls, &mut g)?;
        drop((dk_t, dv_t, x_attn_t));
        let (dx_norm, dw1) = rmsnorm::backward(&dx_attn, &rmsnorm::Saved { x: x.narrow(0, a, n), rstd: rstd_t }, &layer.input_layernorm, ctx.full);
        if let Some(w) = dw1 {
            g.push(("input_layernorm.weight".into(), w));
        }
        let mut dx_t = dy.narrow(0, a, n);
        dx_t += dx_norm;
        grads.add(g);
    }
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
