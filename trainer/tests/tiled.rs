//! Token tiles inside a block (`compute.tile_tokens`): the tiled step equals the whole-sequence
//! step (float64, within 1e-12 relative, every gradient) for tiles that do and do not divide the
//! sequence, tiles of one and two tokens and tiles longer than it, under GQA, MHA, a sliding
//! window, packed documents, full fine-tuning and LoRA with dropout; and offloaded tiled training
//! (α ∈ {0, 0.3, 1}, every tier) is bit-identical to resident tiled training.
use offload::store::{ActivationStore, NvmeConfig, StoreConfig};
use planner::placement::{from_inventory, Placement};
mod common;
use common::{batch, GQA, MHA_QWEN, WINDOW};
use tch::{Device, Kind};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use trainer::model::{Batch, Grads, Model};

fn model(config: &str, kind: Kind) -> Model {
    let cfg = ModelConfig::parse(config, std::path::Path::new("config.json")).unwrap().0;
    Model::init_random(cfg, 0.2, kind, Device::Cpu, 11).unwrap()
}



fn lora(dropout: f64) -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, dropout, targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec() }
}

/// libtorch's generator is global and the tests of a file run on parallel threads: each test
/// holds this while it seeds and steps.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A step of `m` with a seeded generator (LoRA dropout draws its masks from it).
fn step(m: &Model, b: &Batch) -> (f64, Grads) {
    tch::manual_seed(5);
    let (loss, grads, _) = m.forward_backward(b, None, 16).unwrap();
    (loss.sum.double_value(&[]), grads)
}

fn assert_close(tag: &str, (l0, g0): &(f64, Grads), (l1, g1): &(f64, Grads)) {
    assert!((l0 - l1).abs() <= 1e-12 * l0.abs(), "{tag}: loss {l0} vs {l1}");
    assert_eq!(g0.keys().collect::<Vec<_>>(), g1.keys().collect::<Vec<_>>(), "{tag}");
    for (n, a) in g0 {
        let b = &g1[n];
        let scale = a.abs().max().double_value(&[]).max(1e-30);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-12 * scale, "{tag}: gradient of {n} differs by {diff} (max {scale})");
    }
}

#[test]
fn tiled_equals_whole_sequence() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let cases: [(&str, &str, &[i64], Option<f64>); 5] = [
        ("gqa, packed, full", GQA, &[40, 17, 43], None),
        ("gqa, lora with dropout", GQA, &[57], Some(0.2)),
        ("mha qwen2 (biases), tied, full", MHA_QWEN, &[30, 31], None),
        ("mistral sliding window, lora", WINDOW, &[45, 20], Some(0.0)),
        ("gqa, packed, lora", GQA, &[3, 60, 2], Some(0.0)),
    ];
    for (tag, cfg, lens, dropout) in cases {
        let mut m = model(cfg, Kind::Double);
        if let Some(p) = dropout {
            m.attach_lora(&lora(p), 3).unwrap();
            // Non-zero B, so every adapter's gradient path carries signal.
            for (_, t) in m.named_adapters() {
                let _ = t.shallow_clone().uniform_(-0.3, 0.3);
            }
        }
        let b = batch(lens);
        let whole = step(&m, &b);
        let t: i64 = lens.iter().sum();
        for tile in [1, 2, 7, 16, t - 1, t, t + 5] {
            m.tile_tokens = Some(tile);
            assert_close(&format!("{tag}, tile {tile}"), &whole, &step(&m, &b));
        }
        m.tile_tokens = None;
    }
}

fn nvme(bytes: u64) -> NvmeConfig {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiled");
    std::fs::create_dir_all(&dir).unwrap();
    NvmeConfig { dir, bytes, rank: 0, io_uring: true }
}

fn placement(m: &Model, lora: Option<&LoraConfig>, tokens: u64, store: &ActivationStore, keep_last: usize, alpha: f64) -> Placement {
    let inv = trainer::plan::inventory::of_model(m, lora, 16).unwrap();
    from_inventory(&inv, tokens, keep_last, alpha, 1, &store.capacities())
}

#[test]
fn offloaded_tiles_are_bit_identical_to_resident_tiles() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let node = offload::numa::current_node();
    let base = StoreConfig { max_inflight: 64 << 10, ..Default::default() };
    let stores = [
        ("host", StoreConfig { host_bytes: 64 << 20, ..base.clone() }),
        ("numa", StoreConfig { numa: Some((node, 64 << 20)), ..base.clone() }),
        ("nvme", StoreConfig { nvme: Some(nvme(64 << 20)), ..base.clone() }),
        ("host+numa+nvme", StoreConfig { host_bytes: 300 << 10, numa: Some((node, 300 << 10)), nvme: Some(nvme(64 << 20)), ..base }),
    ];
    for kind in [Kind::Float, Kind::Double] {
        for (tag, dropout) in [("full", None), ("lora", Some(0.0)), ("lora with dropout", Some(0.1))] {
            let mut m = model(GQA, kind);
            let lcfg = dropout.map(lora);
            if let Some(l) = &lcfg {
                m.attach_lora(l, 3).unwrap();
                for (_, t) in m.named_adapters() {
                    let _ = t.shallow_clone().uniform_(-0.3, 0.3);
                }
            }
            let b = batch(&[40, 17, 43]);
            for tile in [3, 32] {
                m.tile_tokens = Some(tile);
                let (l0, g0) = step(&m, &b);
                for alpha in [0.0, 0.3, 1.0] {
                    for (tiers, cfg) in &stores {
                        let mut store = ActivationStore::new(cfg).unwrap();
                        let p = placement(&m, lcfg.as_ref(), 100, &store, 0, alpha);
                        assert_eq!(p.overflow_bytes, 0);
                        tch::manual_seed(5);
                        let (l1, g1, _) = m.forward_backward_with(&b, None, 16, &mut store, &p).unwrap();
                        assert!(store.is_empty());
                        assert_eq!(store.stats().spilled_bytes, 0, "{tag} {tiers}");
                        for l in 0..m.layers.len() {
                            assert_eq!(store.placed_bytes(l), p.tier_bytes(l), "{tag} {tiers} alpha={alpha}: layer {l}");
                        }
                        let at = format!("{kind:?} {tag} tile {tile} alpha {alpha} {tiers}");
                        // The backward read the layer input one tile at a time: nothing larger
                        // than K came back at once (K is [T, kv_heads × head_dim], the input
                        // [T, hidden]).
                        let k_bytes = 100 * m.cfg.num_kv_heads * m.cfg.head_dim * kind.elt_size_in_bytes() as i64;
                        assert_eq!(store.stats().largest_read_bytes, k_bytes as u64, "{at}: largest read");
                        assert_eq!(l0.to_bits(), l1.sum.double_value(&[]).to_bits(), "{at}: loss");
                        for (n, g) in &g0 {
                            assert!(g.equal(&g1[n]), "{at}: gradient of {n} differs");
                        }
                    }
                }
            }
        }
    }
}
