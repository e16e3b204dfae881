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
    match inv.tile_tokens {
        Some(_) => {
            let _ = writeln!(s, "compute    token tiles of {} tokens: norms, projections, RoPE and the MLP run a tile at a time; attention sees all T", inv.tile(t));
        }
        None => {
            let _ = writeln!(s, "compute    whole-sequence blocks (no token tiles)");
        }
    }
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
    // Layers by kind: dense, then (token sparsity) those whose attention tensors hold K rows (the
    // kept tokens) and those whose MLP tensors hold the kept channels' columns.
    let kind = |l: usize| (inv.is_sparse(l), inv.has_mlp_channels(l));
    let mut kinds: Vec<((bool, bool), usize, usize)> = Vec::new();
    for l in 0..inv.layers {
        match kinds.iter_mut().find(|(k, _, _)| *k == kind(l)) {
            Some(e) => e.2 += 1,
            None => kinds.push((kind(l), l, 1)),
        }
    }
    kinds.sort_by_key(|(k, _, _)| *k);
    let sparse_layers: Vec<usize> = (0..inv.layers).filter(|&l| inv.is_sparse(l)).collect();
    for ((sparse, channels), layer, count) in kinds {
        let label = match (sparse, channels) {
            (false, false) => "",
            (true, false) => " (sparse layers)",
            (false, true) => " (MLP-channel layers)",
            (true, true) => " (sparse, MLP-channel layers)",
        };
        for (c, bytes, recomputable) in inv.layer_tensors(layer, t, t) {
            let kept_rows = sparse && c.in_sparse != crate::inventory::SparseRows::All;
            let name = format!("{}{}{label}", c.name, if recomputable { " (recomputable)" } else { "" });
            let shape = match (&c.in_channel_layers, channels) {
                (crate::inventory::ChannelCols::Kept { shape, .. }, true) => shape.clone(),
                _ => c.shape.clone(),
            };
            let shape = if kept_rows { shape.replacen('T', "K", 1) } else { shape };
            line(&mut s, "saved", &name, &shape, &c.dtype, count as u64, bytes * count as u64);
        }
    }
    let saved_all = inv.saved_bytes(t);
    let per_layer = saved_all / inv.layers.max(1) as u64;
    // Transients of one layer's forward and backward (one layer at a time, hence count 1), with
    // the rows an offloaded layer stores.
    let stored = crate::inventory::stored_rows(p.placement.alpha(0), t as i64) as u64;
    // As a layer with MLP channel sparsity has them, when there is one.
    let shown = (0..inv.layers).find(|&l| inv.has_mlp_channels(l));
    let suffix = if shown.is_some() { " (MLP-channel layers)" } else { "" };
    for (label, list) in [("fwd temp", inv.forward_in(shown.unwrap_or(0))), ("bwd temp", inv.backward_in(shown.unwrap_or(0)))] {
        for b in list.iter().filter(|b| !b.name.starts_with("saved ")) {
            let name = format!("{} (ops {}..{}){suffix}", b.name, b.start, b.end);
            line(&mut s, label, &name, &b.shape, &inv.dtype, 1, b.bytes(t, stored, inv.tile(t), p.keep_last < inv.layers));
        }
    }
    let h = group_total(&mut s, Group::Head, "head") + group_total(&mut s, Group::Context, "context");
    let uneven = !sparse_layers.is_empty() || (0..inv.layers).any(|l| inv.has_mlp_channels(l));
    let _ = writeln!(s, "totals     weights {}, grads {}, optimizer {}, saved {}{} per layer × {} = {}, head {}", human(w), human(g), human(o), if uneven { "~" } else { "" }, human(per_layer), inv.layers, human(saved_all), human(h));
    if let Some(sp) = &inv.sparse {
        if !sp.layers.is_empty() {
            let _ = writeln!(s, "sparsity   layers {:?} keep {} of each document's {}-token blocks: K = {} of T = {t} tokens (one document)", sp.layers, sp.keep, sp.block, sp.kept_tokens(t));
        }
        if sp.mlp_keep < 1.0 && !sp.mlp_layers.is_empty() {
            let _ = writeln!(s, "sparsity   MLP channels: layers {:?} save {} of the intermediate channels (exact forward, backward through those)", sp.mlp_layers, sp.mlp_keep);
        }
    }
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

