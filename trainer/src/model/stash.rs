//! Between a layer's forward and its backward: its saved activations ([`BlockSaved`]) go where
//! the step's placement says and come back for the backward.
//!
//! Who does what: the block says what is saved ([`block::forward`]), the placement says where each
//! tensor waits and how many rows of the recomputable ones are stored
//! ([`planner::placement::Placement`]), the store moves the bytes
//! ([`offload::store::ActivationStore`]); this module is the glue, and the recompute of the rows
//! not stored ([`block::recompute_tail`]).
use std::collections::BTreeMap;

use offload::store::ActivationStore;
use planner::placement::Placement;
use tch::Tensor;

use crate::error::{Result, TrainerError};
use crate::model::block::{self, BlockSaved, Context};
use crate::model::layer::Layer;

/// What one layer handed to the store.
pub struct Stashed {
    /// The names stored (a recomputable tensor storing no rows is absent).
    pub names: Vec<String>,
    /// Rows of the recomputable tensors stored (`T` when all of them).
    pub split: i64,
}

impl Stashed {
    /// The stored names and every recomputable one that stored no rows: the names a
    /// [`BlockSaved`] is rebuilt from.
    fn with_recomputable(&self) -> Vec<String> {
        let mut all = self.names.clone();
        all.extend(block::RECOMPUTABLE.iter().filter(|n| !self.names.iter().any(|m| m == *n)).map(|n| n.to_string()));
        all
    }
}

/// Hands layer `l`'s saved tensors to the store: the recomputable ones cut to the placement's
/// `stored_rows(α, T)` rows, each tensor to its tier.
pub fn put(store: &mut ActivationStore, placement: &Placement, l: usize, saved: BlockSaved, tokens: i64) -> Result<Stashed> {
    let split = planner::inventory::stored_rows(placement.alpha(l), tokens);
    let mut names = Vec::new();
    for (name, t) in saved.into_named() {
        let t = if split < tokens && block::RECOMPUTABLE.contains(&name.as_str()) {
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
    Ok(Stashed { names, split })
}

/// Takes layer `l`'s saved tensors back for its backward, recomputing the rows it did not store
/// from the layer input and the attention output (always stored).
pub fn take(store: &mut ActivationStore, layer: &Layer, l: usize, stashed: &Stashed, ctx: &Context, tokens: i64) -> Result<BlockSaved> {
    let (names, split) = (&stashed.names, stashed.split);
    if split == tokens {
        return BlockSaved::from_named(names, |n| Ok(store.take(l, n)?));
    }
    let x_in = store.take(l, block::name::X)?;
    let attn_out = store.take(l, block::name::ATTN_OUT)?;
    let mut tail: BTreeMap<&str, Tensor> = block::recompute_tail(layer, &x_in, &attn_out, ctx, split).into_iter().collect();
    BlockSaved::from_named(&stashed.with_recomputable(), |n| match n {
        block::name::X => Ok(x_in.shallow_clone()),
        block::name::ATTN_OUT => Ok(attn_out.shallow_clone()),
        n if block::RECOMPUTABLE.contains(&n) => {
            let rest = tail.remove(n).ok_or_else(|| TrainerError::Device(format!("recompute lost `{n}`")))?;
            Ok(if split > 0 { Tensor::cat(&[store.take(l, n)?, rest], 0) } else { rest })
        }
        n => Ok(store.take(l, n)?),
    })
}

/// Takes back what layer `l` stored, recomputing nothing: a recomputable tensor that stored no
/// rows is an empty placeholder (token tiles recompute the missing rows tile by tile,
/// [`crate::model::tiled::backward`]).
pub fn take_stored(store: &mut ActivationStore, l: usize, stashed: &Stashed) -> Result<BlockSaved> {
    BlockSaved::from_named(&stashed.with_recomputable(), |n| if stashed.names.iter().any(|m| m == n) { Ok(store.take(l, n)?) } else { Ok(Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu))) })
}
