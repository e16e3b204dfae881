//! Token sparsity (LeMo / JENGA) in the engine: a sparse layer's explicit backward equals
//! libtorch autograd of the same gathered computation (float64, odd sizes, GQA, MHA with biases,
//! LoRA, packed documents); keeping every block is the dense step bit for bit; the kept set is
//! deterministic, keeps each document's first block and `ceil(keep · blocks)` of each document's
//! blocks; a sparse layer saves the attention's tensors for its kept tokens only.
mod common;
use std::sync::Arc;

use common::{batch, GQA, MHA_QWEN};
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use trainer::model::predictor::{self, Predictor};
use trainer::model::sparse::{Scorer, Sparsity};
use trainer::model::{Batch, Model};

/// libtorch's generator is global and the tests of a file run on parallel threads.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(config: &str, lora: bool) -> Model {
    model_with(config, lora.then_some(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][..]))
}

fn model_with(config: &str, lora: Option<&[&str]>) -> Model {
    let cfg = ModelConfig::parse(config, std::path::Path::new("config.json")).unwrap().0;
    let mut m = Model::init_random(cfg, 0.2, Kind::Double, Device::Cpu, 11).unwrap();
    if let Some(targets) = lora {
        let l = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: targets.iter().map(|t| t.to_string()).collect() };
        m.attach_lora(&l, 3).unwrap();
        tch::manual_seed(4);
        for (_, t) in m.named_adapters() {
            let _ = t.shallow_clone().uniform_(-0.3, 0.3);
        }
    }
    m
}

/// An unfitted predictor (random paths) of `layers` for blocks of 8.
fn predictor(m: &Model, layers: &[usize]) -> Predictor {
    tch::manual_seed(9);
    Predictor::new(std::path::Path::new("unused.safetensors"), layers, 8, m.cfg.head_dim, 16, 4, (Kind::Double, Device::Cpu))
}

fn sparsity(scorer: Scorer, keep: f64, layers: Vec<usize>) -> Option<Arc<Sparsity>> {
    Some(Arc::new(Sparsity::attention_only(8, keep, layers, scorer, false)))
}

#[test]
fn rating_by_target_blocks_matches_autograd_too() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = model(GQA, true);
    m.sparsity = Some(Arc::new(Sparsity::attention_only(8, 0.4, vec![1, 2], Scorer::Exact, true)));
    // Prompt/completion-like: only each document's last 5 tokens are targets.
    let mut b = batch(&[40, 17, 43]);
    let ends = [40i64, 57, 100];
    let labels: Vec<i64> = (0..100).map(|i| if ends.iter().any(|&e| i < e && i >= e - 5) { (i * 3 + 2) % 50 } else { -100 }).collect();
    b.labels = Tensor::from_slice(&labels);
    let kept = compare(&m, &b, "target-weighted exact");
    for (l, k, _) in &kept {
        let r = rows(k);
        // The target blocks are kept: tokens 35..40 (block 32..40), 52..57 (block 56..57 and 48..56), 95..100.
        for t in [35, 39, 52, 56, 95, 99] {
            assert!(r.contains(&t), "layer {l}: target token {t} dropped: {r:?}");
        }
        assert!(r.len() < 100, "layer {l}: nothing dropped");
    }
}

fn rows(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

/// The explicit step against autograd of the same computation on the kept rows (and through the
/// kept MLP channels).
fn compare(m: &Model, b: &Batch, tag: &str) -> Vec<(usize, Tensor, i64)> {
    compare_all(m, b, tag).kept
}

fn compare_all(m: &Model, b: &Batch, tag: &str) -> trainer::model::StepStats {
    let (loss, grads, stats) = m.forward_backward(b, None, 6).unwrap();
    let kept: Vec<(usize, Tensor)> = stats.kept.iter().map(|(l, k, _)| (*l, k.shallow_clone())).collect();
    let (ref_loss, ref_grads) = trainer::model::reference::loss_and_grads_sparse(m, b, &kept, &stats.channels);
    let mean = loss.sum.double_value(&[]) / loss.count as f64;
    assert!((mean - ref_loss).abs() < 1e-12 * ref_loss.abs(), "{tag}: loss {mean} vs {ref_loss}");
    assert_eq!(grads.keys().collect::<Vec<_>>(), ref_grads.keys().collect::<Vec<_>>(), "{tag}");
    for (n, g) in &ref_grads {
        let e = (&grads[n] - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]).max(1e-3);
        assert!(e < 1e-9, "{tag}: {n}: relative error {e:e}");
    }
    stats
}