/// Axis ticks for `max` bytes: about five round steps in GiB (or MiB below 1 GiB).
fn ticks(max: f64) -> (Vec<f64>, f64, &'static str) {
    let (unit, name) = if max >= (1u64 << 30) as f64 { ((1u64 << 30) as f64, "GiB") } else { ((1u64 << 20) as f64, "MiB") };
    let span = (max / unit).max(1e-9);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let n = (span / step).floor() as usize;
    ((0..=n).map(|i| i as f64 * step * unit).collect(), unit, name)
}

/// One panel: a y axis in GiB/MiB from 0 to `max` bytes at `[top, top + height]`.
fn y_axis(s: &mut String, x: f64, top: f64, height: f64, max: f64, label: &str) -> impl Fn(f64) -> f64 {
    let (ts, unit, name) = ticks(max);
    let y = move |b: f64| top + height - b / max * height;
    for t in ts {
        let _ = writeln!(s, r#"<line x1="{x}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, x - 4.0, y(t), y(t), x - 6.0, y(t) + 4.0, trim_num(t / unit));
    }
    let _ = writeln!(s, r#"<line x1="{x}" x2="{x}" y1="{top}" y2="{:.1}" stroke="black"/>"#, top + height);
    let _ = writeln!(s, r#"<text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{label} ({name})</text>"#, top + height / 2.0, top + height / 2.0);
    y
}

fn trim_num(v: f64) -> String {
    let t = format!("{v:.2}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// An SVG of the step over time (slots: each layer's forward, the loss, each layer's backward):
/// above, the device memory — the resident part (weights, gradients, optimizer, process, staging)
/// as a band and the level-2 layout's buffers above it, against the device budget line; below,
/// the bytes each offload tier holds against its budget. Axes in GiB (MiB for small plans).
pub fn svg(p: &Plan) -> String {
    let (w, pad_l, pad_r) = (1000.0, 70.0, 150.0);
    let (top1, h1, top2, h2) = (50.0, 360.0, 500.0, 180.0);
    let plot_w = w - pad_l - pad_r;
    let l = p.layers;
    let slots = p.level2.buffers.iter().map(|b| b.end).max().unwrap_or(0).max(2 * l as u32) as f64 + 1.0;
    let sx = plot_w / slots;
    let x = |slot: f64| pad_l + slot * sx;
    let base = (p.static_bytes + p.baseline_bytes + p.staging_bytes) as f64;
    let layout_peak = p.level2.mip.peak.min(p.level2.greedy_peak) as f64;
    let max1 = (base + layout_peak).max(p.budgets.device as f64).max(1.0) * 1.08;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="monospace" font-size="11">"#, top2 + h2 + 70.0);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{pad_l}" y="20" font-size="13">{} tokens: device peak {} of a {} budget ({})</text>"#,
        p.tokens,
        human(p.device_peak),
        human(p.budgets.device),
        if p.fits { "fits" } else { "does not fit" }
    );
    let y = y_axis(&mut s, pad_l, top1, h1, max1, "device memory");
    // Phases.
    for (name, from, to, fill) in [("forward", 0.0, l as f64, "#eef4ff"), ("loss", l as f64, l as f64 + 1.0, "#fff4e0"), ("backward", l as f64 + 1.0, slots, "#eefaf0")] {
        let _ = writeln!(s, r#"<rect x="{:.1}" y="{top1}" width="{:.1}" height="{h1}" fill="{fill}"/>"#, x(from), (to - from) * sx);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{name}</text>"#, x((from + to) / 2.0), top1 + h1 + 28.0);
    }
    for slot in 0..slots as usize {
        let layer = if slot < l { Some(slot) } else if slot > l { Some(2 * l - slot) } else { None };
        if let Some(layer) = layer.filter(|la| l <= 16 || la % (l / 8).max(1) == 0) {
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{layer}</text>"#, x(slot as f64 + 0.5), top1 + h1 + 14.0);
        }
    }
    // The resident band and the layout's buffers above it.
    let _ = writeln!(s, r##"<rect x="{pad_l}" y="{:.1}" width="{plot_w:.1}" height="{:.1}" fill="#bbbbbb"><title>weights, gradients, optimizer state, process, staging: {}</title></rect>"##, y(base), h1 - (y(base) - top1), human(base as u64));
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">weights/grads/optimizer/process {}</text>"#, pad_l + 4.0, (y(base) + top1 + h1) / 2.0 + 4.0, human(base as u64));
    for (b, off) in p.level2.buffers.iter().zip(&p.level2.mip.offsets) {
        let bx = x(b.start as f64);
        let bw = (b.end - b.start + 1) as f64 * sx;
        let (y0, y1) = (y(base + (*off + b.bytes) as f64), y(base + *off as f64));
        let hue = if b.name.contains("work") { 30 } else if b.name.contains("prefetch") { 200 } else if b.name.contains("swap") || b.name.contains("in flight") { 120 } else { 270 };
        let _ = writeln!(s, r#"<rect x="{bx:.1}" y="{y0:.1}" width="{bw:.1}" height="{:.1}" fill="hsl({hue},60%,70%)" stroke="black" stroke-width="0.3"><title>{} {}</title></rect>"#, (y1 - y0).max(0.5), b.name, human(b.bytes));
    }
    let yb = y(p.budgets.device as f64);
    let _ = writeln!(s, r##"<line x1="{pad_l}" x2="{:.1}" y1="{yb:.1}" y2="{yb:.1}" stroke="#d62728" stroke-dasharray="6 3" stroke-width="1.5"/><text x="{:.1}" y="{:.1}" fill="#d62728">device budget {}</text>"##, pad_l + plot_w, pad_l + plot_w + 4.0, yb + 4.0, human(p.budgets.device));
    let yp = y(base + layout_peak);
    let _ = writeln!(s, r#"<line x1="{pad_l}" x2="{:.1}" y1="{yp:.1}" y2="{yp:.1}" stroke="black" stroke-dasharray="2 2"/><text x="{:.1}" y="{:.1}">peak {}</text>"#, pad_l + plot_w, pad_l + plot_w + 4.0, yp + 4.0, human(p.device_peak));
    let _ = writeln!(s, r#"<text x="{pad_l}" y="{:.1}" font-size="10">orange: a layer's working set; green: swap-out; blue: prefetched; purple: kept layers, head, context</text>"#, top1 + h1 + 44.0);

    // The tiers: an offloaded layer's bytes enter at its forward and leave at its backward.
    let tiers = [("host", "#d62728", p.budgets.host), ("numa", "#2ca02c", p.budgets.numa), ("nvme", "#1f77b4", p.budgets.nvme)];
    let peaks = [p.host_peak, p.numa_peak, p.nvme_peak];
    let max2 = tiers.iter().map(|t| t.2).chain(peaks).max().unwrap_or(0).max(1) as f64 * 1.08;
    let y2 = y_axis(&mut s, pad_l, top2, h2, max2, "tiers");
    for (k, (name, col, budget)) in tiers.iter().enumerate() {
        if *budget == 0 && peaks[k] == 0 {
            continue;
        }
        let mut pts = Vec::new();
        for slot in 0..=(2 * l + 1) {
            let bytes: u64 = (0..l).filter(|&i| i <= slot && slot < l + 1 + (l - 1 - i)).map(|i| p.placement.tier_bytes(i)[k]).sum();
            pts.push(format!("{:.1},{:.1}", x(slot as f64), y2(bytes as f64)));
        }
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"/>"#, pts.join(" "));
        if *budget > 0 {
            let yb = y2(*budget as f64);
            let _ = writeln!(s, r#"<line x1="{pad_l}" x2="{:.1}" y1="{yb:.1}" y2="{yb:.1}" stroke="{col}" stroke-dasharray="6 3"/>"#, pad_l + plot_w);
        }
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" fill="{col}">{name}: peak {} of {}</text>"#, pad_l + plot_w + 4.0, top2 + 14.0 * (k as f64 + 1.0), human(peaks[k]), human(*budget));
    }
    let _ = writeln!(s, "</svg>");
    s
}
