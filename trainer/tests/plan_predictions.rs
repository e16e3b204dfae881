//! The planner's predictions against what the engine accounts on CPU runs: saved-activation
//! bytes of the whole step, and the bytes each tier holds for a given α and keep_last, exactly,
//! with whole-sequence blocks and with token tiles.
use offload::store::{ActivationStore, NvmeConfig, StoreConfig};
use planner::inventory::stored_rows;
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use trainer::model::{Batch, Model};

fn cfg(text: &str) -> ModelConfig {
    ModelConfig::parse(text, std::path::Path::new("config.json")).unwrap().0
}

const LLAMA: &str = r#"{"model_type": "llama", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}"#;
const QWEN2: &str = r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
    "num_attention_heads": 6, "num_key_value_heads": 6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;

fn batch(lens: &[i64]) -> Batch {
    let t: i64 = lens.iter().sum();
    let ids = Tensor::from_slice(&(0..t).map(|i| (i * 7 + 1) % 50).collect::<Vec<_>>());
    let labels = Tensor::from_slice(&(0..t).map(|i| (i * 3 + 2) % 50).collect::<Vec<_>>());
    Batch { ids, labels, doc_lens: lens.to_vec() }
}

fn nvme_dir() -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plan-predictions");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn predicted_saved_and_tier_bytes_equal_the_engines_accounting() {
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    let dropout = LoraConfig { dropout: 0.1, ..lora.clone() };
    for (name, text, lora, kind) in [
        ("llama full f32", LLAMA, None, Kind::Float),
        ("llama lora f32", LLAMA, Some(&lora), Kind::Float),
        ("llama lora+dropout f64", LLAMA, Some(&dropout), Kind::Double),
        ("qwen2 full bf16", QWEN2, None, Kind::BFloat16),
    ] {
        let c = cfg(text);
        let mut m = Model::init_random(c.clone(), 0.1, kind, Device::Cpu, 3).unwrap();
        if let Some(l) = lora {
            m.attach_lora(l, 1).unwrap();
        }
        // Whole-sequence blocks and token tiles of 7 (the tiles store the same tensors; they
        // recompute per tile and keep the dropout masks, so α < 1 runs with dropout too).
        for (lens, tile) in [vec![130i64], vec![40, 17, 63]].into_iter().flat_map(|l| [None, Some(7i64)].map(move |t| (l.clone(), t))) {
            m.tile_tokens = tile;
            // Under tiles K and V are stored whole and the saved tensors come back tile by tile.
            let inv = trainer::plan::inventory::of_model(&m, lora, 16).unwrap();
            let name = &format!("{name}, tile {tile:?}");
            let b = batch(&lens);
            let t: i64 = lens.iter().sum();
            let (_, _, stats) = m.forward_backward(&b, None, 16).unwrap();
            assert_eq!(stats.saved_bytes as u64, inv.saved_bytes(t as u64), "{name} {lens:?}: saved bytes");
            let alphas: &[f64] = if tile.is_none() && lora.is_some_and(|l| l.dropout > 0.0) { &[1.0] } else { &[0.0, 0.3, 1.0] };
            for &alpha in alphas {
                for keep_last in [0usize, 2] {
                    let split = stored_rows(alpha, t) as u64;
                    let off = inv.layers - keep_last;
                    for (tier, granule) in [("host", 64u64), ("nvme", 4096)] {
                        let cfg = match tier {
                            "host" => StoreConfig { host_bytes: 64 << 20, ..Default::default() },
                            _ => StoreConfig { nvme: Some(NvmeConfig { dir: nvme_dir(), bytes: 64 << 20, rank: 0, io_uring: true }), ..Default::default() },
                        };
                        let mut store = ActivationStore::new(&cfg).unwrap();
                        let placement = planner::placement::from_inventory(&inv, t as u64, keep_last, alpha, 1, &store.capacities());
                        m.forward_backward_with(&b, None, 16, &mut store, &placement).unwrap();
                        let st = store.stats();
                        let got = if tier == "host" { st.host_peak_bytes } else { st.nvme_peak_bytes };
                        let want: u64 = (0..off).map(|l| inv.layer_tier_bytes(l, t as u64, split, granule)).sum();
                        assert_eq!(got, want, "{name} {lens:?} α={alpha} keep_last={keep_last} {tier}: tier peak");
                    }
                }
            }
        }
        println!("{name}: predicted saved and tier bytes exact");
    }
}

