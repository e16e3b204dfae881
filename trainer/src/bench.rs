//! `train bench step`: time of one forward + explicit backward of a Llama-shaped model with
//! random weights, and the memory it held. Numbers for the README and closing notes, not tests.
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::model::config::ModelConfig;
use crate::error::Result;
use crate::memory::{peak_rss_bytes, PhasePeak};
use crate::model::Model;

#[derive(Debug, Clone)]
pub struct StepBench {
    pub layers: i64,
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub intermediate: i64,
    pub vocab: i64,
    pub tokens: i64,
    /// Iterations measured after the first (which warms up allocators and kernels and is
    /// reported on its own).
    pub iters: usize,
    /// Offload tiers ("host", "numa", "nvme"; empty: keep everything resident), each with a
    /// budget of 5/4 of the step's saved activations.
    pub tiers: Vec<offload::store::Tier>,
    /// Directory of the NVMe tier's file (default: the temporary directory).
    pub nvme_dir: Option<std::path::PathBuf>,
    pub keep_last: usize,
    /// MEMO's α for offloaded layers (1: store every token's activations).
    pub alpha: f64,
    /// Token tiles inside each block (None: the whole sequence at once).
    pub tile_tokens: Option<i64>,
    /// Token sparsity (None: every layer dense).
    pub sparsity: Option<crate::model::sparse::Sparsity>,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Saved-activation bytes of one step, from one forward of a single token scaled up (the saved
/// set is linear in tokens). Sizes the NVMe tier of the benchmark.
fn saved_estimate(model: &Model, tokens: i64) -> usize {
    let per_layer_per_token = {
        let c = &model.cfg;
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        // x, x_attn, h, x_mlp: d each; q, out: q; k, v: kv; gate, up, act: i; statistics: small.
        (4 * d + 2 * q + 2 * kv + 3 * i + 2 + c.num_heads) as usize
    };
    per_layer_per_token * model.layers.len() * tokens as usize * model.kind().elt_size_in_bytes() + (1 << 20)
}

/// Runs the benchmark; returns one JSON object of results.
pub fn run_step_bench(b: &StepBench, kind: Kind, device: Device) -> Result<serde_json::Value> {
    let text = json!({
        "model_type": "llama", "vocab_size": b.vocab, "hidden_size": b.hidden, "intermediate_size": b.intermediate,
        "num_hidden_layers": b.layers, "num_attention_heads": b.heads, "num_key_value_heads": b.kv_heads,
        "max_position_embeddings": b.tokens.max(2048), "rms_norm_eps": 1e-5, "rope_theta": 500000.0
    })
    .to_string();
    let (cfg, _) = ModelConfig::parse(&text, std::path::Path::new("<bench config>"))?;
    let mut model = Model::init_random(cfg, 0.02, kind, device, 0)?;
    model.tile_tokens = b.tile_tokens;
    model.sparsity = b.sparsity.clone().map(std::sync::Arc::new);
    let ids = Tensor::randint(b.vocab, [b.tokens], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [0]);
    let batch = crate::model::Batch::single(ids, labels);
    let mut times = Vec::new();
    let mut peaks = Vec::new();
    let mut cuda_peaks: Vec<Option<(u64, u64)>> = Vec::new();
    let mut saved = 0;
    let mut loss = 0.0;
    let mut kept = Vec::new();
    let budget = (saved_estimate(&model, b.tokens) as u64 * 5 / 4).max(1 << 20);
    use offload::store::Tier;
    let has = |t: Tier| b.tiers.contains(&t);
    let cfg = offload::store::StoreConfig {
        host_bytes: if has(Tier::Host) { budget } else { 0 },
        numa: has(Tier::Numa).then(|| (offload::numa::current_node(), budget)),
        nvme: has(Tier::Nvme).then(|| offload::store::NvmeConfig { dir: b.nvme_dir.clone().unwrap_or_else(std::env::temp_dir), bytes: budget, rank: 0, io_uring: true }),
        max_inflight: 256 << 20,
        cuda_device: match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        },
    };
    let mut store = offload::store::ActivationStore::new(&cfg)?;
    let section = crate::train::recipe::OffloadSection { keep_last: b.keep_last, alpha: b.alpha, lookahead: 1, ..Default::default() };
    let placement = crate::plan::engine_placement(&model, None, 1024, b.tokens as u64, &section, &store)?;
    for i in 0..b.iters + 1 {
        sync(device);
        let peak = PhasePeak::start_on(device);
        let t0 = Instant::now();
        let (l, grads, stats) = model.forward_backward_with(&batch, None, 1024, &mut store, &placement)?;
        sync(device);
        let dt = t0.elapsed().as_secs_f64();
        drop(grads);
        peaks.push(peak.bytes());
        cuda_peaks.push(peak.cuda().map(|c| (c.allocated_peak, c.reserved_peak)));
        if i > 0 {
            times.push(dt); // the first step warms up allocators and kernels
        }
        saved = stats.saved_bytes;
        kept = stats.kept.iter().map(|(l, k, t)| json!({"layer": l, "kept_fraction": k.size()[0] as f64 / *t as f64})).collect();
        loss = l.sum.to_device(Device::Cpu).double_value(&[]) / l.count as f64;
    }
    times.sort_by(|a, c| a.total_cmp(c));
    let median = times[times.len() / 2];
    let params: i64 = model.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    Ok(json!({
        "device": format!("{device:?}"),
        "dtype": format!("{kind:?}"),
        "layers": b.layers, "hidden": b.hidden, "tokens": b.tokens, "params": params,
        "step_seconds_median": median,
        "tokens_per_second": b.tokens as f64 / median,
        "saved_activation_bytes": saved,
        "offload": if b.tiers.is_empty() { "none".to_string() } else { b.tiers.iter().map(|t| t.name()).collect::<Vec<_>>().join("+") },
        "keep_last": b.keep_last,
        "alpha": b.alpha,
        "tile_tokens": b.tile_tokens,
        "sparsity": b.sparsity.as_ref().map(|s| json!({"block": s.block, "keep": s.keep, "layers": s.layers, "scorer": format!("{:?}", s.scorer), "kept": kept})),
        "offload_written_bytes_per_step": store.stats().written_bytes / (b.iters as u64 + 1),
        "offload_io_seconds_per_step": (store.stats().write_seconds + store.stats().read_seconds) / (b.iters as f64 + 1.0),
        "offload_stall_seconds_per_step": store.stats().stall_seconds / (b.iters as f64 + 1.0),
        "peak_bytes": {"host": store.stats().host_peak_bytes, "numa": store.stats().numa_peak_bytes, "nvme": store.stats().nvme_peak_bytes},
        "peak_rss_bytes": peak_rss_bytes(),
        // The first iteration grows the allocators; what a long run holds is the steady state.
        "first_iter_peak_rss_bytes": peaks[0],
        "steady_peak_rss_bytes": peaks[1..].iter().copied().max().flatten(),
        "iter_peak_rss_bytes": peaks,
        // CUDA: the caching allocator's peaks per iteration, allocated and reserved (null on CPU).
        "iter_cuda_peak_allocated_bytes": cuda_peaks.iter().map(|c| c.map(|c| c.0)).collect::<Vec<_>>(),
        "iter_cuda_peak_reserved_bytes": cuda_peaks.iter().map(|c| c.map(|c| c.1)).collect::<Vec<_>>(),
        "steady_cuda_peak_reserved_bytes": cuda_peaks[1..].iter().map(|c| c.map(|c| c.1)).max().flatten(),
        "loss": loss,
    }))
}