#[test]
fn mlp_channel_sparsity_matches_autograd_of_the_straight_through_mlp() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let attention = ["q_proj", "k_proj", "v_proj", "o_proj"];
    for (tag, cfg, lora, attn_layers) in [("gqa full", GQA, None, vec![]), ("gqa full + attention sparsity", GQA, None, vec![1, 2]), ("gqa lora on attention", GQA, Some(&attention[..]), vec![2]), ("mha qwen2 biases", MHA_QWEN, None, vec![1])] {
        let mut m = model_with(cfg, lora);
        let n = m.layers.len();
        let dense_bytes = m.forward_backward(&batch(&[40, 17, 43]), None, 6).unwrap().2.saved_bytes;
        m.sparsity = Some(Arc::new(Sparsity { mlp_keep: 0.3, mlp_layers: (0..n).collect(), ..Sparsity::attention_only(8, 0.4, attn_layers.clone(), Scorer::Exact, false) }));
        let stats = compare_all(&m, &batch(&[40, 17, 43]), tag);
        let i = m.cfg.intermediate_size;
        let c = (0.3 * i as f64).ceil() as i64;
        assert_eq!(stats.channels.len(), n, "{tag}");
        for (l, ch) in &stats.channels {
            let v = rows(ch);
            assert_eq!(v.len() as i64, c, "{tag}: layer {l}");
            assert!(v.windows(2).all(|w| w[0] < w[1]) && v[v.len() - 1] < i, "{tag}: layer {l}: channels ascending and in range: {v:?}");
        }
        if attn_layers.is_empty() {
            // gate, up and act shrink from I to c columns (float64), the channel list is saved.
            assert_eq!(dense_bytes as i64 - stats.saved_bytes as i64, n as i64 * (3 * 100 * (i - c) * 8 - c * 8), "{tag}: saved bytes");
        }
    }
    // LoRA on the MLP's projections is refused, naming the projection.
    let mut m = model(GQA, true);
    m.sparsity = Some(Arc::new(Sparsity { mlp_keep: 0.3, mlp_layers: vec![0], ..Sparsity::attention_only(8, 1.0, vec![], Scorer::Exact, false) }));
    let e = m.forward_backward(&batch(&[40]), None, 6).err().expect("LoRA on the MLP with channel sparsity").to_string();
    assert!(e.contains("gate_proj") && e.contains("lora.targets"), "{e}");
}

#[test]
fn sparse_layers_match_autograd_of_the_gathered_computation() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let lens = [40, 17, 43];
    for (tag, cfg, lora) in [("gqa full", GQA, false), ("gqa lora", GQA, true), ("mha qwen2 biases", MHA_QWEN, false)] {
        for which in 0..3 {
            let mut m = model(cfg, lora);
            let n = m.layers.len();
            let scorer = match which {
                0 => Scorer::Exact,
                1 => Scorer::Pooled,
                _ => Scorer::predictor(predictor(&m, &(1..n).collect::<Vec<_>>())),
            };
            m.sparsity = sparsity(scorer.clone(), 0.4, (1..n).collect());
            let kept = compare(&m, &batch(&lens), &format!("{tag} {scorer:?}"));
            assert_eq!(kept.len(), n - 1);
            for (l, k, t) in &kept {
                let r = rows(k);
                assert_eq!(*t, 100);
                // Documents [0, 40), [40, 57), [57, 100): blocks of 8 from each start; ceil(0.4 ·
                // blocks) of each, the first included.
                for (s, e, blocks) in [(0, 40, 5), (40, 57, 3), (57, 100, 6)] {
                    let mine: Vec<i64> = r.iter().copied().filter(|&i| i >= s && i < e).collect();
                    assert!(mine.starts_with(&(s..s + 8).collect::<Vec<_>>()), "layer {l}: document at {s} lost its first block: {mine:?}");
                    let want = (0.4f64 * blocks as f64).ceil() as usize;
                    let got = (0..blocks).filter(|b| mine.contains(&(s + 8 * b))).count();
                    assert_eq!(got, want, "layer {l}: document at {s}");
                }
            }
        }
    }
}

