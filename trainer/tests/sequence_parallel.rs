//! Sequence parallelism (`dist.sequence_parallel`, DeepSpeed-Ulysses): one sequence split over P
//! ranks gives the loss and gradients of one process on the whole sequence (float64, within
//! 1e-12 relative; the ranks' gradients summed as the all-reduce sums them), for P = 2 and 4,
//! GQA whose KV heads are repeated to divide, MHA with biases, a sliding window, packed
//! documents whose boundaries fall inside and across shards, lengths that do not divide by P,
//! LoRA and full fine-tuning, whole blocks and token tiles (two passes around a whole attention
//! backward), and offloaded (host, NVMe; MEMO's α) as well as resident, offloaded bit-identical
//! to resident. Each rank's saved bytes and per-tier bytes equal what its plan predicts.
//!
//! The ranks are threads of this process, each with its own Gloo process group over a TCPStore
//! on 127.0.0.1 (the multi-process runs through torchrun are in tests/multi_process.rs).
use std::sync::Arc;
use std::time::Duration;

use offload::store::{ActivationStore, NvmeConfig, StoreConfig};
use planner::placement::{from_inventory, Placement};
mod common;
use common::{batch, GQA, MHA_QWEN, WINDOW};
use tch::{Device, Kind};
use trainer::model::config::ModelConfig;
use trainer::model::lora::LoraConfig;
use trainer::model::seq::SeqParallel;
use trainer::model::{Batch, Grads, Model};


/// libtorch's generator is global and the tests of a file run on parallel threads: each test
/// holds this throughout (its models are seeded draws, and a step elsewhere may draw too); a
/// test's ranks get their models before any of them starts.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(config: &str, lora: Option<&LoraConfig>) -> Model {
    let cfg = ModelConfig::parse(config, std::path::Path::new("config.json")).unwrap().0;
    let mut m = Model::init_random(cfg, 0.2, Kind::Double, Device::Cpu, 11).unwrap();
    if let Some(l) = lora {
        m.attach_lora(l, 3).unwrap();
        // Non-zero B, so every adapter's gradient path carries signal.
        tch::manual_seed(4);
        for (_, t) in m.named_adapters() {
            let _ = t.shallow_clone().uniform_(-0.3, 0.3);
        }
    }
    m
}


fn lora() -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec() }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rank `rank` of `p` joining a Gloo group through the store on `port`.
fn group(rank: usize, p: usize, port: u16) -> Arc<SeqParallel> {
    let timeout = Duration::from_secs(60);
    let store = Arc::new(dist::Store::tcp("127.0.0.1", port, rank == 0, timeout, "/sp-test/").unwrap());
    Arc::new(SeqParallel::new(Arc::new(dist::ProcessGroup::gloo(store, rank, p, timeout).unwrap()), Device::Cpu))
}

/// How a rank's activations wait between forward and backward.
#[derive(Clone, Copy, Debug)]
enum Offload {
    Resident,
    /// Host then NVMe (a small host budget so both are used), every layer offloaded, MEMO's α.
    HostNvme(f64),
}

struct RankResult {
    loss: f64,
    count: i64,
    grads: Grads,
    saved_bytes: usize,
}

fn nvme(rank: usize) -> NvmeConfig {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sequence_parallel");
    std::fs::create_dir_all(&dir).unwrap();
    NvmeConfig { dir, bytes: 64 << 20, rank, io_uring: true }
}

