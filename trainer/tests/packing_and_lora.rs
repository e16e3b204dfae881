//! Model-level checks of packing (documents confined, positions restarting) and LoRA (only
//! adapters get gradients) against the autograd reference, float64.
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use trainer::model::{Batch, Model};

fn tiny(tied: bool) -> ModelConfig {
    let text = format!(
        r#"{{"model_type": "qwen2", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": {tied}}}"#
    );
    ModelConfig::parse(&text, std::path::Path::new("config.json")).unwrap().0
}

fn batch(doc_lens: &[i64]) -> Batch {
    let t: i64 = doc_lens.iter().sum();
    let ids = Tensor::from_slice(&(0..t).map(|i| (i * 7 + 3) % 40).collect::<Vec<_>>());
    let mut labels: Vec<i64> = (0..t).map(|i| (i * 11 + 1) % 40).collect();
    let mut end = 0;
    for n in doc_lens {
        end += n;
        labels[(end - 1) as usize] = -100; // a document's last token predicts nothing
    }
    labels[1] = -100; // a masked prompt token
    Batch { ids, labels: Tensor::from_slice(&labels), doc_lens: doc_lens.to_vec() }
}

fn compare(m: &Model, b: &Batch, tag: &str) {
    let (loss, grads, _) = m.forward_backward(b, None, 6).unwrap();
    let (ref_loss, ref_grads) = trainer::model::reference::loss_and_grads(m, b);
    let mean = loss.sum.double_value(&[]) / loss.count as f64;
    assert!((mean - ref_loss).abs() < 1e-12 * ref_loss.abs(), "{tag}: loss {mean} vs {ref_loss}");
    let mut names: Vec<_> = grads.keys().cloned().collect();
    let mut ref_names: Vec<_> = ref_grads.keys().cloned().collect();
    names.sort();
    ref_names.sort();
    assert_eq!(names, ref_names, "{tag}: trained tensors differ");
    for (n, g) in &ref_grads {
        let e = (&grads[n] - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]).max(1e-3);
        assert!(e < 1e-9, "{tag}: {n}: relative error {e:e}");
    }
    println!("{tag}: {} gradients match autograd", grads.len());
}

#[test]
fn packed_documents_match_reference() {
    for tied in [false, true] {
        let m = Model::init_random(tiny(tied), 0.3, Kind::Double, Device::Cpu, 1).unwrap();
        compare(&m, &batch(&[9, 1, 14, 5]), "packed");
    }
}

#[test]
fn packing_equals_documents_one_by_one() {
    // The same documents, packed or alone, give the same loss sum: nothing leaks across.
    let m = Model::init_random(tiny(false), 0.3, Kind::Double, Device::Cpu, 2).unwrap();
    let lens = [9i64, 1, 14, 5];
    let packed = batch(&lens);
    let whole = m.loss(&packed, 4).unwrap().sum.double_value(&[]);
    let mut sum = 0.0;
    let mut s = 0;
    for n in lens {
        let b = Batch { ids: packed.ids.narrow(0, s, n), labels: packed.labels.narrow(0, s, n), doc_lens: vec![n] };
        sum += m.loss(&b, 4).unwrap().sum.double_value(&[]);
        s += n;
    }
    assert!((whole - sum).abs() < 1e-12 * sum.abs(), "{whole} vs {sum}");
}

#[test]
fn lora_trains_only_adapters_and_matches_reference() {
    let mut m = Model::init_random(tiny(false), 0.3, Kind::Double, Device::Cpu, 3).unwrap();
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: trainer::model::proj::Proj::short_names().iter().map(|s| s.to_string()).collect() };
    m.attach_lora(&cfg, 4).unwrap();
    // PEFT starts B at zero (output unchanged); give B values so every gradient path is exercised.
    for layer in &mut m.layers {
        for (_, lin) in layer.projections_mut() {
            if let Some(ad) = &mut lin.lora {
                ad.b = Tensor::randn(ad.b.size(), (Kind::Double, Device::Cpu)) * 0.2;
            }
        }
    }
    compare(&m, &batch(&[12, 7]), "lora");
    let (_, grads, _) = m.forward_backward(&batch(&[12, 7]), None, 6).unwrap();
    assert_eq!(grads.len(), 2 * 7 * 2, "two tensors per adapted projection, 7 projections, 2 layers");
    assert!(grads.keys().all(|n| n.contains(".lora_")));
}