#[test]
fn keeping_every_block_is_the_dense_step_bit_for_bit() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    for lora in [false, true] {
        let mut m = model(GQA, lora);
        let b = batch(&[40, 17, 43]);
        let (l0, g0, s0) = m.forward_backward(&b, None, 6).unwrap();
        m.sparsity = sparsity(Scorer::Exact, 1.0, vec![0, 1, 2]);
        let (l1, g1, s1) = m.forward_backward(&b, None, 6).unwrap();
        assert_eq!(l0.sum.double_value(&[]).to_bits(), l1.sum.double_value(&[]).to_bits());
        for (n, g) in &g0 {
            assert!(g.equal(&g1[n]), "lora {lora}: gradient of {n}");
        }
        // The kept rows (every one) are saved beside the same tensors.
        assert_eq!(s1.saved_bytes, s0.saved_bytes + 3 * 100 * 8);
    }
}

#[test]
fn the_kept_set_is_deterministic_and_saves_less() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = model(GQA, false);
    let b = batch(&[120]);
    let (_, _, dense) = m.forward_backward(&b, None, 6).unwrap();
    m.sparsity = sparsity(Scorer::Exact, 0.25, vec![2]);
    let (_, _, a) = m.forward_backward(&b, None, 6).unwrap();
    let (_, _, c) = m.forward_backward(&b, None, 6).unwrap();
    assert_eq!(rows(&a.kept[0].1), rows(&c.kept[0].1));
    // 15 blocks, 4 kept: 32 of 120 tokens. The attention's tensors of layer 2 shrink to them
    // (input norm statistics and output, q, k, v, output, logsumexp), plus the kept rows.
    assert_eq!(rows(&a.kept[0].1).len(), 32);
    let cfg = &m.cfg;
    // Per token, float64: rstd (1), x_attn (hidden), q and the output (heads × head_dim each), k
    // and v (kv_heads × head_dim each), the logsumexp (heads).
    let per_token = 8 * (1 + cfg.hidden_size + 2 * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads);
    assert_eq!(dense.saved_bytes as i64 - a.saved_bytes as i64, (120 - 32) * per_token - 32 * 8, "saved bytes");
}

