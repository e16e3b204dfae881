//! The placement: for every layer of a step and every tensor it saves for backward, where that
//! tensor waits — kept on the compute device, or in which offload tier — and which share α of
//! the recomputable tensors' rows is stored (MEMO's split; the rest is recomputed).
//!
//! This is the one decision of "who lives where". One rule makes it ([`Placement::fill`]),
//! whether the planner calls it with its chosen `keep_last` and α or the engine calls it with a
//! recipe's own values; the model applies it (which layers hand tensors to the store, how many
//! rows they store), the activation store executes it (each `put` names the tier from here), and
//! the plan's report prints it.
use serde::{Deserialize, Serialize};

/// Where a saved tensor waits for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Stays where it was computed.
    Keep,
    /// Local host RAM (page-locked when the tensors live on CUDA).
    Host,
    /// RAM bound to a chosen NUMA node: far DRAM or CXL memory.
    Numa,
    /// The NVMe file.
    Nvme,
}

/// The offload tiers from fastest to slowest: [`Placement::fill`] fills them in this order.
pub const TIERS: [Tier; 3] = [Tier::Host, Tier::Numa, Tier::Nvme];

impl Tier {
    /// Lowercase name, as in configs, reports and serialized placements.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Keep => "keep",
            Tier::Host => "host",
            Tier::Numa => "numa",
            Tier::Nvme => "nvme",
        }
    }

    /// Position in [`TIERS`] (and in every `[host, numa, nvme]` array); None for `Keep`.
    pub fn index(self) -> Option<usize> {
        TIERS.iter().position(|t| *t == self)
    }

    /// The unit each tier's allocator hands out (64-byte arena granules; 4 KiB O_DIRECT blocks).
    pub fn granule(self) -> u64 {
        match self {
            Tier::Nvme => 4096,
            _ => 64,
        }
    }

    /// `bytes` as the tier's allocator holds them (at least one granule).
    pub fn footprint(self, bytes: u64) -> u64 {
        let g = self.granule();
        bytes.max(1).div_ceil(g) * g
    }
}

/// Where one layer's saved tensors wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "where", rename_all = "lowercase")]
pub enum LayerPlacement {
    /// Every saved tensor stays on the compute device, whole.
    Kept,
    /// The saved tensors are handed to the store.
    Offloaded {
        /// Share of the recomputable tensors' rows stored (`stored_rows(α, T)`); the rest is
        /// recomputed in backward.
        alpha: f64,
        /// Each stored tensor's tier, in the order the block saves them. A recomputable tensor
        /// that stores no rows (α·T rounds to 0) is absent.
        tensors: Vec<(String, Tier)>,
        /// Bytes per tier `[host, numa, nvme]` at the placement's token count.
        tier_bytes: [u64; 3],
    },
}

/// The placement of a whole step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The token count the bytes are for (a step's micro-batches have at most this many).
    pub tokens: u64,
    /// Offloaded layers read back ahead of the one whose backward runs.
    pub lookahead: usize,
    /// Per layer, first to last.
    pub layers: Vec<LayerPlacement>,
    /// Bytes (as the tiers' allocators hold them) that fit in no tier's remaining budget; they
    /// were given the slowest tier. Non-zero means the step cannot run with these budgets.
    pub overflow_bytes: u64,
}

/// One offloaded layer's stored tensor, as the fill rule sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    /// The name the block saves it under.
    pub name: String,
    /// Bytes at the placement's token count, with the α split already applied.
    pub bytes: u64,
}

/// What [`Placement::fill`] decides from.
#[derive(Clone)]
pub struct FillSpec<'a> {
    /// Layers of the model.
    pub layers: usize,
    /// The last `keep_last` layers keep their tensors (their backward comes first).
    pub keep_last: usize,
    /// α of every offloaded layer, recorded in the placement (`stored` already reflects it).
    pub alpha: f64,
    /// Offloaded layers read back ahead in backward (copied into the placement).
    pub lookahead: usize,
    /// Token count the bytes in `stored` are for.
    pub tokens: u64,
    /// The configured offload tiers with their budgets (any order; absent tiers omitted).
    pub capacities: &'a [(Tier, u64)],
    /// A layer's stored tensors when offloaded, in the order the block saves them (layers differ
    /// only under token sparsity).
    pub stored: &'a dyn Fn(usize) -> Vec<StoredTensor>,
}

impl Placement {
    /// Every layer kept: the placement of a run without offload tiers.
    pub fn resident(layers: usize, tokens: u64) -> Placement {
        Placement { tokens, lookahead: 0, layers: vec![LayerPlacement::Kept; layers], overflow_bytes: 0 }
    }

