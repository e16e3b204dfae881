//! MEMO's swap/recompute LP. Per offloaded layer l: α_l ∈ [0, 1], the fraction of tokens whose
//! recomputable activations are swapped (the rest are recomputed in backward), and x_{l,j}, the
//! bytes of the layer placed in tier j. The layer's swapped bytes must move to the tiers while
//! the next layer computes; what does not is exposed time e_l. The LP minimises the time added to
//! an all-resident step: recompute (1 - α_l)·r plus exposed transfer e_l, within every tier's
//! capacity.
use good_lp::solvers::highs::highs;
use good_lp::{constraint, variable, Expression, Solution, SolverModel, Variable};
use serde::Serialize;

/// A tier below the device, as the LP sees it.
#[derive(Debug, Clone, Serialize)]
pub struct TierSpec {
    /// The tier's name (`host`, `numa`, `nvme`), for reports.
    pub name: String,
    /// Bytes the tier may hold, all offloaded layers together.
    pub capacity: u64,
    /// Bytes per second from the device into the tier (the slower of link and medium).
    pub write_bps: f64,
}

/// One layer's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSpec {
    /// Bytes always swapped whole (layer input, attention output and statistics, …).
    pub whole_bytes: u64,
    /// Bytes of the recomputable tensors at α = 1.
    pub recomputable_bytes: u64,
    /// Seconds of the layer's forward (the window a swap-out hides behind).
    pub forward_seconds: f64,
    /// Seconds to recompute all recomputable tensors (token-local work only).
    pub recompute_seconds: f64,
    /// Smallest α allowed (1 where recompute is impossible, e.g. LoRA dropout masks).
    pub min_alpha: f64,
    /// The largest α the device allows (token tiles hold the stored rows in backward).
    pub max_alpha: f64,
}

/// The LP's answer; every vector has one entry per offloaded layer, in forward order.
#[derive(Debug, Clone, Serialize)]
pub struct MemoPlan {
    /// α per layer: share of tokens whose recomputable activations are swapped, in [min_alpha, 1].
    pub alpha: Vec<f64>,
    /// Bytes of each layer in each tier (tier order as given).
    pub tier_bytes: Vec<Vec<u64>>,
    /// Exposed transfer seconds per layer.
    pub exposed_seconds: Vec<f64>,
    /// Recompute seconds per layer.
    pub recompute_seconds: Vec<f64>,
    /// Objective: seconds added to the all-resident step.
    pub added_seconds: f64,
    /// Wall-clock seconds of building and solving the LP.
    pub solve_seconds: f64,
}

/// Why the LP gives no plan.
#[derive(Debug, thiserror::Error)]
pub enum MemoError {
    /// The tiers cannot hold the offloaded layers even at the smallest α allowed.
    #[error("the offload tiers hold {capacity} bytes but the {layers} offloaded layers need at least {need} (at the smallest α allowed)")]
    TooSmall {
        /// Bytes of all tiers together.
        capacity: u64,
        /// Bytes the layers need at their smallest α.
        need: u64,
        /// Number of offloaded layers.
        layers: usize,
    },
    /// The solver failed; its message.
    #[error("LP solver: {0}")]
    Solver(String),
}

