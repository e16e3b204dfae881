//! The plan as people read it: an llm.c-style table of every buffer class (shape formula, bytes),
//! the per-tier peaks, step-time prediction and layout results; `plan.json`; an SVG timeline of
//! the device layout and the tiers over the step.
use std::fmt::Write;

use crate::inventory::{Group, Inventory};
use crate::plan::{human, Plan};

/// The text report.
pub fn table(inv: &Inventory, p: &Plan) -> String {
    let t = p.tokens;
    let mut s = String::new();
    let _ = writeln!(s, "model      {}", inv.model);
    let _ = writeln!(s, "tokens     {t} per step (T), dtype {}, saved tensors measured on {}", inv.dtype, inv.probed_on);
    let _ = writeln!(s, "{:<10} {:<44} {:<22} {:>9} {:>6} {:>12}", "group", "tensor", "shape", "dtype", "count", "bytes");
    let line = |s: &mut String, g: &str, name: &str, shape: &str, dtype: &str, count: u64, bytes: u64| {
        let _ = writeln!(s, "{g:<10} {name:<44} {shape:<22} {dtype:>9} {count:>6} {:>12}", human(bytes));
    };
    let group_total = |s: &mut String, g: Group, label: &str| {
        let mut total = 0;
        for c in inv.statics.iter().chain(&inv.head).filter(|c| c.group == g) {
            line(s, label, &c.name, &c.shape, &c.dtype, c.count, c.total(t));
            total += c.total(t);
        }
        total
    };
    let w = group_total(&mut s, Group::Weights, "weights");
    let g = group_total(&mut s, Group::Grads, "grads");
    let o = group_total(&mut s, Group::Optimizer, "optimizer");
    let mut per_layer = 0;
    for c in &inv.saved {
        let name = if c.recomputable { format!("{} (recomputable)", c.name) } else { c.name.clone() };
        line(&mut s, "saved", &name, &c.shape, &c.dtype, inv.layers as u64, c.total(t) * inv.layers as u64);
        per_layer += c.bytes(t);
    }
    // Transients of one layer's forward and backward (one layer at a time, hence count 1).
    for (label, list) in [("fwd temp", &inv.forward), ("bwd temp", &inv.backward)] {
        for b in list.iter().filter(|b| !b.name.starts_with("saved ")) {
            let name = format!("{} (ops {}..{})", b.name, b.start, b.end);
            line(&mut s, label, &name, &b.shape, &inv.dtype, 1, b.fixed_bytes + b.per_token_bytes * t);
        }
    }
    let h = group_total(&mut s, Group::Head, "head") + group_total(&mut s, Group::Context, "context");
    let _ = writeln!(s, "totals     weights {}, grads {}, optimizer {}, saved {} per layer × {} = {}, head {}", human(w), human(g), human(o), human(per_layer), inv.layers, human(per_layer * inv.layers as u64), human(h));
    let _ = writeln!(s);
    let _ = writeln!(s, "plan       keep_last {} (layers kept on the device), lookahead {}", p.keep_last, p.lookahead);
    for line in p.placement.summary() {
        let _ = writeln!(s, "           {line}");
    }
    if p.baseline_bytes > 0 {
        let _ = writeln!(s, "process    {} resident before any tensor (runtime, libraries): counted in the device peak", human(p.baseline_bytes));
    }
    if p.staging_bytes > 0 {
        let _ = writeln!(s, "staging    {} NVMe I/O buffer (the largest tensor moved, kept for the run): counted in the device peak", human(p.staging_bytes));
    }
    let _ = writeln!(s, "peaks      device {} (budget {}), host {} ({}), numa {} ({}), nvme {} ({})", human(p.device_peak), human(p.budgets.device), human(p.host_peak), human(p.budgets.host), human(p.numa_peak), human(p.budgets.numa), human(p.nvme_peak), human(p.budgets.nvme));
    let _ = writeln!(s, "layout     level 1 (one layer's backward, {} buffers): lower bound {}, greedy {}, MIP {} [{}; {:.2}s]", p.level1.buffers.len(), human(p.level1.lower_bound), human(p.level1.greedy_peak), human(p.level1.mip.peak), p.level1.mip.method, p.level1.mip.solve_seconds);
    let _ = writeln!(s, "           level 2 (the step, {} buffers): lower bound {}, greedy {}, MIP {} [{}; {:.2}s]", p.level2.buffers.len(), human(p.level2.lower_bound), human(p.level2.greedy_peak), human(p.level2.mip.peak), p.level2.mip.method, p.level2.mip.solve_seconds);
    let _ = writeln!(s, "           applied: the placement above (keep_last, α, each tensor's tier, run by the activation store); the offsets are advisory (libtorch's caching allocator places device buffers, no arena yet)");
    let _ = writeln!(s, "time       step {:.3}s predicted: compute {:.3}s + recompute {:.3}s + exposed transfer {:.3}s (LP {:.3}s)", p.step_seconds, p.compute_seconds, p.recompute_seconds, p.exposed_seconds, p.lp_seconds);
    let _ = writeln!(s, "speeds     {}", p.calibration.source);
    if p.fits {
        let _ = writeln!(s, "verdict    fits");
    } else {
        for pr in &p.problems {
            let _ = writeln!(s, "verdict    does not fit: {pr}");
        }
    }
    s
}

