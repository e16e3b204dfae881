//! `train run` end to end on tiny models: the loss falls; a run killed with SIGKILL and resumed
//! reproduces the uninterrupted run bit for bit; incomplete or corrupt checkpoints are skipped;
//! TensorBoard files read back; exports load in transformers / PEFT with the same loss.
mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn recipe(dir: &Path, name: &str, run: &Path, model: &Path, data: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"# test recipe
[run]
dir = "{run}"
seed = 3
device = "cpu"
dtype = "float32"

[model]
path = "{model}"

[data]
train = ["{data}"]
tokens_per_batch = 96
max_tokens = 48

[train]
steps = 40
lr = 3e-3
warmup = 3
schedule = "cosine"
min_lr_ratio = 0.1
grad_accum = 2

[checkpoint]
every = 5
keep_last = 10

[log]
every = 1
{extra}"#,
        run = run.display(),
        model = model.display(),
        data = data.display()
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}


fn run_ok(args: &[&str]) -> (String, String) {
    let out = train(args);
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "train {args:?} failed:\n{se}");
    (so, se)
}

#[test]
fn full_finetune_loss_falls_and_resume_after_sigkill_is_bit_identical() {
    let dir = tmp_dir("run-full");
    let (model, data) = tiny_llama_and_texts(&dir);
    let a = dir.join("a");
    let ra = recipe(&dir, "a.toml", &a, &model, &data, "");
    let (stdout, _) = run_ok(&["run", "--recipe", ra.to_str().unwrap()]);
    assert!(stdout.contains("done: 40 steps"), "{stdout}");
    let la = losses_by_step(&a);
    assert_eq!(la.len(), 40);
    let first: f64 = (1..=3).map(|s| la[&s]).sum::<f64>() / 3.0;
    let last: f64 = (38..=40).map(|s| la[&s]).sum::<f64>() / 3.0;
    println!("loss: first steps {first:.4}, last steps {last:.4}");
    assert!(last < 0.7 * first, "the loss did not fall: {first} -> {last}");
    assert!(a.join("recipe.toml").exists() && a.join("final/model.safetensors").exists());

    // Kill a second run mid-way with SIGKILL, then resume it.
    let b = dir.join("b");
    let rb = recipe(&dir, "b.toml", &b, &model, &data, "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_train")).args(["run", "--recipe", rb.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while losses_by_step(&b).keys().max().copied().unwrap_or(0) < 12 {
        assert!(t0.elapsed() < Duration::from_secs(120), "run b made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = losses_by_step(&b).keys().max().copied().unwrap();
    assert!(reached < 40, "the run finished before it could be killed (reached {reached})");
    let (_, stderr) = run_ok(&["run", "--recipe", rb.to_str().unwrap(), "--resume"]);
    assert!(stderr.contains("resuming from"), "{stderr}");
    let lb = losses_by_step(&b);
    assert_eq!(lb.len(), 40);
    for (s, l) in &la {
        assert_eq!(l.to_bits(), lb[s].to_bits(), "step {s}: uninterrupted {l} vs resumed {}", lb[s]);
    }
    let wa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ after kill + resume");
    println!("killed at step {reached}, resumed: all 40 losses and the final weights are bit-identical");

    // The newest checkpoint incomplete and the one before corrupt: both skipped, with a warning.
    std::fs::remove_file(a.join("step_00000040/DONE")).unwrap();
    let opt = a.join("step_00000035/optimizer.safetensors");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&opt).unwrap().set_len(len / 3).unwrap();
    let (_, stderr) = run_ok(&["run", "--recipe", ra.to_str().unwrap(), "--resume", "train.steps=42"]);
    assert!(stderr.contains("skipping checkpoint") && stderr.contains("step_00000040") && stderr.contains("no DONE"), "{stderr}");
    assert!(stderr.contains("step_00000035") && stderr.contains("truncated"), "{stderr}");
    assert!(stderr.contains("resuming from") && stderr.contains("step_00000030"), "{stderr}");

    // TensorBoard: read back by tensorboard's own EventAccumulator.
    let py = venv_python();
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new(&py).arg("-c").arg(script).arg(b.join("tb")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tb: Value = serde_json::from_slice(&out.stdout).unwrap();
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "memory/activations_bytes", "memory/host_peak_rss_bytes"] {
        assert!(tb.get(tag).is_some(), "tag {tag} missing from {:?}", tb.as_object().map(|o| o.keys().collect::<Vec<_>>()));
    }
    let tb_loss: std::collections::BTreeMap<i64, f64> =
        tb["train/loss"].as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap())).collect();
    for (s, l) in &lb {
        assert!((tb_loss[s] - l).abs() <= 1e-6 * l.abs(), "step {s}: tensorboard {} vs {l}", tb_loss[s]);
    }

    // The exported HF folder loads in transformers with the loss strata computes for it.
    let out = train(&["eval", "--model", a.join("final").to_str().unwrap(), "--data", data.to_str().unwrap(), "--device", "cpu", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
    let out = Command::new(&py).arg(&script).arg(a.join("final")).arg(&data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hf: Value = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let (x, y) = (ours["loss"].as_f64().unwrap(), hf["loss"].as_f64().unwrap());
    assert!((x - y).abs() < 1e-5 * y, "exported model: strata {x} vs transformers {y}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn nvme_offload_run_matches_the_resident_run_bit_for_bit() {
    let dir = tmp_dir("run-offload");
    let (model, data) = tiny_llama_and_texts(&dir);
    let base = recipe(&dir, "r.toml", &dir.join("unused"), &model, &data, "");
    let r = base.to_str().unwrap();
    let resident = dir.join("resident");
    let nvme = dir.join("nvme");
    run_ok(&["run", "--recipe", r, &format!("run.dir={}", resident.display()), "train.steps=6"]);
    let (_, _) = run_ok(&[
        "run", "--recipe", r, &format!("run.dir={}", nvme.display()), "train.steps=6",
        "offload.tiers=[\"nvme\"]", &format!("offload.nvme_dir={}", dir.display()), "offload.nvme_bytes=67108864", "offload.keep_last=1",
    ]);
    let split = dir.join("alpha");
    run_ok(&[
        "run", "--recipe", r, &format!("run.dir={}", split.display()), "train.steps=6",
        // Host and NUMA budgets smaller than a layer: the last layer fills host memory and
        // spills to NUMA, the first continues there and spills to NVMe.
        "offload.tiers=[\"host\",\"numa\",\"nvme\"]", "offload.host_bytes=60000", "offload.numa_bytes=60000",
        &format!("offload.nvme_dir={}", dir.display()), "offload.nvme_bytes=67108864", "offload.alpha=0.3",
    ]);
    let (a, b, c) = (losses_by_step(&resident), losses_by_step(&nvme), losses_by_step(&split));
    assert_eq!(a.len(), 6);
    for (s, l) in &a {
        assert_eq!(l.to_bits(), b[s].to_bits(), "step {s}");
        assert_eq!(l.to_bits(), c[s].to_bits(), "step {s}, alpha 0.3");
    }
    let last: Value = serde_json::from_str(std::fs::read_to_string(nvme.join("metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    assert!(last["offload/written_bytes"].as_f64().unwrap() > 0.0, "{last}");
    assert_eq!(last["offload/written_bytes"], last["offload/read_bytes"]);
    let mixed: Value = serde_json::from_str(std::fs::read_to_string(split.join("metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    for tier in ["host", "numa", "nvme"] {
        assert!(mixed[format!("memory/{tier}_peak_bytes")].as_f64().unwrap() > 0.0, "{tier}: {mixed}");
    }
    let e = train(&["run", "--recipe", r, &format!("run.dir={}", dir.join("x").display()), "offload.tiers=[\"nvme\"]", "offload.nvme_bytes=4096", &format!("offload.nvme_dir={}", dir.display())]);
    let se = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(1), "{se}");
    assert!(se.contains("offload tiers too small") && se.contains("nvme 4.00 KiB") && se.contains("offload.nvme_bytes"), "{se}");
    let e = train(&["run", "--recipe", r, &format!("run.dir={}", dir.join("y").display()), "offload.tiers=[\"numa\"]", "offload.numa_bytes=1048576", "offload.numa_node=77"]);
    let se = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(1), "{se}");
    assert!(se.contains("numa node 77") && se.contains("this machine has nodes"), "{se}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tiled_runs_match_the_whole_sequence_run() {
    let dir = tmp_dir("run-tiled");
    let (model, data) = tiny_llama_and_texts(&dir);
    let extra = "\n[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n";
    let base = recipe(&dir, "r.toml", &dir.join("unused"), &model, &data, extra);
    let r = base.to_str().unwrap();
    let run = |name: &str, args: &[&str]| {
        let out = dir.join(name);
        let mut a = vec!["run", "--recipe", r, "train.steps=6"];
        let d = format!("run.dir={}", out.display());
        a.push(&d);
        a.extend_from_slice(args);
        run_ok(&a);
        losses_by_step(&out)
    };
    for mode in ["full", "lora"] {
        let m = format!("train.mode={mode}");
        let whole = run(&format!("{mode}-whole"), &[&m]);
        // Tiles of 7 tokens: not a divisor of the 48-token documents, so every document ends in a
        // shorter tile.
        let tiled = run(&format!("{mode}-tiled"), &[&m, "compute.tile_tokens=7"]);
        let nvme_dir = format!("offload.nvme_dir={}", dir.display());
        // Offloaded with α = 0.3 (under LoRA dropout too: tiles keep the masks).
        let split = run(&format!("{mode}-tiled-nvme"), &[&m, "compute.tile_tokens=7", "offload.tiers=[\"nvme\"]", &nvme_dir, "offload.nvme_bytes=67108864", "offload.alpha=0.3"]);
        assert_eq!(whole.len(), 6);
        for (s, l) in &whole {
            assert!((l - tiled[s]).abs() <= 1e-5 * l, "{mode} step {s}: whole {l} vs tiled {}", tiled[s]);
            assert_eq!(tiled[s].to_bits(), split[s].to_bits(), "{mode} step {s}: offloaded tiles");
        }
    }
    let e = train(&["run", "--recipe", r, &format!("run.dir={}", dir.join("bad").display()), "compute.tile_tokens=-3"]);
    let se = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(1), "{se}");
    assert!(se.contains("tile_tokens") && !se.contains("panicked"), "{se}");
    let e = train(&["run", "--recipe", r, &format!("run.dir={}", dir.join("huge").display()), "compute.tile_tokens=18446744073709551615"]);
    let se = String::from_utf8_lossy(&e.stderr);
    assert!(e.status.code() == Some(1) && se.contains("compute.tile_tokens") && !se.contains("panicked"), "{se}");
    let e = train(&["run", "--recipe", r, &format!("run.dir={}", dir.join("bad2").display()), "compute.tile=8"]);
    let se = String::from_utf8_lossy(&e.stderr);
    assert!(e.status.code() == Some(1) && se.contains("tile"), "{se}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `[sparsity]` from the CLI: a sparse run trains and reports each sparse layer's kept fraction;
/// keeping every block is the dense run bit for bit; bad settings are errors naming the key.
#[test]
fn sparse_runs_report_what_they_keep_and_refuse_bad_settings() {
    let dir = tmp_dir("run-sparse");
    let (model, data) = tiny_llama_and_texts(&dir);
    let sparse = "\n[sparsity]\nblock_size = 8\nkeep_ratio = 0.5\nlayers = [1]\nscorer = \"exact\"\n";
    let r_dense = recipe(&dir, "dense.toml", &dir.join("unused"), &model, &data, "");
    let r_sparse = recipe(&dir, "sparse.toml", &dir.join("unused"), &model, &data, sparse);
    let run = |r: &Path, name: &str, args: &[&str]| {
        let out = dir.join(name);
        let mut a = vec!["run", "--recipe", r.to_str().unwrap(), "train.steps=6"];
        let d = format!("run.dir={}", out.display());
        a.push(&d);
        a.extend_from_slice(args);
        run_ok(&a);
        out
    };
    let dense = losses_by_step(&run(&r_dense, "dense", &[]));
    let out = run(&r_sparse, "sparse", &[]);
    let sparse_losses = losses_by_step(&out);
    assert_eq!(sparse_losses.len(), 6);
    assert!(sparse_losses.values().all(|l| l.is_finite()) && sparse_losses != dense, "{sparse_losses:?} vs {dense:?}");
    let last: Value = serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("train/loss")).last().unwrap()).unwrap();
    let f = last["sparsity/kept_fraction_layer1"].as_f64().unwrap();
    assert!(f > 0.3 && f < 0.8, "kept fraction {f}: {last}");
    assert!(last.get("sparsity/kept_fraction_layer0").is_none(), "{last}");
    let all = losses_by_step(&run(&r_sparse, "keep-all", &["sparsity.keep_ratio=1.0", "sparsity.scorer=\"pooled\""]));
    for (s, l) in &dense {
        assert_eq!(l.to_bits(), all[s].to_bits(), "step {s}: keeping every block vs dense");
    }
    // Sparse layers offloaded (every layer to host then NVMe, 30% of the recomputable rows stored:
    // a sparse layer rebuilds its MLP's from the stored residual) train as resident ones, bit for bit.
    let nvme_dir = format!("offload.nvme_dir={}", dir.display());
    let off_dir = run(&r_sparse, "sparse-offloaded", &["offload.tiers=[\"host\",\"nvme\"]", "offload.host_bytes=60000", &nvme_dir, "offload.nvme_bytes=67108864", "offload.keep_last=0", "offload.alpha=0.3"]);
    let offloaded = losses_by_step(&off_dir);
    for (s, l) in &sparse_losses {
        assert_eq!(l.to_bits(), offloaded[s].to_bits(), "step {s}: offloaded sparse vs resident sparse");
    }
    let moved: Value = serde_json::from_str(std::fs::read_to_string(off_dir.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("train/loss")).last().unwrap()).unwrap();
    assert!(moved["offload/written_bytes"].as_f64().unwrap() > 0.0, "{moved}");
    // MLP channel sparsity from the recipe: an approximate gradient (other losses from step 2 on),
    // and offloaded at α 0.3 (the recompute keeps the forward's channels) bit-identical to resident.
    let channels = losses_by_step(&run(&r_sparse, "channels", &["sparsity.mlp_keep_ratio=0.5"]));
    assert!(channels.len() == 6 && channels.values().all(|l| l.is_finite()) && channels != sparse_losses, "{channels:?}");
    let channels_off = losses_by_step(&run(&r_sparse, "channels-offloaded", &["sparsity.mlp_keep_ratio=0.5", "offload.tiers=[\"host\",\"nvme\"]", "offload.host_bytes=60000", &nvme_dir, "offload.nvme_bytes=67108864", "offload.keep_last=0", "offload.alpha=0.3"]));
    for (s, l) in &channels {
        assert_eq!(l.to_bits(), channels_off[s].to_bits(), "step {s}: offloaded MLP channels vs resident");
    }
    // A dense warm-up: the first 3 steps are the dense run's, bit for bit, then sparse layers start.
    let warm = losses_by_step(&run(&r_sparse, "warm-up", &["sparsity.start_step=3"]));
    let steps: Vec<_> = dense.keys().copied().collect();
    for s in &steps[..3] {
        assert_eq!(dense[s].to_bits(), warm[s].to_bits(), "step {s}: dense warm-up");
    }
    assert_ne!(dense[&steps[3]].to_bits(), warm[&steps[3]].to_bits(), "step {}: sparse after the warm-up", steps[3]);
    for (args, says) in [
        (vec!["sparsity.mlp_keep_ratio=0"], "`sparsity.mlp_keep_ratio`: 0 must lie in (0, 1]"),
        (vec!["sparsity.mlp_layers=[7]"], "`sparsity.mlp_layers`: layer 7 is out of range"),
        (vec!["sparsity.mlp_keep_ratio=0.5", "train.mode=\"lora\"", "lora.rank=4", "lora.alpha=8.0", "lora.targets=[\"q_proj\", \"down_proj\"]"], "`sparsity.mlp_keep_ratio`: MLP channel sparsity with a LoRA adapter on `down_proj`"),
        (vec!["sparsity.keep_ratio=0"], "`sparsity.keep_ratio`: 0 must lie in (0, 1]"),
        (vec!["sparsity.keep_ratio=1.5"], "`sparsity.keep_ratio`: 1.5 must lie in (0, 1]"),
        (vec!["sparsity.block_size=0"], "`sparsity.block_size`: 0 must be positive"),
        (vec!["sparsity.layers=[5]"], "`sparsity.layers`: layer 5 is out of range: the model has 2 layers"),
        (vec!["sparsity.layers=\"lower\""], "`sparsity.layers`: \"lower\": expected \"upper\""),
        (vec!["sparsity.scorer=\"magic\""], "sparsity.scorer"),
        (vec!["compute.tile_tokens=7"], "`sparsity`: with compute.tile_tokens"),
    ] {
        let mut a = vec!["run", "--recipe", r_sparse.to_str().unwrap()];
        let d = format!("run.dir={}", dir.join("bad").display());
        a.push(&d);
        a.extend(args.iter().copied());
        let e = train(&a);
        let se = String::from_utf8_lossy(&e.stderr);
        assert!(e.status.code() == Some(1) && se.contains(says) && !se.contains("panicked"), "{args:?}: {se}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn train_predictor_fits_the_scorer_that_train_run_reads() {
    let dir = tmp_dir("run-predictor");
    let (model, data) = tiny_llama_and_texts(&dir);
    let file = dir.join("fitted").join("p.safetensors");
    let sparse = format!("\n[sparsity]\nblock_size = 8\nkeep_ratio = 0.5\nlayers = [1]\nscorer = \"predictor\"\npredictor = \"{}\"\nrecall_every = 2\n", file.display());
    let r = recipe(&dir, "sparse.toml", &dir.join("unused"), &model, &data, &sparse);
    let r_dense = recipe(&dir, "dense.toml", &dir.join("unused"), &model, &data, "");
    let fails = |args: &[&str], says: &[&str]| {
        let e = train(args);
        let se = String::from_utf8_lossy(&e.stderr);
        assert!(e.status.code() == Some(1) && says.iter().all(|s| se.contains(s)) && !se.contains("panicked"), "{args:?}: {se}");
    };
    let run_dir = format!("run.dir={}", dir.join("sparse").display());
    // Before the fit: the run names the key, the file and the command that makes it.
    fails(&["run", "--recipe", r.to_str().unwrap(), &run_dir], &["`sparsity.predictor`", "p.safetensors", "train predictor"]);
    fails(&["predictor", "--recipe", r_dense.to_str().unwrap()], &["no [sparsity] section"]);
    let (out, _) = run_ok(&["predictor", "--recipe", r.to_str().unwrap(), "--steps", "60", "--held-out", "4", "--lr", "3e-4"]);
    assert!(file.exists(), "{out}");
    // "held-out loss: A unfitted -> B fitted": the fit lowers the objective on batches it did not see.
    let held: Vec<f64> = out.lines().find(|l| l.starts_with("held-out loss: ")).map(|l| l.split_whitespace().filter_map(|x| x.parse().ok()).collect()).unwrap_or_default();
    assert!(held.len() == 2 && held[1] < held[0], "{out}");
    let recall: f64 = out.lines().find(|l| l.trim().starts_with("layer 1: predictor")).and_then(|l| l.split_whitespace().nth(3)).and_then(|x| x.parse().ok()).unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&recall), "{out}");
    run_ok(&["run", "--recipe", r.to_str().unwrap(), &run_dir, "train.steps=6"]);
    let records: Vec<Value> = std::fs::read_to_string(dir.join("sparse").join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("train/loss")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 6);
    for r in &records {
        // Steps 1, 3, 5 (0-based 0, 2, 4: every recall_every = 2 from step 0) measure recall.
        let step = r["step"].as_i64().unwrap();
        match r.get("sparsity/predictor_recall_layer1").and_then(|v| v.as_f64()) {
            Some(x) => assert!(step % 2 == 1 && (0.0..=1.0).contains(&x), "{r}"),
            None => assert!(step % 2 == 0, "step {step} should measure recall: {r}"),
        }
        assert!(r["sparsity/kept_fraction_layer1"].as_f64().unwrap() < 1.0, "{r}");
    }
    // The file serves its own layers and blocks only.
    let run_dir = format!("run.dir={}", dir.join("bad").display());
    fails(&["run", "--recipe", r.to_str().unwrap(), &run_dir, "sparsity.layers=[0]"], &["`sparsity.predictor`", "no predictor for sparse layer 0"]);
    fails(&["run", "--recipe", r.to_str().unwrap(), &run_dir, "sparsity.block_size=4"], &["`sparsity.predictor`", "blocks of 8 tokens, not sparsity.block_size = 4"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lora_run_exports_a_peft_adapter() {
    let dir = tmp_dir("run-lora");
    let (model, data) = tiny_llama_and_texts(&dir);
    let run = dir.join("lora");
    let extra = "\n[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
    let r = recipe(&dir, "lora.toml", &run, &model, &data, extra);
    let (stdout, _) = run_ok(&["run", "--recipe", r.to_str().unwrap(), "train.mode=lora", "train.steps=12", "train.lr=1e-2", "checkpoint.keep_last=2"]);
    assert!(stdout.contains("done: 12 steps"), "{stdout}");
    let kept: Vec<String> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.starts_with("step_")).collect();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, vec!["step_00000010", "step_00000012"], "keep_last = 2");
    let l = losses_by_step(&run);
    assert!(l[&12] < l[&1], "LoRA loss did not fall: {} -> {}", l[&1], l[&12]);
    let ck = run.join("step_00000010");
    assert!(ck.join("adapter_model.safetensors").exists() && !ck.join("model.safetensors").exists(), "a LoRA checkpoint holds only adapters");
    let fin = run.join("final");
    let out = train(&["eval", "--model", model.to_str().unwrap(), "--adapter", fin.to_str().unwrap(), "--data", data.to_str().unwrap(), "--device", "cpu", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    let base = train(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--device", "cpu", "--json"]);
    let base: Value = serde_json::from_slice(&base.stdout).unwrap();
    assert!(ours["loss"].as_f64().unwrap() < base["loss"].as_f64().unwrap(), "the adapter must lower the loss");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
    let out = Command::new(venv_python()).arg(&script).arg(&model).arg(&data).arg("--adapter").arg(&fin).output().unwrap();
    assert!(out.status.success(), "peft: {}", String::from_utf8_lossy(&out.stderr));
    let peft: Value = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let (x, y) = (ours["loss"].as_f64().unwrap(), peft["loss"].as_f64().unwrap());
    println!("base {} / with adapter: strata {x} PEFT {y}", base["loss"]);
    assert!((x - y).abs() < 1e-5 * y, "adapter: strata {x} vs PEFT {y}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_recipes_and_existing_runs_give_clear_errors() {
    let dir = tmp_dir("run-bad");
    let (model, data) = tiny_llama_and_texts(&dir);
    let run = dir.join("r");
    let good = recipe(&dir, "good.toml", &run, &model, &data, "");
    let err = |args: &[&str]| -> String {
        let out = train(args);
        let se = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {se}");
        assert!(!se.contains("panicked"), "{se}");
        se
    };
    let text = std::fs::read_to_string(&good).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, text.replace("lr = 3e-3", "lr = 3e-3\nlearning_rate = 1")).unwrap();
    let e = err(&["run", "--recipe", bad.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("learning_rate") && e.contains("line"), "{e}");
    std::fs::write(&bad, text.replace("steps = 40", "steps = \"many\"")).unwrap();
    let e = err(&["run", "--recipe", bad.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("steps"), "{e}");
    let g = good.to_str().unwrap();
    let e = err(&["run", "--recipe", g, "train.mode=lora"]);
    assert!(e.contains("[lora]"), "{e}");
    let e = err(&["run", "--recipe", g, "train.lr=-1"]);
    assert!(e.contains("lr"), "{e}");
    let e = err(&["run", "--recipe", g, "train.nope=1"]);
    assert!(e.contains("nope"), "{e}");
    let e = err(&["run", "--recipe", g, "offload.alpha=1.5"]);
    assert!(e.contains("offload.alpha"), "{e}");
    let e = err(&["run", "--recipe", g, "offload.tiers=[\"ram\"]"]);
    assert!(e.contains("offload.tiers") && e.contains("ram"), "{e}");
    let e = err(&["run", "--recipe", g, "offload.tiers=[\"host\"]"]);
    assert!(e.contains("offload.host_bytes"), "{e}");
    let e = err(&["run", "--recipe", g, "trainlr"]);
    assert!(e.contains("key.path=value"), "{e}");
    let e = err(&["run", "--recipe", g, "data.train=[\"missing.jsonl\"]"]);
    assert!(e.contains("missing.jsonl"), "{e}");
    let e = err(&["run", "--recipe", g, &format!("model.path={}", dir.join("nomodel").display())]);
    assert!(e.contains("nomodel") && e.contains("config.json"), "{e}");
    let badline = dir.join("badline.jsonl");
    std::fs::write(&badline, "{\"text\": \"w3 w4\"}\n{\"text\": \"w5\" \n").unwrap();
    let e = err(&["run", "--recipe", g, &format!("data.train=[\"{}\"]", badline.display())]);
    assert!(e.contains("badline.jsonl:2"), "{e}");
    let e = err(&["run", "--recipe", dir.join("none.toml").to_str().unwrap()]);
    assert!(e.contains("none.toml"), "{e}");

    // A finished run is never overwritten without --resume.
    run_ok(&["run", "--recipe", g, "train.steps=5"]);
    let before = std::fs::read(run.join("step_00000005/model.safetensors")).unwrap();
    let e = err(&["run", "--recipe", g, "train.steps=5"]);
    assert!(e.contains("--resume") && e.contains("nothing was overwritten"), "{e}");
    assert_eq!(before, std::fs::read(run.join("step_00000005/model.safetensors")).unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn data_synth_writes_prompt_completion_lines() {
    let dir = tmp_dir("synth");
    for task in ["passkey", "kv-recall"] {
        let out = dir.join(format!("{task}.jsonl"));
        let (stdout, _) = run_ok(&["data", "synth", "--task", task, "--tokens", "300", "--samples", "3", "--depth", "0.5", "--out", out.to_str().unwrap()]);
        assert!(stdout.contains("wrote 3"), "{stdout}");
        let lines: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        for l in &lines {
            let (p, c) = (l["prompt"].as_str().unwrap(), l["completion"].as_str().unwrap());
            assert!(p.contains(c) && c.split(' ').count() == 5);
        }
    }
    let out = train(&["data", "synth", "--task", "haystack", "--tokens", "300", "--out", dir.join("x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--task haystack"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn shipped_recipes_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some("toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.lines().any(|l| l.trim_start().starts_with("#") && l.contains("train run --recipe")), "{}: must start with the command that runs it", p.display());
            trainer::train::recipe::Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "expected the demo, LoRA and full recipes");
}
