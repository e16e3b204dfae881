//! The plan: which layers keep their activations on the compute device, α and tier bytes for the
//! others (MEMO's LP), the device layouts (level 1: one layer's backward; level 2: the step), the
//! peak of every tier, the predicted step time, and whether it fits the budgets.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::inventory::{stored_rows, Group, Inventory};
use crate::layout::{self, Buf, Layout};
use crate::memo::{self, LayerSpec, MemoError, TierSpec};
use crate::placement::{Placement, Tier};

/// Memory each tier may use; 0 = the tier is absent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Budgets {
    /// The compute device (GPU memory; on CPU: the RAM for everything resident).
    pub device: u64,
    /// Bytes for the host RAM tier (unused as a tier when the device is the CPU).
    pub host: u64,
    /// Bytes of the chosen NUMA node for the numa tier.
    pub numa: u64,
    /// Bytes of the NVMe tier's file.
    pub nvme: u64,
}

/// Measured (or assumed) speeds of this machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// The device and dtype the figures are for, e.g. `cuda0-bfloat16`.
    pub device: String,
    /// Achieved FLOP/s of the projections' matrix products at the working dtype.
    pub matmul_flops: f64,
    /// Achieved FLOP/s of fused attention.
    pub attention_flops: f64,
    /// Bytes/s from the device into each tier.
    pub host_bps: f64,
    /// Bytes/s from the device into the NUMA tier.
    pub numa_bps: f64,
    /// Bytes/s from the device into the NVMe tier (through host memory from a GPU).
    pub nvme_bps: f64,
    /// `measured on <date>` or `assumed: ...`.
    pub source: String,
}

/// What to plan and the knobs the planner does not choose.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    /// Tokens per step (T).
    pub tokens: u64,
    /// None: the planner picks the most layers kept that fit the device.
    pub keep_last: Option<usize>,
    /// Layers prefetched ahead in backward.
    pub lookahead: usize,
    /// Bytes of swapped-out tensors that may wait for the I/O thread (the engine's
    /// `max_inflight_bytes`): what of a layer's swap-out is still held during the next layer.
    #[serde(default = "unbounded")]
    pub max_inflight: u64,
    /// True when the compute device is the CPU: the host tier is the device's own memory.
    pub cpu: bool,
    /// Time limit per layout MIP.
    pub mip_seconds: f64,
    /// False where dropped activations cannot be recomputed (LoRA dropout): α stays 1.
    pub allow_recompute: bool,
    /// The largest α to consider (1: the LP's choice; 0: store the fewest rows, for the least
    /// device memory a length needs).
    #[serde(default = "one")]
    pub max_alpha: f64,
    /// Device memory the process holds besides its tensors (on CPU: the resident set of the
    /// runtime itself, measured before planning; on CUDA: 0, the context is outside the budget
    /// libtorch reports).
    pub baseline_bytes: u64,
}

fn unbounded() -> u64 {
    u64::MAX
}

fn one() -> f64 {
    1.0
}

/// A layout with its baselines.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutReport {
    /// The buffers laid out.
    pub buffers: Vec<Buf>,
    /// Most bytes live at once: no layout's peak is lower.
    pub lower_bound: u64,
    /// Peak of the greedy best-fit layout, in bytes.
    pub greedy_peak: u64,
    /// The layout taken: the MIP's, or greedy when the MIP is off or finds nothing better.
    pub mip: Layout,
}

fn layout_report(buffers: Vec<Buf>, mip_seconds: f64) -> LayoutReport {
    let lower_bound = layout::lower_bound(&buffers);
    let greedy_peak = layout::greedy(&buffers).peak;
    let mip = if mip_seconds > 0.0 { layout::mip(&buffers, Duration::from_secs_f64(mip_seconds)) } else { layout::greedy(&buffers) };
    LayoutReport { buffers, lower_bound, greedy_peak, mip }
}

