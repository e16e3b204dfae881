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
        for scorer in [Scorer::Exact, Scorer::Pooled] {
            let mut m = model(cfg, lora);
            let n = m.layers.len();
            m.sparsity = sparsity(scorer, 0.4, (1..n).collect());
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
