//! What sequence parallelism adds to a rank's plan: the all-to-alls around every layer's
//! attention ([`crate::model::block`]'s `attend`), their bytes and predicted time, the step
//! with them, and its model FLOP utilisation.
use planner::inventory::Inventory;
use planner::plan::{human, Plan};

use crate::model::config::ModelConfig;

/// One rank's all-to-all traffic per layer: what leaves it (each exchange keeps 1/P of its
/// tensor at home).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Exchange {
    pub ranks: u64,
    /// Bytes one rank sends in one layer's forward: q, k, v (KV heads repeated) to the heads'
    /// layout, the attention output back.
    pub forward_bytes: u64,
    /// In one layer's backward: the output gradient and the output to the heads' layout, the
    /// q, k, v gradients back.
    pub backward_bytes: u64,
}

impl Exchange {
    /// For a rank holding `tokens` tokens of `cfg`'s sequence split over `ranks`, elements of
    /// `elt` bytes.
    pub fn new(cfg: &ModelConfig, elt: u64, tokens: u64, ranks: u64) -> Exchange {
        let copies = crate::model::seq::kv_copies(cfg.num_heads, cfg.num_kv_heads, ranks as i64).unwrap_or(1) as u64;
        let q = tokens * (cfg.num_heads * cfg.head_dim) as u64 * elt;
        let kv = tokens * (cfg.num_kv_heads * cfg.head_dim) as u64 * copies * elt;
        let away = |b: u64| b / ranks * (ranks - 1);
        Exchange { ranks, forward_bytes: away(2 * q + 2 * kv), backward_bytes: away(3 * q + 2 * kv) }
    }

    /// Seconds of a whole step's exchanges at `bytes_per_second` of one rank's sends.
    pub fn step_seconds(&self, layers: u64, bytes_per_second: f64) -> f64 {
        layers as f64 * (self.forward_bytes + self.backward_bytes) as f64 / bytes_per_second
    }
}

/// The model FLOPs of one rank's step as the plan counts them (forward, backward; no
/// recompute): what MFU divides by the time.
pub fn model_flops(inv: &Inventory, tokens: u64) -> f64 {
    let t = tokens as f64;
    let (lin, attn) = (inv.flops.linear_per_token * t, inv.flops.attention_per_pair * t * t / 2.0);
    inv.layers as f64 * (lin * (1.0 + inv.flops.linear_backward_ratio) + attn * 3.5) + inv.head_flops_per_token * t * 3.0
}

/// The report's lines for a rank of a sequence split over `ex.ranks`: the exchanges, the step
/// with them (on the critical path: each all-to-all waits for its tensor and attention waits for
/// it), and MFU against `peak_flops` per device.
pub fn lines(inv: &Inventory, plan: &Plan, ex: &Exchange, a2a_bytes_per_second: f64, peak_flops: Option<f64>) -> String {
    let comm = ex.step_seconds(inv.layers as u64, a2a_bytes_per_second);
    let step = plan.step_seconds + comm;
    let mut s = format!(
        "sequence   split over {} ranks: {} tokens each, {} in all; per layer each rank sends {} forward, {} backward by all-to-all; {} a step, {:.2} s at {:.0} GB/s per rank\nstep       predicted {:.2} s: {:.2} s as planned above + {:.2} s of all-to-all\n",
        ex.ranks,
        plan.tokens,
        plan.tokens * ex.ranks,
        human(ex.forward_bytes),
        human(ex.backward_bytes),
        human(inv.layers as u64 * (ex.forward_bytes + ex.backward_bytes)),
        comm,
        a2a_bytes_per_second / 1e9,
        step,
        plan.step_seconds,
        comm,
    );
    if let Some(peak) = peak_flops {
        let mfu = model_flops(inv, plan.tokens) / step / peak;
        s += &format!("mfu        {:.1}% of {:.0} TFLOP/s per device (the plan's FLOP count of forward and backward, no recompute)\n", 100.0 * mfu, peak / 1e12);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_bytes_of_llama_8b_over_8() {
        let cfg = crate::plan::presets::model_config("llama-3.1-8b").unwrap();
        // 32 heads × 128, 8 KV heads (one per rank): per token q 4096, k and v 1024 each, bf16.
        let ex = Exchange::new(&cfg, 2, 1000, 8);
        assert_eq!(ex.forward_bytes, (2 * 4096 + 2 * 1024) * 2 * 1000 / 8 * 7);
        assert_eq!(ex.backward_bytes, (3 * 4096 + 2 * 1024) * 2 * 1000 / 8 * 7);
        // Over 16 ranks the 8 KV heads are repeated twice.
        let ex = Exchange::new(&cfg, 2, 1000, 16);
        assert_eq!(ex.forward_bytes, (2 * 4096 + 2 * 2048) * 2 * 1000 / 16 * 15);
    }
}