/// The planner's answer for one token count: placement, tier peaks, layouts, predicted step time,
/// and whether it fits.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Tokens per step (T).
    pub tokens: u64,
    /// Transformer layers of the model.
    pub layers: usize,
    /// Layers at the end of the step that keep their saved tensors on the device.
    pub keep_last: usize,
    /// Offloaded layers prefetched ahead in backward.
    pub lookahead: usize,
    /// Per layer and saved tensor: kept, or α and the tier (the engine runs exactly this).
    pub placement: Placement,
    /// Bytes of weights, gradients and optimizer state (without `baseline_bytes`).
    pub static_bytes: u64,
    /// The process's own memory on the device (see [`Options::baseline_bytes`]).
    pub baseline_bytes: u64,
    /// On CPU with layers on the NVMe tier: the I/O thread's aligned staging buffer, as large as
    /// the largest tensor it moves (it grows to that once and is kept for the run).
    pub staging_bytes: u64,
    /// Saved-tensor bytes of the kept layers (all rows), held on the device.
    pub saved_bytes_resident: u64,
    /// Peaks: the device (statics + level-2 layout), host, numa, nvme.
    pub device_peak: u64,
    /// Bytes the placement puts in the host tier (every offloaded layer's share at once).
    pub host_peak: u64,
    /// Bytes the placement puts in the NUMA tier.
    pub numa_peak: u64,
    /// Bytes the placement puts in the NVMe tier.
    pub nvme_peak: u64,
    /// Predicted seconds of forward and backward compute (layers and head), recompute excluded.
    pub compute_seconds: f64,
    /// Predicted seconds of recomputing dropped activations in backward.
    pub recompute_seconds: f64,
    /// Predicted seconds of swap-out transfer not hidden behind compute.
    pub exposed_seconds: f64,
    /// Predicted step time: compute + recompute + exposed, in seconds.
    pub step_seconds: f64,
    /// Device layout of one layer's backward.
    pub level1: LayoutReport,
    /// Device layout of the whole step.
    pub level2: LayoutReport,
    /// Seconds the MEMO LP took to solve.
    pub lp_seconds: f64,
    /// Whether everything fits the budgets (`problems` is empty).
    pub fits: bool,
    /// Why it does not fit (empty when it does).
    pub problems: Vec<String>,
    /// The budgets planned against.
    pub budgets: Budgets,
    /// The speeds the times were predicted from.
    pub calibration: Calibration,
}

/// Seconds of one layer's forward at `tokens`.
fn forward_seconds(inv: &Inventory, cal: &Calibration, tokens: u64) -> (f64, f64) {
    let t = tokens as f64;
    let lin = inv.flops.linear_per_token * t / cal.matmul_flops;
    let attn = inv.flops.attention_per_pair * t * t / 2.0 / cal.attention_flops;
    (lin, attn)
}

/// The level-1 buffers: one layer's backward at `tokens` with `stored` rows of its recomputable
/// tensors kept (token tiles recompute the others tile by tile; whole-sequence backward restores
/// them whole first, so its buffers do not depend on it), for an `offloaded` layer (under tiles
/// it reads its saved tensors tile by tile) or a kept one.
pub fn level1_buffers(inv: &Inventory, layer: usize, tokens: u64, stored: u64, offloaded: bool) -> Vec<Buf> {
    let tile = inv.tile(tokens);
    inv.backward_in(layer).iter().map(|b| Buf::new(b.name.clone(), b.bytes(tokens, stored, tile, offloaded), b.start, b.end)).collect()
}