/// Solves the LP for `layers` (the offloaded ones, in forward order) over `tiers`.
pub fn solve(layers: &[LayerSpec], tiers: &[TierSpec]) -> Result<MemoPlan, MemoError> {
    let t0 = std::time::Instant::now();
    let need: u64 = layers.iter().map(|l| l.whole_bytes + (l.min_alpha.clamp(0.0, 1.0) * l.recomputable_bytes as f64) as u64).sum();
    let capacity: u64 = tiers.iter().map(|t| t.capacity).sum();
    if layers.is_empty() {
        return Ok(MemoPlan { alpha: vec![], tier_bytes: vec![], exposed_seconds: vec![], recompute_seconds: vec![], added_seconds: 0.0, solve_seconds: 0.0 });
    }
    if need > capacity {
        return Err(MemoError::TooSmall { capacity, need, layers: layers.len() });
    }
    // Bytes in GB keep the coefficients near 1.
    const GB: f64 = 1e9;
    let mut vars = good_lp::ProblemVariables::new();
    let alpha: Vec<Variable> = layers.iter().map(|l| vars.add(variable().min(l.min_alpha.clamp(0.0, 1.0)).max(l.max_alpha.clamp(l.min_alpha.clamp(0.0, 1.0), 1.0)))).collect();
    let x: Vec<Vec<Variable>> = layers.iter().map(|_| tiers.iter().map(|_| vars.add(variable().min(0.0))).collect()).collect();
    let e: Vec<Variable> = layers.iter().map(|_| vars.add(variable().min(0.0))).collect();
    let mut objective = Expression::from(0.0);
    for (l, spec) in layers.iter().enumerate() {
        objective += spec.recompute_seconds * (1.0 - alpha[l]) + e[l];
        // A tie-break towards the faster tiers where time does not decide (the store fills
        // them fastest first too).
        for (j, t) in tiers.iter().enumerate() {
            objective += x[l][j] * (1e-6 / t.write_bps.max(1.0) * GB);
        }
    }
    let mut model = highs(vars.minimise(objective)).set_threads(1);
    for (l, spec) in layers.iter().enumerate() {
        let placed: Expression = x[l].iter().sum();
        model = model.with(constraint!(placed == spec.whole_bytes as f64 / GB + (spec.recomputable_bytes as f64 / GB) * alpha[l]));
        let mut time = Expression::from(0.0);
        for (j, t) in tiers.iter().enumerate() {
            time += x[l][j] * (GB / t.write_bps.max(1.0));
        }
        model = model.with(constraint!(time <= spec.forward_seconds + e[l]));
    }
    for (j, t) in tiers.iter().enumerate() {
        let used: Expression = x.iter().map(|row| row[j]).sum();
        model = model.with(constraint!(used <= t.capacity as f64 / GB));
    }
    let sol = model.solve().map_err(|e| MemoError::Solver(e.to_string()))?;
    let a: Vec<f64> = alpha.iter().map(|v| sol.value(*v).clamp(0.0, 1.0)).collect();
    let tier_bytes: Vec<Vec<u64>> = x.iter().map(|row| row.iter().map(|v| (sol.value(*v).max(0.0) * GB).round() as u64).collect()).collect();
    let exposed: Vec<f64> = e.iter().map(|v| sol.value(*v).max(0.0)).collect();
    let recompute: Vec<f64> = layers.iter().zip(&a).map(|(s, a)| (1.0 - a) * s.recompute_seconds).collect();
    let added = exposed.iter().sum::<f64>() + recompute.iter().sum::<f64>();
    Ok(MemoPlan { alpha: a, tier_bytes, exposed_seconds: exposed, recompute_seconds: recompute, added_seconds: added, solve_seconds: t0.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LayerSpec {
        LayerSpec { whole_bytes: 1_000_000_000, recomputable_bytes: 3_000_000_000, forward_seconds: 0.1, recompute_seconds: 0.05, min_alpha: 0.0, max_alpha: 1.0 }
    }

    #[test]
    fn respects_bandwidth_capacity_and_bounds() {
        let layers = vec![layer(); 6];
        // 20 GB/s: 2 GB per 0.1 s forward, so α = 1/3 moves exactly in time, if capacity allows.
        let tiers = vec![TierSpec { name: "host".into(), capacity: 100_000_000_000, write_bps: 20e9 }];
        let p = solve(&layers, &tiers).unwrap();
        for (l, a) in p.alpha.iter().enumerate() {
            assert!((a - 1.0 / 3.0).abs() < 1e-6, "layer {l}: α {a}");
            let bytes: u64 = p.tier_bytes[l].iter().sum();
            assert!((bytes as f64 - 2e9).abs() < 1e3);
            assert!(p.exposed_seconds[l] < 1e-9);
        }
        // Capacity of 8 GB for 6 layers: 6 GB of inputs + 2 GB of recomputable bytes.
        let tiers = vec![TierSpec { name: "host".into(), capacity: 8_000_000_000, write_bps: 20e9 }];
        let p = solve(&layers, &tiers).unwrap();
        let total: u64 = p.tier_bytes.iter().flatten().sum();
        assert!(total <= 8_000_000_000 + 1000, "{total}");
        assert!(p.alpha.iter().all(|a| (0.0..=1.0).contains(a)));
        assert!((p.alpha.iter().sum::<f64>() - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn slow_tiers_expose_time_and_small_tiers_are_refused() {
        let layers = vec![layer(); 2];
        // 5 GB/s: even α = 0 (1 GB) takes 0.2 s > 0.1 s: 0.1 s exposed per layer, α = 0.
        let tiers = vec![TierSpec { name: "nvme".into(), capacity: 100_000_000_000, write_bps: 5e9 }];
        let p = solve(&layers, &tiers).unwrap();
        assert!(p.alpha.iter().all(|a| *a < 1e-9));
        assert!((p.exposed_seconds[0] - 0.1).abs() < 1e-6);
        let tiers = vec![TierSpec { name: "host".into(), capacity: 1_500_000_000, write_bps: 20e9 }];
        let e = solve(&layers, &tiers).unwrap_err().to_string();
        assert!(e.contains("need at least 2000000000"), "{e}");
    }
}