/// An SVG of the level-2 device layout (buffers as boxes: slot × address) above per-tier bytes
/// over the step.
pub fn svg(p: &Plan) -> String {
    let (w, h, pad) = (960.0, 420.0, 40.0);
    let slots = p.level2.buffers.iter().map(|b| b.end).max().unwrap_or(0) as f64 + 1.0;
    let peak = p.level2.mip.peak.max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="monospace" font-size="11">"#, h + 200.0);
    let _ = writeln!(s, r#"<text x="{pad}" y="20">device layout over the step: {} tokens, peak {} (+ {} weights/grads/optimizer)</text>"#, p.tokens, human(p.level2.mip.peak), human(p.static_bytes));
    let sx = (w - 2.0 * pad) / slots;
    let sy = (h - 2.0 * pad) / peak;
    for (b, off) in p.level2.buffers.iter().zip(&p.level2.mip.offsets) {
        let x = pad + b.start as f64 * sx;
        let bw = (b.end - b.start + 1) as f64 * sx;
        let y = h - pad - (*off + b.bytes) as f64 * sy;
        let bh = (b.bytes as f64 * sy).max(0.5);
        let hue = if b.name.contains("work") { 30 } else if b.name.contains("prefetch") { 200 } else if b.name.contains("swap") { 120 } else { 270 };
        let _ = writeln!(s, r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{bh:.1}" fill="hsl({hue},60%,70%)" stroke="black" stroke-width="0.3"><title>{} {}</title></rect>"#, b.name, human(b.bytes));
    }
    let _ = writeln!(s, r#"<text x="{pad}" y="{}">slots: forward of layers 0..{}, loss, backward of layers {}..0 (orange: working sets, green: swap-out, blue: prefetched, purple: kept/head)</text>"#, h - 10.0, p.layers - 1, p.layers - 1);
    // Tier occupancy: each offloaded layer's bytes enter at its forward and leave at its backward.
    let max_tier = (p.host_peak.max(p.numa_peak).max(p.nvme_peak)).max(1) as f64;
    let base = h + 180.0;
    for (k, (name, col)) in [("host", "#d62728"), ("numa", "#2ca02c"), ("nvme", "#1f77b4")].iter().enumerate() {
        let mut pts = Vec::new();
        let l = p.layers;
        for slot in 0..(2 * l + 1) {
            let bytes: u64 = (0..l)
                .filter(|&i| {
                    let bwd = l + 1 + (l - 1 - i);
                    i <= slot && slot < bwd
                })
                .map(|i| p.placement.tier_bytes(i)[k])
                .sum();
            pts.push(format!("{:.1},{:.1}", pad + slot as f64 * sx, base - bytes as f64 / max_tier * 150.0));
        }
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"/>"#, pts.join(" "));
        let _ = writeln!(s, r#"<text x="{}" y="{}" fill="{col}">{name} (peak {})</text>"#, w - 200.0, base - 150.0 + 14.0 * k as f64, human([p.host_peak, p.numa_peak, p.nvme_peak][k]));
    }
    let _ = writeln!(s, "</svg>");
    s
}