#[test]
fn the_predictor_map_is_the_sum_over_slices_of_its_paths_products() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let m = model(GQA, false);
    let p = predictor(&m, &[1]);
    let (d, hidden) = (m.cfg.head_dim, m.cfg.hidden_size);
    let x = Tensor::randn([19, hidden], (Kind::Double, Device::Cpu));
    let map = p.map(1, &x).unwrap();
    let nb = 3; // ceil(19 / 8)
    assert_eq!(map.size(), [nb, nb]);
    // Naive: block b's slice s is tokens 8b..8b+8 (zeros past the end) × columns s·d..(s+1)·d,
    // flattened token-major; each path is w2 · relu(w1 · f).
    let path = &p.layers[&1];
    let feat = |b: i64, s: i64| {
        let rows: Vec<Tensor> = (8 * b..8 * b + 8).map(|t| if t < 19 { x.get(t).narrow(0, s * d, d) } else { Tensor::zeros([d], (Kind::Double, Device::Cpu)) }).collect();
        Tensor::cat(&rows, 0)
    };
    let run = |mlp: &predictor::Mlp, f: &Tensor| mlp.w2.matmul(&mlp.w1.matmul(f).relu());
    for qb in 0..nb {
        for kb in 0..nb {
            let want = if kb > qb { 0.0 } else { (0..hidden / d).map(|s| run(&path.q, &feat(qb, s)).dot(&run(&path.k, &feat(kb, s))).double_value(&[])).sum::<f64>() };
            assert!((map.double_value(&[qb, kb]) - want).abs() < 1e-10 * want.abs().max(1.0), "({qb}, {kb}): {} vs {want}", map.double_value(&[qb, kb]));
        }
    }
    // Saved and read back: the same map; a file that lacks a layer, or other blocks, is refused.
    let dir = std::env::temp_dir().join(format!("strata-predictor-{}", std::process::id()));
    let path = dir.join("p.safetensors");
    let saved = Predictor { path: path.clone(), ..predictor(&m, &[1, 2]) };
    saved.save().unwrap();
    let read = Predictor::load(&path, d, Kind::Double, Device::Cpu).unwrap();
    assert_eq!(read.block, 8);
    assert_eq!(read.layers.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(read.map(1, &x).unwrap().double_value(&[2, 1]), saved.map(1, &x).unwrap().double_value(&[2, 1]));
    read.check(&[1, 2], 8).unwrap();
    let e = read.check(&[1, 3], 8).unwrap_err();
    assert!(e.contains("layer 3") && e.contains("sparsity.layers"), "{e}");
    let e = read.check(&[1], 16).unwrap_err();
    assert!(e.contains("blocks of 8") && e.contains("sparsity.block_size = 16"), "{e}");
    let e = Predictor::load(&dir.join("missing.safetensors"), d, Kind::Double, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors") && e.contains("train predictor"), "{e}");
    // A slice width that does not divide the inputs (another model's head_dim).
    let e = Predictor::load(&path, 7, Kind::Double, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("head_dim"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_predictor_scored_step_measures_its_recall_of_the_exact_choice() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = model(GQA, false);
    let n = m.layers.len();
    let layers: Vec<usize> = (1..n).collect();
    let b = batch(&[40, 17, 43]);
    m.measure_recall = true;
    // The exact scorer measures nothing (there is no predictor to check).
    m.sparsity = sparsity(Scorer::Exact, 0.4, layers.clone());
    let exact = m.forward_backward(&b, None, 6).unwrap().2;
    assert!(exact.recall.is_empty());
    m.sparsity = sparsity(Scorer::predictor(predictor(&m, &layers)), 0.4, layers.clone());
    let stats = m.forward_backward(&b, None, 6).unwrap().2;
    // Blocks chosen by score: ceil(0.4 · blocks) − 1 (the first is kept anyway) per document:
    // 2 − 1, 2 − 1 and 3 − 1.
    assert_eq!(stats.recall.iter().map(|r| r.0).collect::<Vec<_>>(), layers);
    for (l, hits, of) in &stats.recall {
        assert_eq!(*of, 4, "layer {l}");
        assert!(*hits <= *of, "layer {l}");
    }
    // Layer 1 reads the dense layer 0's output in both runs, so its exact choice is the exact
    // run's: the hits are the blocks both runs kept beyond the documents' first.
    let starts = |st: &trainer::model::StepStats| -> Vec<i64> {
        let r = rows(&st.kept.iter().find(|k| k.0 == 1).unwrap().1);
        r.into_iter().filter(|&t| [(0, 40), (40, 57), (57, 100)].iter().any(|&(d, end)| t > d && t < end && (t - d) % 8 == 0)).collect()
    };
    let (e, p) = (starts(&exact), starts(&stats));
    let both = e.iter().filter(|t| p.contains(t)).count() as u64;
    assert_eq!((e.len(), p.len()), (4, 4));
    assert_eq!(stats.recall[0].1, both, "exact {e:?}, predictor {p:?}");
    // Recall of the exact choice by itself is every block.
    use trainer::model::sparse::recall;
    assert_eq!(recall(&[0, 40, 57, 100], 8, 0.4, &[1.0; 14], &[1.0; 14], None), (4, 4));
    let mut other = vec![1.0; 14];
    other[1] = 0.0; // document 0's second block, the exact choice there, now rates lowest
    assert_eq!(recall(&[0, 40, 57, 100], 8, 0.4, &[1.0; 14], &other, None), (3, 4));
}