#[test]
fn lora_over_bf16_base_keeps_float32_adapters() {
    let mut m = Model::init_random(tiny(false), 0.3, Kind::BFloat16, Device::Cpu, 5).unwrap();
    let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.1, targets: vec!["q_proj".into(), "v_proj".into()] };
    m.attach_lora(&cfg, 6).unwrap();
    let (loss, grads, _) = m.forward_backward(&batch(&[10]), None, 6).unwrap();
    assert!(loss.sum.double_value(&[]).is_finite());
    assert_eq!(grads.len(), 2 * 2 * 2);
    assert!(grads.values().all(|g| g.kind() == Kind::Float));
}

/// AdamW against libtorch's reference formula run by hand in float64 over three steps, with
/// weight decay on a matrix and none on a norm weight.
#[test]
fn adamw_matches_the_pytorch_formula() {
    use trainer::train::optim::{AdamW, AdamWConfig};
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.5 };
    let w = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
    let n = Tensor::randn([4], (Kind::Double, Device::Cpu));
    let (mut rw, mut rn) = (w.copy(), n.copy());
    let (mut mw, mut vw, mut mn, mut vn) = (w.zeros_like(), w.zeros_like(), n.zeros_like(), n.zeros_like());
    let mut opt = AdamW::new(cfg.clone());
    for t in 1..=3 {
        let gw = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let gn = Tensor::randn([4], (Kind::Double, Device::Cpu));
        let grads = [("model.layers.0.mlp.up_proj.weight".to_string(), gw.copy()), ("model.norm.weight".to_string(), gn.copy())].into_iter().collect();
        opt.step(&[("model.layers.0.mlp.up_proj.weight".into(), &w), ("model.norm.weight".into(), &n)], &grads, cfg.lr);
        let upd = |p: &Tensor, m: &mut Tensor, v: &mut Tensor, g: &Tensor, wd: f64| -> Tensor {
            *m = &*m * cfg.beta1 + g * (1.0 - cfg.beta1);
            *v = &*v * cfg.beta2 + g.square() * (1.0 - cfg.beta2);
            let mh = &*m / (1.0 - cfg.beta1.powi(t));
            let vh = &*v / (1.0 - cfg.beta2.powi(t));
            p * (1.0 - cfg.lr * wd) - mh / (vh.sqrt() + cfg.eps) * cfg.lr
        };
        rw = upd(&rw, &mut mw, &mut vw, &gw, cfg.weight_decay);
        rn = upd(&rn, &mut mn, &mut vn, &gn, 0.0);
        assert!((&w - &rw).abs().max().double_value(&[]) < 1e-14, "step {t}: matrix");
        assert!((&n - &rn).abs().max().double_value(&[]) < 1e-14, "step {t}: norm");
    }
}

#[test]
fn schedule_warms_up_then_decays() {
    use trainer::train::optim::{Decay, Schedule};
    let s = Schedule { lr: 1.0, warmup: 4, total: 14, decay: Decay::Cosine, min_lr_ratio: 0.1 };
    assert_eq!(s.lr_at(0), 0.25);
    assert_eq!(s.lr_at(3), 1.0);
    assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
    assert!((s.lr_at(9) - 0.55).abs() < 1e-12);
    assert!((s.lr_at(14) - 0.1).abs() < 1e-12);
    let l = Schedule { decay: Decay::Linear, ..s.clone() };
    assert!((l.lr_at(9) - 0.55).abs() < 1e-12);
    let mut grads: trainer::model::Grads = [("a".to_string(), Tensor::from_slice(&[3.0f64, 4.0]))].into_iter().collect();
    let norm = trainer::train::optim::clip_grad_norm(&mut grads, Some(1.0));
    assert!((norm - 5.0).abs() < 1e-12);
    assert!((grads["a"].double_value(&[0]) - 0.6).abs() < 1e-6);
}