/// One rank's step on its shard of `b`; checks that the store held what the plan predicted.
fn rank_step(mut m: Model, lora: Option<&LoraConfig>, b: &Batch, g: Arc<SeqParallel>, how: Offload, tile: Option<i64>) -> RankResult {
    m.seq = Some(g.clone());
    m.tile_tokens = tile;
    let shard = g.shard(b.ids.size()[0]);
    let inv = trainer::plan::inventory::of_model(&m, lora, 16).unwrap();
    let (mut store, placement) = match how {
        Offload::Resident => (ActivationStore::resident(), Placement::resident(m.layers.len(), shard.tokens as u64)),
        Offload::HostNvme(alpha) => {
            let store = ActivationStore::new(&StoreConfig { host_bytes: 96 << 10, nvme: Some(nvme(g.rank)), max_inflight: 64 << 10, ..Default::default() }).unwrap();
            let p = from_inventory(&inv, shard.tokens as u64, 0, alpha, 1, &store.capacities());
            assert_eq!(p.overflow_bytes, 0);
            (store, p)
        }
    };
    let (loss, grads, stats) = m.forward_backward_with(b, None, 16, &mut store, &placement).unwrap();
    assert!(store.is_empty());
    if let Offload::HostNvme(alpha) = how {
        for l in 0..m.layers.len() {
            assert_eq!(store.placed_bytes(l), placement.tier_bytes(l), "rank {} alpha {alpha}: layer {l}'s tier bytes", g.rank);
        }
    }
    // Whole blocks save every row (the store keeps its share), tiles the stored rows only: the
    // plan's per-token bytes times the shard's rows.
    let t = shard.tokens as u64;
    let predicted: u64 = (0..m.layers.len())
        .map(|l| {
            let rows = if tile.is_some() { planner::inventory::stored_rows(placement.alpha(l), t as i64) as u64 } else { t };
            let (whole, rec) = inv.layer_saved(l, t, rows);
            whole + rec
        })
        .sum();
    assert_eq!(stats.saved_bytes as u64, predicted, "rank {}: saved bytes", g.rank);
    RankResult { loss: loss.sum.double_value(&[]), count: loss.count, grads, saved_bytes: stats.saved_bytes }
}

/// The step over `p` rank threads.
/// The step over `p` rank threads, of the documents of lengths `lens` ([`batch`]: tensors are not
/// shared between threads, each rank builds the batch).
fn sharded(config: &str, lora: Option<&LoraConfig>, lens: &[i64], p: usize, how: Offload, tile: Option<i64>) -> Vec<RankResult> {
    on_ranks(config, lora, p, |m, g| rank_step(m, lora, &batch(lens), g, how, tile))
}

