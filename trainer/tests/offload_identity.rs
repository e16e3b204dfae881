//! Training through the activation store: gradients and losses with activations moved to the
//! host, NUMA and NVMe tiers (each alone and all mixed) are bit-identical to the all-resident run,
//! and the store puts every tensor exactly where the placement says, tier by tier.
use offload::store::{ActivationStore, NvmeConfig, StoreConfig};
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use planner::placement::{from_inventory, Placement, Tier};
use trainer::model::{Batch, Model};

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

/// The placement the engine would run for `store` (the planner's rule over its tiers).
fn placement(m: &Model, lora: Option<&LoraConfig>, store: &ActivationStore, keep_last: usize, alpha: f64) -> Placement {
    let inv = trainer::plan::inventory::of_model(m, lora, 16).unwrap();
    from_inventory(&inv, batch().ids.size()[0] as u64, keep_last, alpha, 1 + keep_last, &store.capacities())
}

fn check(m: &Model, lora: Option<&LoraConfig>, tag: &str) {
    let b = batch();
    tch::manual_seed(5);
    let (l0, g0, _) = m.forward_backward(&b, None, 16).unwrap();
    let alphas: &[f64] = if tag.contains("dropout") { &[1.0] } else { &[0.0, 0.3, 1.0] };
    for ((&alpha, keep_last), (tiers, cfg)) in alphas.iter().flat_map(|a| [0usize, 2].map(move |k| (a, k))).flat_map(|ak| stores().into_iter().map(move |s| (ak, s))) {
        let mut store = ActivationStore::new(&cfg).unwrap();
        let p = placement(m, lora, &store, keep_last, alpha);
        assert_eq!(p.overflow_bytes, 0, "{tag} {tiers}");
        tch::manual_seed(5);
        let (l1, g1, _) = m.forward_backward_with(&b, None, 16, &mut store, &p).unwrap();
        assert!(store.is_empty(), "backward must take back everything it stored");
        let st = store.stats();
        let written = st.written_bytes;
        assert!(written > 0 && st.read_bytes == written, "{tag}: wrote {written}, read {}", st.read_bytes);
        assert_eq!(l0.sum.double_value(&[]).to_bits(), l1.sum.double_value(&[]).to_bits(), "{tag}: loss");
        assert_eq!(g0.len(), g1.len());
        for (n, g) in &g0 {
            assert!(g.equal(&g1[n]), "{tag} alpha={alpha} keep_last={keep_last}: gradient of {n} differs");
        }
        // What the store did is what the placement said, layer by layer and tier by tier.
        assert_eq!(st.spilled_bytes, 0, "{tag} {tiers}");
        for l in 0..m.layers.len() {
            assert_eq!(store.placed_bytes(l), p.tier_bytes(l), "{tag} {tiers} alpha={alpha} keep_last={keep_last}: layer {l}");
        }
        if tiers == "host+numa+nvme" && alpha == 1.0 && keep_last == 0 {
            assert!(st.host_peak_bytes > 0 && st.numa_peak_bytes > 0 && st.nvme_peak_bytes > 0, "{tag}: every tier used: {st:?}");
            // The last layer (first backward) in host memory, the first on NVMe; a layer split
            // across tiers somewhere in between (the budgets are not multiples of a layer).
            assert_eq!(p.tier_of(3, "x"), Some(Tier::Host));
            assert_eq!(p.tier_of(0, "x"), Some(Tier::Nvme));
            assert!((0..4).any(|l| p.tier_bytes(l).iter().filter(|b| **b > 0).count() > 1), "{tag}: {:?}", p.summary());
        }
        println!("{tag} {tiers} alpha={alpha} keep_last={keep_last}: {written} bytes moved (peaks host {} numa {} nvme {}), gradients bit-identical, placement executed exactly", st.host_peak_bytes, st.numa_peak_bytes, st.nvme_peak_bytes);
    }
}

#[test]
fn nvme_tier_training_is_bit_identical_full_and_lora() {
    check(&model(Kind::Float), None, "full float32");
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.2, targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()] };
    m.attach_lora(&cfg, 3).unwrap();
    check(&m, Some(&cfg), "lora+dropout float32");
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: trainer::model::proj::Proj::short_names().iter().map(|s| s.to_string()).collect() };
    m.attach_lora(&cfg, 3).unwrap();
    check(&m, Some(&cfg), "lora float32");
}

#[test]
fn alpha_below_one_with_lora_dropout_is_refused() {
    let mut m = model(Kind::Float);
    let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.1, targets: vec!["q_proj".into()] };
    m.attach_lora(&cfg, 3).unwrap();
    let mut store = nvme_store();
    let p = placement(&m, Some(&cfg), &store, 0, 0.5);
    let err = m.forward_backward_with(&batch(), None, 16, &mut store, &p).err().unwrap().to_string();
    assert!(err.contains("lora.dropout"), "{err}");
}

#[test]
fn a_store_full_beyond_the_placement_spills_and_too_small_tiers_are_refused() {
    let m = model(Kind::Float);
    let node = offload::numa::current_node();
    // Placed for a host tier of 64 MiB, executed by a store whose host tier is 40 KiB: what does
    // not fit goes to the next slower tier, and the store says how much.
    let roomy = ActivationStore::new(&StoreConfig { host_bytes: 64 << 20, ..Default::default() }).unwrap();
    let p = placement(&m, None, &roomy, 0, 1.0);
    drop(roomy);
    let mut store = ActivationStore::new(&StoreConfig { host_bytes: 40 << 10, numa: Some((node, 64 << 20)), ..Default::default() }).unwrap();
    m.forward_backward_with(&batch(), None, 16, &mut store, &p).unwrap();
    let st = store.stats();
    assert!(st.spilled_bytes > 0 && st.numa_peak_bytes > 0, "{st:?}");

    // The engine refuses before the step when the tiers cannot hold the offloaded layers.
    let store = ActivationStore::new(&StoreConfig { host_bytes: 40 << 10, ..Default::default() }).unwrap();
    let section = trainer::train::recipe::OffloadSection { keep_last: 0, alpha: 1.0, lookahead: 1, ..Default::default() };
    let err = trainer::plan::engine_placement(&m, None, 16, 120, &section, &store).err().unwrap().to_string();
    assert!(err.contains("offload tiers too small") && err.contains("host 40.00 KiB") && err.contains("offload.host_bytes"), "{err}");

    // Placed in host memory, run by a store with only an NVMe tier: everything spills there.
    let mut store = ActivationStore::new(&StoreConfig { nvme: Some(nvme_config(64 << 20)), ..Default::default() }).unwrap();
    m.forward_backward_with(&batch(), None, 16, &mut store, &p).unwrap();
    let st = store.stats();
    assert!(st.spilled_bytes > 0 && st.spilled_bytes == st.written_bytes, "{st:?}");
}
