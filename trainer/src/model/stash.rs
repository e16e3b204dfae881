//! Between a layer's forward and its backward: its saved activations ([`BlockSaved`]) go where
//! the step's placement says and come back for the backward.
//!
//! Who does what: the block says what is saved ([`block::forward`]), the placement says where each
//! tensor waits and how many rows of the recomputable ones are stored
//! ([`planner::placement::Placement`]), the store moves the bytes
//! ([`offload::store::ActivationStore`]); this module is the glue, and the recompute of the rows
//! not stored ([`block::recompute_tail`]). Under token tiles the backward reads a layer's saved
//! tensors tile by tile ([`TileReader`]).
use std::collections::BTreeMap;

use offload::store::ActivationStore;
use planner::placement::Placement;
use tch::Tensor;

use crate::error::{Result, TrainerError};
use crate::model::block::{self, BlockSaved, Context};
use crate::model::layer::Layer;
use crate::model::tiled::{self, Tile};

/// What one layer handed to the store.
pub struct Stashed {
    /// The names stored (a recomputable tensor storing no rows is absent).
    pub names: Vec<String>,
    /// Rows of the recomputable tensors stored (`T` when all of them).
    pub split: i64,
    /// How the layer ran (which changes what is recomputable).
    pub layout: block::Layout,
}

impl Stashed {
    /// The stored names and every recomputable one that stored no rows: the names a
    /// [`BlockSaved`] is rebuilt from.
    fn with_recomputable(&self) -> Vec<String> {
        let mut all = self.names.clone();
        all.extend(block::RECOMPUTABLE.iter().filter(|n| block::recomputable(n, self.layout) && !self.names.iter().any(|m| m == *n)).map(|n| n.to_string()));
        all
    }

    /// What the backward takes whole, to be read back ahead of it: every stored tensor, or under
    /// token tiles the ones not read tile by tile ([`tiled::read_whole`]).
    pub fn read_whole(&self) -> Vec<String> {
        self.names.iter().filter(|n| !self.layout.tiled() || tiled::read_whole(n, self.layout)).cloned().collect()
    }
}

/// Hands layer `l`'s saved tensors to the store: the recomputable ones (of a layer run as
/// `layout` says) cut to the placement's `stored_rows(α, T)` rows, each tensor to its tier.
pub fn put(store: &mut ActivationStore, placement: &Placement, l: usize, saved: BlockSaved, tokens: i64, layout: block::Layout) -> Result<Stashed> {
    let split = planner::inventory::stored_rows(placement.alpha(l), tokens);
    let mut names = Vec::new();
    for (name, t) in saved.into_named() {
        let t = if split < tokens && block::recomputable(&name, layout) {
            if split == 0 {
                continue; // recomputed whole
            }
            if t.size()[0] == split {
                t // cut already (token tiles keep only these rows)
            } else {
                // A copy, so that the dropped rows' memory is released.
                t.narrow(0, 0, split).copy()
            }
        } else {
            t
        };
        let tier = placement.tier_of(l, &name).ok_or_else(|| TrainerError::Device(format!("internal: the placement has no tier for layer {l}'s `{name}`")))?;
        store.put(l, &name, t, tier)?;
        names.push(name);
    }
    Ok(Stashed { names, split, layout })
}

/// Takes layer `l`'s saved tensors back for its backward, recomputing the rows it did not store
/// from the layer input and the attention output (always stored).
pub fn take(store: &mut ActivationStore, layer: &Layer, l: usize, stashed: &Stashed, ctx: &Context, tokens: i64) -> Result<BlockSaved> {
    let (names, split) = (&stashed.names, stashed.split);
    if split == tokens {
        return BlockSaved::from_named(names, |n| Ok(store.take(l, n)?));
    }
    // What the rest is rebuilt from, always stored: the layer input and the attention output (in
    // a sparse layer, the kept tokens' and their rows).
    let x_in = store.take(l, block::name::X)?;
    let attn_out = store.take(l, block::name::ATTN_OUT)?;
    let (sources, tail) = match stashed.layout {
        block::Layout::Sparse => {
            let kept = store.take(l, block::name::SPARSE_KEPT)?;
            let tail = block::recompute_sparse_tail(layer, &x_in, &attn_out, &kept, ctx, split);
            (vec![(block::name::X, x_in), (block::name::ATTN_OUT, attn_out), (block::name::SPARSE_KEPT, kept)], tail)
        }
        _ => {
            let tail = block::recompute_tail(layer, &x_in, &attn_out, ctx, split);
            (vec![(block::name::X, x_in), (block::name::ATTN_OUT, attn_out)], tail)
        }
    };
    // MLP channel sparsity: the recomputed MLP tensors keep the forward's channels (always stored).
    let channels = if names.iter().any(|n| n == block::name::MLP_CHANNELS) { Some(store.take(l, block::name::MLP_CHANNELS)?) } else { None };
    let mut tail: BTreeMap<&str, Tensor> = tail
        .into_iter()
        .map(|(n, t)| match &channels {
            Some(c) if block::CHANNELED.contains(&n) => (n, t.index_select(1, c)),
            _ => (n, t),
        })
        .collect();
    let mut sources = sources;
    if let Some(c) = channels {
        sources.push((block::name::MLP_CHANNELS, c));
    }
    BlockSaved::from_named(&stashed.with_recomputable(), |n| match sources.iter().find(|(s, _)| *s == n) {
        Some((_, t)) => Ok(t.shallow_clone()),
        None if block::recomputable(n, stashed.layout) => {
            let rest = tail.remove(n).ok_or_else(|| TrainerError::Device(format!("recompute lost `{n}`")))?;
            Ok(if split > 0 { Tensor::cat(&[store.take(l, n)?, rest], 0) } else { rest })
        }
        None => Ok(store.take(l, n)?),
    })
}