/// `f` on `p` rank threads, each with its model (built before any starts) and its group.
fn on_ranks<R: Send>(config: &str, lora: Option<&LoraConfig>, p: usize, f: impl Fn(Model, Arc<SeqParallel>) -> R + Sync) -> Vec<R> {
    let port = free_port();
    let models: Vec<Model> = (0..p).map(|_| model(config, lora)).collect();
    let f = &f;
    std::thread::scope(|s| {
        let ranks: Vec<_> = models.into_iter().enumerate().map(|(r, m)| s.spawn(move || f(m, group(r, p, port)))).collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_matches(tag: &str, whole: &(f64, i64, Grads), ranks: &[RankResult]) {
    let (l0, c0, g0) = whole;
    let loss: f64 = ranks.iter().map(|r| r.loss).sum();
    let count: i64 = ranks.iter().map(|r| r.count).sum();
    assert_eq!(count, *c0, "{tag}: counted tokens");
    assert!((l0 - loss).abs() <= 1e-12 * l0.abs(), "{tag}: loss {l0} vs {loss}");
    for r in ranks {
        assert_eq!(g0.keys().collect::<Vec<_>>(), r.grads.keys().collect::<Vec<_>>(), "{tag}");
    }
    for (n, a) in g0 {
        let sum = ranks.iter().map(|r| r.grads[n].shallow_clone()).reduce(|x, y| x + y).unwrap();
        let scale = a.abs().max().double_value(&[]).max(1e-30);
        let diff = (a - &sum).abs().max().double_value(&[]);
        assert!(diff <= 1e-12 * scale, "{tag}: gradient of {n} differs by {diff} (max {scale})");
    }
}

#[test]
fn one_sequence_over_ranks_equals_one_process() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let cases: [(&str, &str, &[i64], bool, usize); 6] = [
        ("gqa, boundaries inside and across shards, full", GQA, &[40, 17, 43], false, 2),
        ("gqa, kv heads repeated, not divisible by P, lora", GQA, &[3, 60, 38], true, 4),
        ("mha qwen2 (biases), tied, odd length, full", MHA_QWEN, &[30, 31], false, 2),
        ("mha qwen2, P = 4, lora", MHA_QWEN, &[61], true, 4),
        ("mistral sliding window, one kv head over 4, full", WINDOW, &[45, 20], false, 4),
        ("mistral sliding window over 2, lora, a document per shard", WINDOW, &[32, 32], true, 2),
    ];
    for (tag, cfg, lens, with_lora, p) in cases {
        let l = with_lora.then(lora);
        let b = batch(lens);
        let m = model(cfg, l.as_ref());
        let (loss, grads, _) = m.forward_backward(&b, None, 16).unwrap();
        let whole = (loss.sum.double_value(&[]), loss.count, grads);
        for tile in [None, Some(7), Some(1000)] {
            let ranks = sharded(cfg, l.as_ref(), lens, p, Offload::Resident, tile);
            assert_matches(&format!("{tag} (P = {p}, tiles {tile:?})"), &whole, &ranks);
        }
    }
}

#[test]
fn offloaded_shards_equal_one_process() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    for (with_lora, alpha, tile) in [(false, 1.0, None), (false, 0.4, None), (true, 0.0, None), (false, 1.0, Some(8)), (false, 0.3, Some(8)), (true, 0.0, Some(5))] {
        let l = with_lora.then(lora);
        let lens = [40, 17, 44];
        let b = batch(&lens);
        let m = model(GQA, l.as_ref());
        let (loss, grads, _) = m.forward_backward(&b, None, 16).unwrap();
        let whole = (loss.sum.double_value(&[]), loss.count, grads);
        let resident = sharded(GQA, l.as_ref(), &lens, 2, Offload::Resident, tile);
        let offloaded = sharded(GQA, l.as_ref(), &lens, 2, Offload::HostNvme(alpha), tile);
        let tag = format!("lora {with_lora}, alpha {alpha}, tiles {tile:?}");
        assert_matches(&tag, &whole, &offloaded);
        for (r, o) in resident.iter().zip(&offloaded) {
            assert_eq!(r.loss.to_bits(), o.loss.to_bits(), "{tag}: offloaded loss of a rank");
            for (n, g) in &r.grads {
                assert!(g.equal(&o.grads[n]), "{tag}: offloaded gradient of {n} is not bit-identical to resident");
            }
        }
    }
}

#[test]
fn sharded_evaluation_equals_one_process() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // Every rank of the group gets the whole sequence's loss and every position's prediction.
    for (cfg, lens, p, tile) in [(GQA, &[3, 60, 38][..], 4, None), (WINDOW, &[45, 20][..], 2, Some(8))] {
        let b = batch(lens);
        let (loss, argmax) = model(cfg, None).loss_and_argmax(&b, 16).unwrap();
        let ranks = on_ranks(cfg, None, p, |mut m, g| {
            m.seq = Some(g);
            m.tile_tokens = tile;
            let (l, a) = m.loss_and_argmax(&batch(lens), 16).unwrap();
            (l.sum.double_value(&[]), l.count, a)
        });
        let whole = loss.sum.double_value(&[]);
        for (l, count, a) in ranks {
            assert!((l - whole).abs() <= 1e-12 * whole.abs() && count == loss.count, "loss {l} ({count} tokens) vs {whole} ({})", loss.count);
            assert!(a.equal(&argmax), "predictions differ from one process's");
        }
    }
}

#[test]
fn each_rank_saves_its_share() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    // MHA over 2 ranks: every saved tensor is per local token what it is per token whole, so a
    // rank saves half of what one process saves (the padding aside: 62 tokens, 31 each).
    let b = batch(&[62]);
    let m = model(MHA_QWEN, None);
    let (_, _, whole) = m.forward_backward(&b, None, 16).unwrap();
    let ranks = sharded(MHA_QWEN, None, &[62], 2, Offload::Resident, None);
    for r in &ranks {
        assert_eq!(2 * r.saved_bytes, whole.saved_bytes);
    }
}