/// The level-2 buffers over the step's schedule: slots 0..L are the layers' forwards, L the loss,
/// L+1+i the backward of layer L-1-i. Kept layers hold their saved tensors from their forward
/// until their backward; an offloaded layer holds them during its forward and the next layer's
/// (the swap-out) and again from the prefetch `lookahead` layers early. A backward slot's working
/// set is the level-1 peak, which includes the layer's own saved tensors (so those end one slot
/// before); a forward slot's is the forward's transients. Whole-sequence blocks ask for the
/// layers ahead part-way through a layer's backward (`inv.prefetch_at_op`), so their bytes are
/// part of that backward's working set, beside its later ops only; under token tiles they are
/// live from the slot's start.
///
/// `backward(layer, kept, ahead)`: the level-1 peak of that layer's backward, kept or offloaded
/// (equal without token tiles), with `ahead` bytes arriving from `inv.prefetch_at_op` on.
/// `in_flight(bytes)`: what of a layer's swap-out of `bytes` still waits in memory when the next
/// layer's forward ends.
#[allow(clippy::too_many_arguments)]
fn level2_buffers(inv: &Inventory, tokens: u64, keep_last: usize, lookahead: usize, in_flight: &dyn Fn(u64) -> u64, splits: &[u64], backward: &dyn Fn(usize, bool, u64) -> u64) -> Vec<Buf> {
    let l = inv.layers;
    let bwd_slot = |layer: usize| (l + 1 + (l - 1 - layer)) as u32;
    let within = inv.tile_tokens.is_none();
    // Bytes each layer's backward asks for ahead (filled from the layers below it, which the
    // loop visits first).
    let mut ahead = vec![0u64; l];
    let mut v = Vec::new();
    for layer in 0..l {
        let kept = layer + keep_last >= l;
        let (w, r) = inv.layer_saved(layer, tokens, if kept { tokens } else { splits[layer] });
        if kept {
            v.push(Buf::new(format!("layer{layer}.saved"), w + r, layer as u32, bwd_slot(layer) - 1));
        } else {
            // Whole while the layer's forward makes it; during the next layer's forward only what
            // the engine lets wait for the I/O thread.
            v.push(Buf::new(format!("layer{layer}.saved (swap-out)"), w + r, layer as u32, layer as u32));
            v.push(Buf::new(format!("layer{layer}.saved (in flight)"), in_flight(w + r), (layer + 1) as u32, (layer + 1) as u32));
            let by = (layer + lookahead).min(l - 1);
            if lookahead > 0 && by > layer {
                let bytes = inv.layer_read_whole(layer, tokens, splits[layer]);
                let from = if within {
                    ahead[by] += bytes;
                    bwd_slot(by) + 1
                } else {
                    bwd_slot(by)
                };
                if from < bwd_slot(layer) {
                    v.push(Buf::new(format!("layer{layer}.saved (prefetched)"), bytes, from, bwd_slot(layer) - 1));
                }
            }
        }
        v.push(Buf::new(format!("layer{layer}.forward work"), inv.forward_work(layer, tokens, if kept { tokens } else { splits[layer] }), layer as u32, layer as u32));
        let name = if ahead[layer] > 0 { format!("layer{layer}.backward work, the layers ahead arriving") } else { format!("layer{layer}.backward work") };
        v.push(Buf::new(name, backward(layer, kept, ahead[layer]), bwd_slot(layer), bwd_slot(layer)));
    }
    for h in &inv.head {
        // The head's tensors live in the loss slot (the engine drops them before the first
        // layer's backward, whose level-1 layout holds the gradient they hand on); the
        // context's for the whole step.
        let (start, end) = if h.group == Group::Context { (0, bwd_slot(0)) } else { (l as u32, l as u32) };
        v.push(Buf::new(h.name.clone(), h.total(tokens), start, end));
    }
    v
}

/// A whole-sequence layer backward's peak (the best-fit layout of its level-1 buffers `bufs`) with
/// `ahead` bytes of the next layers' saved tensors live from op `from` to its last op.
fn backward_with_ahead(mut bufs: Vec<Buf>, ahead: u64, from: u32) -> u64 {
    let last = bufs.iter().map(|b| b.end).max().unwrap_or(0).max(from);
    bufs.push(Buf::new("the layers ahead (prefetched)", ahead, from, last));
    layout::greedy(&bufs).peak
}