    /// The rule. Layers `[0, layers - keep_last)` are offloaded (all kept when no tier exists).
    /// Their tensors go to the tiers fastest first, starting from the last offloaded layer (whose
    /// backward comes first, so it deserves the fastest tier) down to layer 0, each tensor to
    /// the fastest tier whose remaining budget holds it (first fit, at the tier's granule).
    pub fn fill(spec: &FillSpec) -> Placement {
        let mut caps: Vec<(Tier, u64)> = TIERS
            .iter()
            .filter_map(|t| spec.capacities.iter().find(|(c, b)| c == t && *b > 0).map(|(_, b)| (*t, b / t.granule() * t.granule())))
            .collect();
        let offloaded = if caps.is_empty() { 0 } else { spec.layers - spec.keep_last.min(spec.layers) };
        let mut layers = vec![LayerPlacement::Kept; spec.layers];
        let mut overflow_bytes = 0;
        for layer in (0..offloaded).rev() {
            let stored = (spec.stored)(layer);
            let mut tensors = Vec::with_capacity(stored.len());
            let mut tier_bytes = [0u64; 3];
            for s in &stored {
                let fit = caps.iter().position(|(t, left)| t.footprint(s.bytes) <= *left);
                let i = fit.unwrap_or(caps.len() - 1);
                let (tier, left) = &mut caps[i];
                let need = tier.footprint(s.bytes);
                match fit {
                    Some(_) => *left -= need,
                    None => overflow_bytes += need,
                }
                tier_bytes[tier.index().unwrap_or(2)] += s.bytes;
                tensors.push((s.name.clone(), *tier));
            }
            layers[layer] = LayerPlacement::Offloaded { alpha: spec.alpha, tensors, tier_bytes };
        }
        Placement { tokens: spec.tokens, lookahead: spec.lookahead, layers, overflow_bytes }
    }

    /// Whether a layer keeps its tensors on the device (also true for a layer past the last).
    pub fn is_kept(&self, layer: usize) -> bool {
        matches!(self.layers.get(layer), Some(LayerPlacement::Kept) | None)
    }

    /// α of a layer (1 when kept).
    pub fn alpha(&self, layer: usize) -> f64 {
        match self.layers.get(layer) {
            Some(LayerPlacement::Offloaded { alpha, .. }) => *alpha,
            _ => 1.0,
        }
    }

    /// The tier of one saved tensor: `Keep` in kept layers, None when an offloaded layer does not
    /// store it.
    pub fn tier_of(&self, layer: usize, name: &str) -> Option<Tier> {
        match self.layers.get(layer) {
            Some(LayerPlacement::Offloaded { tensors, .. }) => tensors.iter().find(|(n, _)| n == name).map(|(_, t)| *t),
            _ => Some(Tier::Keep),
        }
    }

    /// Layers that keep their tensors at the end of the step (the last ones).
    pub fn keep_last(&self) -> usize {
        self.layers.iter().rev().take_while(|l| **l == LayerPlacement::Kept).count()
    }

    /// Number of offloaded layers.
    pub fn offloaded(&self) -> usize {
        self.layers.iter().filter(|l| **l != LayerPlacement::Kept).count()
    }

    /// Bytes of one layer per tier `[host, numa, nvme]` (zero for kept layers).
    pub fn tier_bytes(&self, layer: usize) -> [u64; 3] {
        match self.layers.get(layer) {
            Some(LayerPlacement::Offloaded { tier_bytes, .. }) => *tier_bytes,
            _ => [0; 3],
        }
    }

    /// Bytes of the whole step per tier `[host, numa, nvme]`: each tier's peak (every offloaded
    /// layer's tensors wait there from its forward until its backward).
    pub fn tier_totals(&self) -> [u64; 3] {
        let mut t = [0u64; 3];
        for l in 0..self.layers.len() {
            for (acc, b) in t.iter_mut().zip(self.tier_bytes(l)) {
                *acc += b;
            }
        }
        t
    }

