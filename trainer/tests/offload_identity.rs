//! Training through the activation store: gradients and losses with activations moved to the
//! host, NUMA and NVMe tiers (each alone and all mixed) are bit-identical to the all-resident run.
use offload::store::{ActivationStore, NvmeConfig, StoreConfig};
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

fn nvme_config(bytes: u64) -> NvmeConfig {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("offload-identity");
    std::fs::create_dir_all(&dir).unwrap();
    NvmeConfig { dir, bytes, rank: 0, io_uring: true }
}

fn nvme_store() -> ActivationStore {
    ActivationStore::new(&StoreConfig { nvme: Some(nvme_config(64 << 20)), max_inflight: 64 << 10, ..Default::default() }).unwrap()
}

/// The tier mixes every test runs through; a small in-flight bound, so puts wait for the I/O thread.
fn stores() -> Vec<(&'static str, StoreConfig)> {
    let node = offload::numa::current_node();
    let base = StoreConfig { max_inflight: 64 << 10, ..Default::default() };
    vec![
        ("nvme", StoreConfig { nvme: Some(nvme_config(64 << 20)), ..base.clone() }),
        ("host", StoreConfig { host_bytes: 64 << 20, ..base.clone() }),
        ("numa", StoreConfig { numa: Some((node, 64 << 20)), ..base.clone() }),
        // About one layer each in host and NUMA memory, the rest (and spills) on NVMe.
        ("host+numa+nvme", StoreConfig { host_bytes: 400 << 10, numa: Some((node, 400 << 10)), nvme: Some(nvme_config(64 << 20)), ..base }),
    ]
}

fn check(m: &Model, tag: &str) {
    let b = batch();
    tch::manual_seed(5);
    let (l0, g0, _) = m.forward_backward(&b, None, 16).unwrap();
    let alphas: &[f64] = if tag.contains("dropout") { &[1.0] } else { &[0.0, 0.3, 1.0] };
    for ((&alpha, keep_last), (tiers, cfg)) in alphas.iter().flat_map(|a| [0usize, 2].map(move |k| (a, k))).flat_map(|ak| stores().into_iter().map(move |s| (ak, s))) {
        let mut store = ActivationStore::new(&cfg).unwrap();
        tch::manual_seed(5);
        let policy = OffloadPolicy { offload: true, keep_last, lookahead: 1 + keep_last, alpha };
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
        if tiers == "host+numa+nvme" && alpha == 1.0 && keep_last == 0 {
            assert!(st.host_peak_bytes > 0 && st.numa_peak_bytes > 0 && st.nvme_peak_bytes > 0, "{tag}: every tier used: {st:?}");
        }
        println!("{tag} {tiers} alpha={alpha} keep_last={keep_last}: {written} bytes moved (peaks host {} numa {} nvme {}), gradients bit-identical", st.host_peak_bytes, st.numa_peak_bytes, st.nvme_peak_bytes);
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
    let policy = OffloadPolicy { offload: true, keep_last: 0, lookahead: 1, alpha: 0.5 };
    let err = m.forward_backward_with(&batch(), None, 16, &mut store, policy).err().unwrap().to_string();
    assert!(err.contains("lora.dropout"), "{err}");
}

#[test]
fn the_last_layers_get_the_fastest_tier_and_an_exhausted_budget_is_an_error() {
    let node = offload::numa::current_node();
    let store = ActivationStore::new(&StoreConfig { host_bytes: 1024, numa: Some((node, 2048)), nvme: Some(nvme_config(1 << 20)), ..Default::default() }).unwrap();
    // Layers of 500 bytes, 8 offloaded, stacked from the last: bytes [0, 1024) are host memory,
    // [1024, 3072) NUMA, the rest NVMe; each layer starts where its share begins.
    let tiers: Vec<&str> = (0..8).map(|l| store.place_layer(500, 7 - l).name()).collect();
    assert_eq!(tiers, ["nvme", "numa", "numa", "numa", "numa", "host", "host", "host"]);
    drop(store);

    // Host memory only, too small for one layer: the error names the tier and the tensor.
    let m = model(Kind::Float);
    let mut store = ActivationStore::new(&StoreConfig { host_bytes: 40 << 10, ..Default::default() }).unwrap();
    let policy = OffloadPolicy { offload: true, keep_last: 0, lookahead: 1, alpha: 1.0 };
    let err = m.forward_backward_with(&batch(), None, 16, &mut store, policy).err().unwrap().to_string();
    assert!(err.contains("host tier full") && err.contains("layer"), "{err}");
}