#[test]
fn plans_respect_bounds_and_layouts_validate() {
    use planner::plan::{plan, Budgets, Calibration, Options};
    let c = cfg(LLAMA);
    let inv = trainer::plan::inventory::build(&c, Kind::Float, None, Device::Cpu, 16).unwrap();
    let cal = Calibration { device: "test".into(), matmul_flops: 1e9, attention_flops: 1e9, host_bps: 2e9, numa_bps: 1e9, nvme_bps: 5e8, source: "test figures".into() };
    let per_layer = {
        let (w, r) = inv.layer_saved(0, 4096, 4096);
        w + r
    };
    for (device, host, nvme) in [(u64::MAX / 4, 0, 0), (inv.static_bytes() + 3 * per_layer, per_layer, 2 * per_layer), (inv.static_bytes() + 2 * per_layer, 0, 10 * per_layer)] {
        let b = Budgets { device, host, numa: 0, nvme };
        let opt = Options { tokens: 4096, keep_last: None, lookahead: 1, max_inflight: 256 << 20, cpu: false, mip_seconds: 5.0, allow_recompute: true, max_alpha: 1.0, baseline_bytes: 0 };
        let p = plan(&inv, b, &cal, &opt).unwrap();
        assert!((0..p.layers).all(|l| (0.0..=1.0).contains(&p.placement.alpha(l))));
        assert!(p.host_peak <= host && p.nvme_peak <= nvme, "{p:?}");
        if p.fits {
            assert!(p.device_peak <= device);
        }
        for lr in [&p.level1, &p.level2] {
            planner::layout::validate(&lr.buffers, &lr.mip).unwrap();
            assert!(lr.lower_bound <= lr.mip.peak && lr.mip.peak <= lr.greedy_peak, "lb {} mip {} greedy {}", lr.lower_bound, lr.mip.peak, lr.greedy_peak);
        }
        println!("device {device} host {host} nvme {nvme}: keep_last {} α {:.3} fits {} device peak {}", p.keep_last, p.placement.alpha(0), p.fits, p.device_peak);
    }
}

/// The plan's placement is what the store does: a plan over host, NUMA and NVMe budgets that
/// split layers across tiers, run through the model and a store with those budgets, puts every
/// layer's bytes in exactly the tiers the plan printed, and the plan's tier peaks are their sums.
#[test]
fn the_store_runs_the_plans_placement_tier_by_tier() {
    use offload::store::Tier;
    use planner::plan::{plan, Budgets, Calibration, Options};
    let c = cfg(LLAMA);
    let b = batch(&[40, 17, 63]);
    let t = 120u64;
    let inv = trainer::plan::inventory::build(&c, Kind::Float, None, Device::Cpu, 16).unwrap();
    let m = Model::init_random(c, 0.1, Kind::Float, Device::Cpu, 3).unwrap();
    let cal = Calibration { device: "test".into(), matmul_flops: 1e9, attention_flops: 1e9, host_bps: 2e9, numa_bps: 1e9, nvme_bps: 5e8, source: "test figures".into() };
    let per_layer = {
        let (w, r) = inv.layer_saved(0, t, t);
        w + r
    };
    // One and a half layers of host memory, one of NUMA, the rest on NVMe.
    let budgets = Budgets { device: u64::MAX / 4, host: per_layer * 3 / 2, numa: per_layer, nvme: 64 << 20 };
    let opt = Options { tokens: t, keep_last: Some(0), lookahead: 1, max_inflight: 256 << 20, cpu: false, mip_seconds: 0.0, allow_recompute: false, max_alpha: 1.0, baseline_bytes: 0 };
    let p = plan(&inv, budgets, &cal, &opt).unwrap();
    assert!(p.fits, "{:?}", p.problems);
    let tiers_of = |l: usize| p.placement.tier_bytes(l).iter().filter(|b| **b > 0).count();
    assert!((0..inv.layers).any(|l| tiers_of(l) > 1), "a layer split across tiers: {:?}", p.placement.summary());
    let node = offload::numa::current_node();
    let mut store = ActivationStore::new(&StoreConfig {
        host_bytes: budgets.host,
        numa: Some((node, budgets.numa)),
        nvme: Some(NvmeConfig { dir: nvme_dir(), bytes: budgets.nvme, rank: 0, io_uring: true }),
        ..Default::default()
    })
    .unwrap();
    m.forward_backward_with(&b, None, 16, &mut store, &p.placement).unwrap();
    assert_eq!(store.stats().spilled_bytes, 0);
    let mut sums = [0u64; 3];
    for l in 0..inv.layers {
        let placed = store.placed_bytes(l);
        assert_eq!(placed, p.placement.tier_bytes(l), "layer {l}: store vs plan ({:?})", p.placement.summary());
        for (s, b) in sums.iter_mut().zip(placed) {
            *s += b;
        }
    }
    assert_eq!(sums, [p.host_peak, p.numa_peak, p.nvme_peak]);
    assert_eq!(p.placement.tier_of(inv.layers - 1, "x"), Some(Tier::Host));
    println!("plan executed tier by tier: {}", p.placement.summary().join("; "));
}