/// A layer's saved tensors for its tiled backward ([`tiled::backward`]): the ones it reads whole
/// taken at once, the others one tile's rows at a time in the backward's tile order, the next
/// tile's rows on their way while a tile computes (MEMO's token-wise swapping inside a layer).
/// A tensor read by rows stays in the store until [`TileReader::finish`]. It reads one tile
/// ahead: the planner counts [`planner::inventory::TILES_HELD`] tiles of each.
pub struct TileReader<'s> {
    store: &'s mut ActivationStore,
    l: usize,
    stashed: &'s Stashed,
    whole: Vec<(String, Tensor)>,
    order: Vec<Tile>,
    next: usize,
    /// Which of the backward's passes over the tiles this reader serves.
    pass: tiled::Pass,
}

impl<'s> TileReader<'s> {
    /// Takes layer `l`'s whole tensors (the first pass) and starts reading the first tile's rows
    /// of what `pass` reads, then the whole tensors of the layers `ahead` (the store serves
    /// requests in order: the first tile must not wait behind the next layer's K and V); `order`
    /// is the backward's ([`tiled::backward_order`]).
    pub fn new(store: &'s mut ActivationStore, l: usize, stashed: &'s Stashed, order: Vec<Tile>, ahead: &[(usize, Vec<String>)], pass: tiled::Pass) -> Result<TileReader<'s>> {
        let mut whole = Vec::new();
        if pass != tiled::Pass::Qkv {
            for n in stashed.read_whole() {
                let t = store.take(l, &n)?;
                whole.push((n, t));
            }
        }
        let mut r = TileReader { store, l, stashed, whole, order, next: 0, pass };
        if let Some(first) = r.order.first().copied() {
            r.prefetch(&first)?;
        }
        for (a, names) in ahead {
            r.store.prefetch(*a, names)?;
        }
        Ok(r)
    }

    /// Rows of the recomputable tensors the layer stored.
    pub fn split(&self) -> i64 {
        self.stashed.split
    }

    fn prefetch(&mut self, tl: &Tile) -> Result<()> {
        for n in self.stashed.names.iter().filter(|n| tiled::tile_reads(n, tl, self.stashed.split, self.stashed.layout, self.pass)) {
            self.store.prefetch_rows(self.l, n, tl.start, tl.len)?;
        }
        Ok(())
    }

    /// The next tile and its rows of the saved tensors it reads (K, V and the logsumexp whole; a
    /// tensor the tile does not read is an empty placeholder). Starts reading the tile after.
    pub fn next_tile(&mut self) -> Result<Option<(Tile, BlockSaved)>> {
        let Some(tl) = self.order.get(self.next).copied() else { return Ok(None) };
        self.next += 1;
        if let Some(after) = self.order.get(self.next).copied() {
            self.prefetch(&after)?;
        }
        let (store, whole, l, split, layout, pass) = (&mut *self.store, &self.whole, self.l, self.stashed.split, self.stashed.layout, self.pass);
        let saved = BlockSaved::from_named(&self.stashed.with_recomputable(), |n| match whole.iter().find(|(m, _)| m == n) {
            Some((_, t)) => Ok(t.shallow_clone()),
            None if self.stashed.names.iter().any(|m| m == n) && tiled::tile_reads(n, &tl, split, layout, pass) => Ok(store.take_rows(l, n, tl.start, tl.len)?),
            None => Ok(Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu))),
        })?;
        Ok(Some((tl, saved)))
    }

    /// Frees the tensors read by rows that no later pass reads (after the last tile).
    pub fn finish(self) -> Result<()> {
        for n in self.stashed.names.iter().filter(|n| tiled::released_after(n, self.stashed.layout, self.pass)) {
            self.store.release(self.l, n)?;
        }
        Ok(())
    }
}