    /// The placement in a line per run of alike layers, e.g. `layers 0..3: α 1.000, nvme 241.00
    /// MiB`, `layer 4: α 1.000, host 96.31 MiB + nvme 145.00 MiB [x, q in host; the rest in nvme]`,
    /// `layers 5..7: kept on the device`.
    pub fn summary(&self) -> Vec<String> {
        let describe = |l: &LayerPlacement| -> String {
            match l {
                LayerPlacement::Kept => "kept on the device".into(),
                LayerPlacement::Offloaded { alpha, tensors, tier_bytes } => {
                    let parts: Vec<String> = TIERS.iter().zip(tier_bytes).filter(|(_, b)| **b > 0).map(|(t, b)| format!("{} {}", t.name(), crate::plan::human(*b))).collect();
                    let used: Vec<Tier> = TIERS.iter().copied().filter(|t| tensors.iter().any(|(_, u)| u == t)).collect();
                    let split = if used.len() > 1 {
                        let firsts: Vec<String> = used[..used.len() - 1]
                            .iter()
                            .map(|t| format!("{} in {}", tensors.iter().filter(|(_, u)| u == t).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "), t.name()))
                            .collect();
                        format!(" [{}; the rest in {}]", firsts.join("; "), used[used.len() - 1].name())
                    } else {
                        String::new()
                    };
                    format!("α {alpha:.3}, {}{split}", if parts.is_empty() { "nothing stored".into() } else { parts.join(" + ") })
                }
            }
        };
        let mut out: Vec<String> = Vec::new();
        let mut start = 0;
        for i in 1..=self.layers.len() {
            if i == self.layers.len() || self.layers[i] != self.layers[start] {
                let range = if i - 1 == start { format!("layer {start}") } else { format!("layers {start}..{}", i - 1) };
                out.push(format!("{range}: {}", describe(&self.layers[start])));
                start = i;
            }
        }
        out
    }
}

/// The placement of a step of `tokens` tokens for a model described by `inv`: the last
/// `keep_last` layers kept, the others storing `stored_rows(α, T)` rows of their recomputable
/// tensors, placed by [`Placement::fill`] into `capacities`. The planner and the engine (when no
/// plan decides) both call this.
pub fn from_inventory(inv: &crate::inventory::Inventory, tokens: u64, keep_last: usize, alpha: f64, lookahead: usize, capacities: &[(Tier, u64)]) -> Placement {
    let split = crate::inventory::stored_rows(alpha, tokens as i64) as u64;
    let stored = |layer| inv.stored_tensors(layer, tokens, split);
    Placement::fill(&FillSpec { layers: inv.layers, keep_last, alpha, lookahead, tokens, capacities, stored: &stored })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Vec<StoredTensor> {
        // 448 bytes a layer, granule-exact for the arenas.
        [("x", 128u64), ("q", 64), ("k", 64), ("mlp", 192)].iter().map(|(n, b)| StoredTensor { name: n.to_string(), bytes: *b }).collect()
    }

    #[test]
    fn last_layers_get_the_fastest_tier_and_a_tensor_that_does_not_fit_spills_to_the_next() {
        let s = stored();
        let caps = [(Tier::Nvme, 1 << 20), (Tier::Host, 1024), (Tier::Numa, 512)];
        let p = Placement::fill(&FillSpec { layers: 6, keep_last: 1, alpha: 1.0, lookahead: 1, tokens: 8, capacities: &caps, stored: &|_| s.clone() });
        assert_eq!(p.keep_last(), 1);
        assert_eq!(p.offloaded(), 5);
        // Layer 4 (first filled) and layer 3 take 896 of the host's 1024; layer 2's x (128) still
        // fits there, its q, k and mlp go to NUMA (the next tier with room); layer 1 fills NUMA's
        // remaining 192 with x and q, the rest of it and layer 0 go to NVMe.
        let tiers = |l: usize| s.iter().map(|t| p.tier_of(l, &t.name).unwrap().name()).collect::<Vec<_>>();
        assert_eq!(tiers(4), ["host"; 4]);
        assert_eq!(tiers(3), ["host"; 4]);
        assert_eq!(tiers(2), ["host", "numa", "numa", "numa"]);
        assert_eq!(tiers(1), ["numa", "numa", "nvme", "nvme"]);
        assert_eq!(tiers(0), ["nvme"; 4]);
        assert_eq!(p.tier_of(5, "x"), Some(Tier::Keep));
        assert_eq!(p.tier_bytes(2), [128, 320, 0]);
        assert_eq!(p.tier_totals(), [1024, 512, 704]);
        assert_eq!(p.overflow_bytes, 0);
        let summary = p.summary().join("\n");
        assert!(summary.contains("layer 2: α 1.000, host 128 B + numa 320 B [x in host; the rest in numa]"), "{summary}");
        assert!(summary.contains("layers 3..4: α 1.000, host 448 B"), "{summary}");
        assert!(summary.contains("layer 5: kept"), "{summary}");
    }

    #[test]
    fn no_tier_keeps_everything_and_too_small_tiers_overflow() {
        let s = stored();
        let p = Placement::fill(&FillSpec { layers: 3, keep_last: 0, alpha: 1.0, lookahead: 1, tokens: 8, capacities: &[], stored: &|_| s.clone() });
        assert_eq!(p, Placement { lookahead: 1, ..Placement::resident(3, 8) });
        let p = Placement::fill(&FillSpec { layers: 3, keep_last: 0, alpha: 0.5, lookahead: 1, tokens: 8, capacities: &[(Tier::Nvme, 8192)], stored: &|_| s.clone() });
        // Two 4 KiB blocks hold two tensors; the other ten overflow.
        assert_eq!(p.overflow_bytes, 10 * 4096);
        assert_eq!(p.alpha(0), 0.5);
        assert_eq!(p.alpha(9), 1.0);
    }
}