/// Token sparsity: the plan counts a sparse layer's attention tensors at the kept tokens and the
/// kept row indices, so its saved bytes and every tier's bytes (α 0, 0.3 and 1: a sparse layer
/// recomputes its MLP's rows from the stored residual) equal the engine's for one document whose
/// length is a multiple of the block, and offloaded sparse layers train as resident ones; so do
/// layers with MLP channel sparsity (their gate/up/act hold the kept channels' columns, the
/// channel list is stored, and α's recompute keeps the forward's channels).
#[test]
fn sparse_layers_saved_and_tier_bytes_equal_the_engines_accounting() {
    use trainer::model::sparse::{Scorer, Sparsity};
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    let lora_attn = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into(), "o_proj".into()] };
    // (name, config, LoRA, dtype, sparse layers, layers with MLP channel sparsity)
    let cases = [
        ("llama full f32", LLAMA, None, Kind::Float, vec![1usize, 2], vec![]),
        ("llama lora f64", LLAMA, Some(&lora), Kind::Double, vec![2], vec![]),
        ("qwen2 full bf16", QWEN2, None, Kind::BFloat16, vec![0, 1, 2], vec![]),
        ("llama full f32, MLP channels", LLAMA, None, Kind::Float, vec![1, 2], vec![0, 2]),
        ("llama lora f64, MLP channels", LLAMA, Some(&lora_attn), Kind::Double, vec![2], vec![1, 2]),
        ("qwen2 full bf16, MLP channels only", QWEN2, None, Kind::BFloat16, vec![], vec![0, 1, 2]),
    ];
    for (name, text, lora, kind, layers, mlp_layers) in cases {
        let c = cfg(text);
        let mut m = Model::init_random(c.clone(), 0.1, kind, Device::Cpu, 3).unwrap();
        if let Some(l) = lora {
            m.attach_lora(l, 1).unwrap();
        }
        let attention = Sparsity::attention_only(16, 0.4, layers.clone(), Scorer::Exact, false);
        m.sparsity = Some(std::sync::Arc::new(Sparsity { mlp_keep: 0.3, mlp_layers: mlp_layers.clone(), ..attention }));
        let inv = trainer::plan::inventory::of_model(&m, lora, 16).unwrap();
        let dense = trainer::plan::inventory::build(&c, kind, lora, Device::Cpu, 16).unwrap();
        // 160 tokens in blocks of 16: 10 blocks, 4 kept = 64 tokens.
        let t = 160u64;
        assert_eq!(inv.sparse.as_ref().unwrap().kept_tokens(t), 64);
        assert!(inv.saved_bytes(t) < dense.saved_bytes(t), "{name}: sparse layers save less");
        for l in 0..inv.layers {
            let same = inv.layer_saved(l, t, t) == dense.layer_saved(l, t, t);
            assert_eq!(same, !layers.contains(&l) && !mlp_layers.contains(&l), "{name}: layer {l} counted as {}", if same { "dense" } else { "sparse" });
        }
        let (_, _, stats) = m.forward_backward(&batch(&[t as i64]), None, 16).unwrap();
        assert_eq!(stats.saved_bytes as u64, inv.saved_bytes(t), "{name}: saved bytes");
        // Packed documents of 48 + 112 tokens keep 2 + 3 blocks: 80 rows, over the plan's 64 (each
        // document rounds up and keeps its first block); the store spills what its tier lacks.
        let (_, _, packed) = m.forward_backward(&batch(&[48, 112]), None, 16).unwrap();
        assert!(packed.saved_bytes > stats.saved_bytes || layers.is_empty());
        let (loss0, grads0, _) = m.forward_backward(&batch(&[t as i64]), None, 16).unwrap();
        for (keep_last, alpha) in [(0usize, 1.0), (1, 1.0), (0, 0.3), (1, 0.0)] {
            let split = stored_rows(alpha, t as i64) as u64;
            for (tier, granule) in [("host", 64u64), ("nvme", 4096)] {
                let cfg = match tier {
                    "host" => StoreConfig { host_bytes: 64 << 20, ..Default::default() },
                    _ => StoreConfig { nvme: Some(NvmeConfig { dir: nvme_dir(), bytes: 64 << 20, rank: 0, io_uring: true }), ..Default::default() },
                };
                let mut store = ActivationStore::new(&cfg).unwrap();
                let placement = planner::placement::from_inventory(&inv, t, keep_last, alpha, 1, &store.capacities());
                let (loss, grads, _) = m.forward_backward_with(&batch(&[t as i64]), None, 16, &mut store, &placement).unwrap();
                let st = store.stats();
                let got = if tier == "host" { st.host_peak_bytes } else { st.nvme_peak_bytes };
                let want: u64 = (0..inv.layers - keep_last).map(|l| inv.layer_tier_bytes(l, t, split, granule)).sum();
                assert_eq!(got, want, "{name} keep_last={keep_last} α={alpha} {tier}: tier peak");
                for l in 0..inv.layers {
                    assert_eq!(store.placed_bytes(l), placement.tier_bytes(l), "{name} {tier}: layer {l}");
                }
                // Offloaded sparse layers train exactly as resident ones.
                assert!(loss.sum.equal(&loss0.sum), "{name} {tier} α={alpha}: loss");
                for ((n, g), (_, g0)) in grads.iter().zip(grads0.iter()) {
                    assert!(g.equal(g0), "{name} {tier} α={alpha}: gradient of {n}");
                }
            }
        }
        println!("{name}: sparse layers' saved and tier bytes exact");
    }
}