/// The LP's tiers and the placement's capacities from the budgets (on CPU the host tier is the
/// device's own memory, so it is not a tier).
fn tier_specs(budgets: &Budgets, cal: &Calibration, cpu: bool) -> (Vec<TierSpec>, Vec<(Tier, u64)>) {
    let host_cap = if cpu { 0 } else { budgets.host };
    [(Tier::Host, host_cap, cal.host_bps), (Tier::Numa, budgets.numa, cal.numa_bps), (Tier::Nvme, budgets.nvme, cal.nvme_bps)]
        .into_iter()
        .filter(|(_, cap, _)| *cap > 0)
        .map(|(tier, cap, bps)| (TierSpec { name: tier.name().into(), capacity: cap, write_bps: bps }, (tier, cap)))
        .unzip()
}

/// The largest k in `0..=l` for which `fits(k)` holds, `fits` being monotone (true up to some
/// k); 0 when none does.
fn most_that_fit(l: usize, fits: impl Fn(usize) -> bool) -> usize {
    if fits(l) {
        return l;
    }
    // Invariant: k = lo fits or lo = 0; k = hi does not fit.
    let (mut lo, mut hi) = (0usize, l);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The most stored rows `s` in `0..=t` for which `fits(s)` holds (monotone: true up to some s),
/// never `t - 1` (a single recomputed row is stored instead, see [`stored_rows`]); 0 when none.
fn most_stored_that_fit(t: u64, fits: impl Fn(u64) -> bool) -> u64 {
    let s = most_that_fit(t as usize, |s| fits(s as u64)) as u64;
    if s + 1 == t { s.saturating_sub(1) } else { s }
}

/// One α for every offloaded layer: the layers are alike, so the LP is symmetric and the mean of
/// its per-layer answers is as good and feasible (convexity); the engine runs one α. Returns the
/// averaged LP answer and each layer's stored rows.
fn uniform(m: memo::MemoPlan, t: u64, l: usize, n_tiers: usize, max_split: u64) -> (memo::MemoPlan, Vec<u64>) {
    let off = m.alpha.len();
    let mean_alpha = m.alpha.iter().sum::<f64>() / off as f64;
    let split = (stored_rows(mean_alpha, t as i64) as u64).min(max_split);
    let mean_bytes: Vec<u64> = (0..n_tiers).map(|j| m.tier_bytes.iter().map(|row| row[j]).sum::<u64>() / off as u64).collect();
    let splits: Vec<u64> = (0..l).map(|i| if i < off { split } else { t }).collect();
    (memo::MemoPlan { alpha: vec![mean_alpha; off], tier_bytes: vec![mean_bytes; off], ..m }, splits)
}

/// The LP fills the tiers to their budgets by bytes, but the placement puts whole tensors at each
/// tier's granule, so at a budget's edge a few may not pack: then the offloaded layers store fewer
/// rows, the most that pack (none packing: unchanged, and the plan reports the overflow). The
/// LP's exposed transfer stays as an upper bound (fewer bytes move); the recompute follows α.
/// `fits(s)`: the device still holds the step with `s` stored rows (fewer rows can need more
/// device memory: tiles then rebuild whole tensors).
#[allow(clippy::too_many_arguments)]
fn packed(inv: &Inventory, t: u64, k: usize, lookahead: usize, caps: &[(Tier, u64)], m: memo::MemoPlan, splits: Vec<u64>, recompute_all: f64, fits: impl Fn(u64) -> bool) -> (memo::MemoPlan, Vec<u64>) {
    let packs = |s: u64| crate::placement::from_inventory(inv, t, k, s as f64 / t.max(1) as f64, lookahead, caps).overflow_bytes == 0;
    let ok = |s: u64| packs(s) && fits(s);
    let split = splits.first().copied().unwrap_or(t);
    if packs(split) || !ok(0) {
        return (m, splits);
    }
    let s = most_that_fit(split as usize, |s| ok(s as u64)) as u64;
    let alpha = s as f64 / t.max(1) as f64;
    let off = m.alpha.len();
    let splits = splits.iter().enumerate().map(|(i, &x)| if i < off { s } else { x }).collect();
    let n = m.alpha.len();
    (memo::MemoPlan { alpha: vec![alpha; n], recompute_seconds: vec![(1.0 - alpha) * recompute_all; n], ..m }, splits)
}

/// Plans one sequence length. `Err` only for solver failures; a plan that does not fit says so
/// in `problems`.
pub fn plan(inv: &Inventory, budgets: Budgets, cal: &Calibration, opt: &Options) -> Result<Plan, MemoError> {
    let t = opt.tokens;
    let l = inv.layers;
    let (lin, attn) = forward_seconds(inv, cal, t);
    let layer_fwd = lin + attn;
    let layer_bwd = lin * inv.flops.linear_backward_ratio + attn * 2.5;
    let head = inv.head_flops_per_token * t as f64 / cal.matmul_flops * 3.0;
    let compute = l as f64 * (layer_fwd + layer_bwd) + head;
    // Recompute covers the token-local share (projections), not attention.
    let recompute_all = lin;
    let (tiers, capacities) = tier_specs(&budgets, cal, opt.cpu);
    // A layer's swap-out drains during the next layer's forward at the slowest tier's speed (the
    // engine's I/O thread or copy stream). When it drains within that forward nothing waits by
    // its end; when it does not, the backlog grows layer after layer up to what `put` lets wait:
    // max_inflight bytes, plus one tensor on the CUDA copy stream's path.
    let drain_bps = tiers.iter().map(|s| s.write_bps).fold(f64::INFINITY, f64::min);
    let drained = if drain_bps.is_finite() { (drain_bps * layer_fwd) as u64 } else { 0 };
    let largest = inv.largest_stored(t, t);
    let in_flight = |bytes: u64| if bytes <= drained { 0 } else { opt.max_inflight.saturating_add(largest) };
    let static_bytes = inv.static_bytes() + opt.baseline_bytes;
    // The NVMe tier's staging buffer is host memory: device memory only when the CPU computes.
    let staging_for = |offloaded: usize, split: u64| if opt.cpu && budgets.nvme > 0 && offloaded > 0 { inv.largest_stored(t, split) } else { 0 };
    // One layer's backward holds its stored rows whole only under token tiles (the whole-sequence
    // backward restores every row first): there the device bounds α too.
    let tiled = inv.tile_tokens.is_some();
    let level1_greedy = |layer: usize, split: u64| layout::greedy(&level1_buffers(inv, layer, t, split, true)).peak;
    let with_ahead = |layer: usize, ahead: u64| backward_with_ahead(level1_buffers(inv, layer, t, t, false), ahead, inv.prefetch_at_op);
    // A layer's buffers depend on whether its MLP keeps only some channels: one report for each
    // kind present (indexed by that), the table shows the larger.
    let level1_kinds: Vec<(bool, usize, LayoutReport)> = [false, true]
        .into_iter()
        .filter_map(|ch| (0..l).find(|&i| inv.has_mlp_channels(i) == ch).map(|i| (ch, i, layout_report(level1_buffers(inv, i, t, t, false), if tiled { 0.0 } else { opt.mip_seconds }))))
        .collect();
    let level1_peak_at_t = |layer: usize| level1_kinds.iter().find(|(ch, _, _)| *ch == inv.has_mlp_channels(layer)).map_or(0, |(_, _, r)| r.mip.peak);
    let (widest, level1_at_t) = level1_kinds.iter().max_by_key(|(_, _, r)| r.mip.peak).map_or_else(|| (0, layout_report(Vec::new(), 0.0)), |(_, i, r)| (*i, r.clone()));

    // The LP for the layers that keep_last = k leaves to the tiers, α at most `max_split / t`;
    // the splits it implies.
    let lp_for = |k: usize, max_split: u64| -> Result<(memo::MemoPlan, Vec<u64>), MemoError> {
        let off = l - k;
        let min_alpha = if opt.allow_recompute { 0.0 } else { 1.0 };
        let specs: Vec<LayerSpec> = (0..off)
            .map(|i| {
                let (w, r) = inv.layer_saved(i, t, t);
                LayerSpec { whole_bytes: w, recomputable_bytes: r, forward_seconds: layer_fwd, recompute_seconds: recompute_all, min_alpha, max_alpha: (max_split as f64 / t.max(1) as f64).min(opt.max_alpha).max(min_alpha) }
            })
            .collect();
        if tiers.is_empty() && off > 0 {
            return Err(MemoError::TooSmall { capacity: 0, need: specs.iter().map(|s| s.whole_bytes).sum(), layers: off });
        }
        let m = memo::solve(&specs, &tiers)?;
        let splits: Vec<u64> = (0..l).map(|i| if i < off { (stored_rows(m.alpha[i], t as i64) as u64).min(max_split) } else { t }).collect();
        Ok((m, splits))
    };
    // The device peak grows with k (more layers kept) and with α, while the tiers need more with
    // fewer layers kept: take the largest k whose device peak fits with α = 1 (an upper bound of
    // the device use, independent of the LP), then let the LP choose α for it.
    let device_fits = |k: usize, split: u64| {
        let splits: Vec<u64> = (0..l).map(|i| if i + k >= l { t } else { split }).collect();
        let backward = |layer: usize, kept: bool, ahead: u64| match (tiled && !kept, ahead) {
            (true, _) => level1_greedy(layer, split),
            (false, 0) => level1_peak_at_t(layer),
            (false, a) => with_ahead(layer, a),
        };
        let l2 = level2_buffers(inv, t, k, opt.lookahead, &in_flight, &splits, &backward);
        static_bytes + staging_for(l - k, split) + layout::greedy(&l2).peak <= budgets.device
    };
    let k = match opt.keep_last {
        Some(k) => k.min(l),
        None => most_that_fit(l, |k| device_fits(k, t)),
    };
    // Under tiles, when even that is too large at α = 1 the most stored rows that fit (the
    // device peak rises with them): the LP chooses α below it.
    let max_split = if !tiled || k == l || device_fits(k, t) { t } else { most_stored_that_fit(t, |s| device_fits(k, s)) };
    let mut problems = Vec::new();
    let (m, splits) = match lp_for(k, max_split) {
        Ok(c) => c,
        Err(MemoError::TooSmall { capacity, need, layers }) => {
            problems.push(format!("offload tiers hold {} but {layers} offloaded layers need at least {}", human(capacity), human(need)));
            // Report the all-kept layout for the table.
            lp_for(l, t)?
        }
        Err(e) => return Err(e),
    };
    let off = m.alpha.len();
    let (m, splits) = if off > 0 { uniform(m, t, l, tiers.len(), max_split) } else { (m, splits) };
    let k = l - off;
    let (m, splits) = if off > 0 { packed(inv, t, k, opt.lookahead, &capacities, m, splits, recompute_all, |s| device_fits(k, s)) } else { (m, splits) };
    let split = splits.first().copied().unwrap_or(t);
    let level1 = if tiled && off > 0 { layout_report(level1_buffers(inv, widest, t, split, true), opt.mip_seconds) } else { level1_at_t.clone() };
    let offloaded_peak = |layer: usize| match (tiled && off > 0, inv.has_mlp_channels(layer) == inv.has_mlp_channels(widest)) {
        (true, true) => level1.mip.peak,
        (true, false) => level1_greedy(layer, split),
        (false, _) => level1_peak_at_t(layer),
    };
    let level2 = layout_report(level2_buffers(inv, t, k, opt.lookahead, &in_flight, &splits, &|layer, kept, ahead| match (ahead, kept) {
            (0, true) => level1_peak_at_t(layer),
            (0, false) => offloaded_peak(layer),
            (a, _) => with_ahead(layer, a),
        }), opt.mip_seconds);
    // The LP chose α and how much each tier should take; which tensor goes where is the fill
    // rule's, which the engine runs too (so the tier peaks below are what the store will hold).
    let alpha = if off > 0 { split as f64 / t as f64 } else { 1.0 };
    let placement = crate::placement::from_inventory(inv, t, k, alpha, opt.lookahead, &capacities);
    if placement.overflow_bytes > 0 {
        problems.push(format!("the offloaded layers' tensors do not pack into the tiers: {} left over", human(placement.overflow_bytes)));
    }
    let on_nvme = (0..l).filter(|&i| placement.tier_bytes(i)[2] > 0).count();
    let staging_bytes = staging_for(on_nvme, split);
    let device_peak = static_bytes + staging_bytes + level2.mip.peak.min(level2.greedy_peak);
    let saved_bytes_resident: u64 = (off..l).map(|i| inv.layer_saved(i, t, t)).map(|(w, r)| w + r).sum();
    let [host_peak, numa_peak, nvme_peak] = placement.tier_totals();
    if device_peak > budgets.device {
        problems.push(format!("device peak {} exceeds the device budget {}", human(device_peak), human(budgets.device)));
    }
    // The tiers' own budgets hold by construction (the fill rule reports what does not pack).
    let exposed: f64 = m.exposed_seconds.iter().sum::<f64>() + 0.0; // an empty sum is -0.0
    let recompute: f64 = m.recompute_seconds.iter().sum::<f64>() + 0.0;
    Ok(Plan {
        tokens: t,
        layers: l,
        keep_last: k,
        lookahead: opt.lookahead,
        placement,
        static_bytes: static_bytes - opt.baseline_bytes,
        baseline_bytes: opt.baseline_bytes,
        staging_bytes,
        saved_bytes_resident,
        device_peak,
        host_peak,
        numa_peak,
        nvme_peak,
        compute_seconds: compute,
        recompute_seconds: recompute,
        exposed_seconds: exposed,
        step_seconds: compute + recompute + exposed,
        level1,
        level2,
        lp_seconds: m.solve_seconds,
        fits: problems.is_empty(),
        problems,
        budgets,
        calibration: cal.clone(),
    })
}

/// The longest token count (a multiple of `step`) whose plan fits, up to `max`; None when not
/// even `step` tokens fit. Layouts by the greedy rule during the search.
pub fn longest_fitting(inv: &Inventory, budgets: Budgets, cal: &Calibration, opt: &Options, step: u64, max: u64) -> Result<Option<u64>, MemoError> {
    let fits = |t: u64| -> Result<bool, MemoError> { Ok(plan(inv, budgets, cal, &Options { tokens: t, mip_seconds: 0.0, keep_last: None, ..opt.clone() })?.fits) };
    if !fits(step)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1u64, max / step + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * step)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo * step))
}

/// Bytes in the units people read: "1.50 GiB".
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// Parses "24GiB", "80GB", "512MiB", "1e9" or plain bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.trim().replace('_', "").parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0f64.powi(3),
        "t" | "tb" => 1e12,
        "tib" => 1024.0f64.powi(4),
        _ => return None,
    };
    (v >= 0.0 && v.is_finite()).then(|| (v * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("24GiB"), Some(24 << 30));
        assert_eq!(parse_bytes("80 GB"), Some(80_000_000_000));
        assert_eq!(parse_bytes("1_000"), Some(1000));
        assert_eq!(parse_bytes("12 parsecs"), None);
        assert_eq!(human(3 << 29), "1.50 GiB");
    }
}
