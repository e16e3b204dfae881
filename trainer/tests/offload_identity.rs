//! Training through the activation store: gradients and losses with activations written to the
//! NVMe tier are bit-identical to the all-resident run.
use offload::store::{ActivationStore, Tier};
use tch::{Device, Kind, Tensor};
use trainer::config::ModelConfig;
use trainer::lora::LoraConfig;
use trainer::model::{Batch, Model, OffloadPolicy};

fn model(kind: Kind) -> Model {
    let text = r#"{"model_type": "llama", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}"#;
    let cfg = ModelConfig::parse(text, std::path::Path::new("config.json")).unwrap().0;
    Model::init_random(cfg, 0.2, kind, Device::Cpu, 11).unwrap()
}

fn batch() -> Batch {
    let lens = [40i64, 17, 63];
    let t: i64 = lens.iter().sum();
    let ids = Tensor::from_slice(&(0..t).map(|i| (i * 7 + 1) % 50).collect::<Vec<_>>());
    let labels = Tensor::from_slice(&(0..t).map(|i| if i % 9 == 0 { -100 } else { (i * 3 + 2) % 50 }).collect::<Vec<_>>());
    Batch { ids, labels, doc_lens: lens.to_vec() }
}

fn nvme_store() -> ActivationStore {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("offload-identity");
    std::fs::create_dir_all(&dir).unwrap();
    // A small in-flight bound, so puts wait for the I/O thread.
    ActivationStore::with_nvme(&dir, 64 << 20, 0, true, 64 << 10).unwrap()
}

fn check(m: &Model, tag: &str) {
    let b = batch();
    tch::manual_seed(5);
    let (l0, g0, _) = m.forward_backward(&b, None, 16).unwrap();
    let alphas: &[f64] = if tag.contains("dropout") { &[1.0] } else { &[0.0, 0.3, 1.0] };
    for (&alpha, keep_last) in alphas.iter().flat_map(|a| [0usize, 2].map(move |k| (a, k))) {
        let mut store = nvme_store();
        tch::manual_seed(5);
        let policy = OffloadPolicy { tier: Tier::Nvme, keep_last, lookahead: 1 + keep_last, alpha };
        let (l1, g1, _) = m.forward_backward_with(&b, None, 16, &mut store, policy).unwrap();
        assert!(store.is_empty(), "backward must take back everything it stored");
        let st = store.stats();
        let written = st.written_bytes;
        assert!(written > 0 && st.read_bytes == written, "{tag}: wrote {written}, read {}", st.read_bytes);
        assert_eq!(l0.sum.double_value(&[]).to_bits(), l1.sum.double_value(&[]).to_bits(), "{tag}: loss");
        assert_eq!(g0.len(), g1.len());
        for (n, g) in &g0 {
            assert!(g.equal(&g1[n]), "{tag} alpha={alpha} keep_last={keep_last}: gradient of {n} differs");
        }
        println!("{tag} alpha={alpha} keep_last={keep_last}: {written} bytes through the NVMe tier, gradients bit-identical");
    }
}

#[test]
fn nvme_tier_training_is_bit_identical_full_and_lora() {
    check(&model(Kind::Float), "full float32");
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.2, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    m.attach_lora(&cfg, 3).unwrap();
    check(&m, "lora+dropout float32");
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: trainer::lora::TARGETS.iter().map(|s| s.to_string()).collect() };
    m.attach_lora(&cfg, 3).unwrap();
    check(&m, "lora float32");
}

#[test]
fn alpha_below_one_with_lora_dropout_is_refused() {
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.1, targets: vec!["q_proj".into()] };
    m.attach_lora(&cfg, 3).unwrap();
    let mut store = nvme_store();
    let policy = OffloadPolicy { tier: Tier::Nvme, keep_last: 0, lookahead: 1, alpha: 0.5 };
    let err = m.forward_backward_with(&batch(), None, 16, &mut store, policy).err().unwrap().to_string();
    assert!(err.contains("lora.dropout"), "{err}");
}
