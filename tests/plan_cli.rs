//! `train plan` and the plan inside `train run`, through the real binary: the table and files,
//! a run refused before loading weights with what would fit, and a run that follows its plan.
mod common;

use common::{llama_config, tmp_dir, write_checkpoint, write_texts};
use serde_json::Value;
use tch::Kind;

fn train_env(args: &[&str], cache: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_train")).args(args).env("XDG_CACHE_HOME", cache).output().unwrap()
}

#[test]
fn plan_table_files_refusal_and_a_run_that_follows_its_plan() {
    let dir = tmp_dir("plan-cli");
    let cache = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("calibration-cache");
    let model = dir.join("base");
    let mut config = llama_config();
    config["num_hidden_layers"] = 4.into();
    write_checkpoint(&model, &config, Kind::Float, 1, 21);
    let data = dir.join("train.jsonl");
    write_texts(&data, 40, 24, 9);
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"# train run --recipe r.toml
[run]
dir = "{run}"
device = "cpu"
[model]
path = "{model}"
[data]
train = ["{data}"]
tokens_per_batch = 2048
max_tokens = 48
[train]
steps = 4
lr = 1e-3
[offload]
tiers = ["nvme"]
nvme_dir = "{nvme}"
nvme_bytes = 67108864
"#,
            run = dir.join("run").display(),
            model = model.display(),
            data = data.display(),
            nvme = dir.display()
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();

    // The table and its files.
    let out = dir.join("plan-out");
    let o = train_env(&["plan", "--recipe", r, "--device-mem", "1GiB", "--out", out.to_str().unwrap()], &cache);
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in ["weights", "optimizer", "saved", "attn_out", "[T, ", "level 1", "level 2", "lower bound", "verdict    fits", "longest    step that fits"] {
        assert!(so.contains(needle), "`{needle}` missing from:\n{so}");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    assert_eq!(json["plan"]["tokens"], 2048);
    assert!(json["inventory"]["saved"].as_array().unwrap().iter().any(|c| c["name"] == "x" && c["shape"] == "[T, 64]"), "{}", json["inventory"]["saved"]);
    let svg = std::fs::read_to_string(out.join("plan.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for needle in ["device budget 1.00 GiB", ">forward<", ">loss<", ">backward<", "device memory (", "nvme: peak", "weights/grads/optimizer"] {
        assert!(svg.contains(needle), "`{needle}` missing from plan.svg");
    }

    // A device budget below the weights: refused before loading, with what would fit.
    let o = train_env(&["run", "--recipe", r, "plan.device_memory=\"100KiB\""], &cache);
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{se}");
    assert!(se.contains("does not fit") && se.contains("device needs at least") && se.contains("longest step"), "{se}");
    assert!(!dir.join("run").join("step_00000002").exists());
    assert!(dir.join("run").join("plan.txt").exists());
    let e = train_env(&["run", "--recipe", r, "plan.device_memory=\"lots\"", "run.dir=/nonexistent/x"], &cache);
    let se = String::from_utf8_lossy(&e.stderr);
    assert!(se.contains("plan.device_memory") || se.contains("byte count"), "{se}");

    for (args, needle) in [
        (vec!["--device-mem", "12parsecs"], "--device-mem 12parsecs"),
        (vec!["--tokens", "0"], "--tokens"),
        (vec!["model.path=/nonexistent/model"], "/nonexistent/model"),
    ] {
        let mut a = vec!["plan", "--recipe", r];
        a.extend(args);
        let o = train_env(&a, &cache);
        let se = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{se}");
        assert!(se.contains(needle), "{needle}: {se}");
    }

    // A budget that holds the weights and one layer's activations: the plan offloads the rest.
    let json_plan = |budget: &str| -> Value {
        let d = dir.join(format!("p-{budget}"));
        let o = train_env(&["plan", "--recipe", r, "--device-mem", budget, "--out", d.to_str().unwrap()], &cache);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(d.join("plan.json")).unwrap()).unwrap()
    };
    let roomy = json_plan("1GiB");
    assert_eq!(roomy["plan"]["keep_last"], 4, "{}", roomy["plan"]);
    // Halfway between every layer offloaded and every layer kept.
    let least = roomy["fit"]["least_device_bytes"].as_u64().unwrap();
    let all_kept = roomy["plan"]["device_peak"].as_u64().unwrap();
    assert!(least < all_kept, "{least} {all_kept}");
    let tight_budget = (least + all_kept) / 2;
    let run2 = dir.join("run2");
    let o = train_env(&["run", "--recipe", r, &format!("run.dir={}", run2.display()), &format!("plan.device_memory={tight_budget}")], &cache);
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{se}");
    let planned: Value = serde_json::from_str(&std::fs::read_to_string(run2.join("plan.json")).unwrap()).unwrap();
    let k = planned["plan"]["keep_last"].as_u64().unwrap();
    assert!(k < 4, "a tight budget keeps fewer layers: {}", planned["plan"]);
    assert!(se.contains(&format!("plan: keep_last {k}")), "{se}");
    let last: Value = serde_json::from_str(std::fs::read_to_string(run2.join("metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    assert!(last["memory/nvme_peak_bytes"].as_f64().unwrap() > 0.0, "{last}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_8b_lora_step_plans_at_a_million_tokens_from_a_preset() {
    let cache = std::env::temp_dir().join(format!("strata-plan-8b-{}", std::process::id()));
    let out_dir = cache.join("out");
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/lora-llama3-8b-long.toml");
    let plan_for = |model: &str, device: &str, extra: &[&str]| {
        let mut a = vec!["plan", "--recipe", recipe, "--model-config", model, "--device-mem", device, "--host-mem", "100GB", "--nvme", "2TB", "--mip-seconds", "0", "--out"];
        let o = out_dir.to_string_lossy().to_string();
        a.push(&o);
        a.extend_from_slice(extra);
        let out = train_env(&a, &cache);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let plan = |extra: &[&str]| plan_for("llama-3.1-8b", "80GB", extra);
    // The plan's choice: whole-sequence blocks do not fit a million tokens, tiles do.
    let (ok, text) = plan(&["--tokens", "1048576"]);
    assert!(ok, "{text}");
    assert!(text.contains("token tiles of") && text.contains("verdict    fits"), "{text}");
    let longest: u64 = text.lines().find(|l| l.starts_with("longest")).and_then(|l| l.split("fits these budgets: ").nth(1)).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(longest >= 1 << 20, "longest {longest}: {text}");
    let (_, text) = plan(&["--tokens", "1048576", "--tile-tokens", "0"]);
    assert!(text.contains("whole-sequence blocks") && text.contains("does not fit"), "{text}");
    // A larger GPU stores more rows, up to the NVMe budget: the LP fills it by bytes, the
    // placement packs whole tensors, and the plan stores fewer rows until they pack.
    let (ok, text) = plan_for("llama-3.1-8b", "141GB", &["--tokens", "1048576"]);
    assert!(ok && text.contains("verdict    fits"), "{text}");
    // A data-parallel job: each rank holds what one process does; the node holds them all.
    let (ok, text) = plan(&["--tokens", "131072", "--nproc-per-node", "8"]);
    assert!(ok && text.contains("job        8 processes per node, data parallel") && text.contains("an optimizer step trains on 8 × 2 × 131072 = 2097152 tokens per node"), "{text}");
    // Its gradients are summed across ranks in buckets: one layer's LoRA gradients (q, k, v, o at
    // rank 16, float32: 1.62 MiB) are copied into one; a process alone sums nothing.
    let bucket = text.lines().find(|l| l.contains("all-reduce bucket: small gradients flattened")).unwrap_or_else(|| panic!("no bucket row: {text}"));
    assert!(bucket.contains("[1703936]") && bucket.ends_with("1.62 MiB"), "{bucket}");
    let (_, alone) = plan(&["--tokens", "131072"]);
    assert!(!alone.contains("all-reduce bucket"), "{alone}");
    // One sequence over 8 ranks: each plans its shard with token tiles; the exchanges, the step
    // with them and MFU are printed; 4M tokens fit 8 × 80 GB.
    let (ok, text) = plan(&["--tokens", "4194304", "--sequence-parallel", "8", "--nproc-per-node", "8"]);
    assert!(ok && text.contains("verdict    fits") && text.contains("tokens     524288 per step") && text.contains("token tiles of"), "{text}");
    assert!(text.contains("sequence   split over 8 ranks: 524288 tokens each, 4194304 in all; per layer each rank sends 8.75 GiB forward, 12.25 GiB backward"), "{text}");
    assert!(text.contains("mfu        ") && text.contains("1 data parallel × 8 sequence parallel"), "{text}");
    let longest: u64 = text.lines().find(|l| l.starts_with("longest")).and_then(|l| l.split("fits these budgets: ").nth(1)).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(longest >= 4 << 20, "longest {longest}: {text}");
    // Token sparsity: the sparse layers' attention tensors count the kept tokens only, so at α 1
    // (LoRA dropout forbids recompute) the tiers hold less; sparse layers run whole sequences.
    let nvme_gib = |text: &str| -> f64 {
        let peaks = text.lines().find(|l| l.starts_with("peaks")).unwrap_or("");
        peaks.split("nvme ").nth(1).and_then(|r| r.split(" GiB").next()).and_then(|n| n.parse().ok()).unwrap_or(f64::NAN)
    };
    let (ok, dense) = plan(&["--tokens", "131072", "--tile-tokens", "0", "lora.dropout=0.1"]);
    assert!(ok, "{dense}");
    let (ok, sparse) = plan(&["--tokens", "131072", "lora.dropout=0.1", "sparsity.layers=\"upper\"", "sparsity.keep_ratio=0.4", "sparsity.scorer=\"predictor\""]);
    // The learned scorer's weights are resident: not fitted yet, train predictor's defaults (two
    // paths of 128 × 64·128 + 128 × 128 float32 weights per sparse layer).
    let row = sparse.lines().find(|l| l.contains("predictor") && l.starts_with("weights")).unwrap_or("");
    assert!(row.contains("not fitted yet") && row.contains("[2129920]") && row.contains("float") && row.contains(" 15 ") && row.contains("121.88 MiB"), "{row}\n{sparse}");
    assert!(ok && sparse.contains("sparsity   layers [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30] keep 0.4 of each document's 64-token blocks: K = 52480 of T = 131072 tokens"), "{sparse}");
    assert!(sparse.contains("(sparse layers)") && sparse.contains("[K, 4096]") && sparse.contains("sparse_kept") && sparse.contains("whole-sequence blocks"), "{sparse}");
    assert!(nvme_gib(&sparse) < nvme_gib(&dense) - 30.0, "nvme: dense {} GiB, sparse {} GiB\n{dense}\n{sparse}", nvme_gib(&dense), nvme_gib(&sparse));
    // MLP channel sparsity (the reference's: 0.2 of the channels in every layer): the MLP's saved
    // tensors and backward gradients span 2868 of 14336 channels (its forward still holds every
    // channel until the kept columns are taken), so a whole-sequence step reaches further.
    let longest_of = |text: &str| -> u64 { text.lines().find(|l| l.starts_with("longest")).and_then(|l| l.split("fits these budgets: ").nth(1)).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0) };
    let (ok, whole) = plan(&["--tokens", "131072", "--tile-tokens", "0"]);
    assert!(ok, "{whole}");
    let (ok, ch) = plan(&["--tokens", "131072", "--tile-tokens", "0", "sparsity.keep_ratio=1.0", "sparsity.layers=[]", "sparsity.mlp_keep_ratio=0.2"]);
    assert!(ok && ch.contains("MLP channels: layers [0, 1, 2,") && ch.contains("save 0.2 of the intermediate channels"), "{ch}");
    assert!(ch.contains("gate (recomputable) (MLP-channel layers)") && ch.contains("[T, 2868]") && ch.contains("mlp_channels") && ch.contains("gate, up, act over every channel"), "{ch}");
    // (Measured: 366,592 vs 271,360 tokens; the forward's whole-width MLP tensors of one layer
    // bound it.)
    assert!(longest_of(&ch) as f64 >= 1.3 * longest_of(&whole) as f64, "longest whole-sequence step: dense {}, MLP channels {}\n{whole}\n{ch}", longest_of(&whole), longest_of(&ch));
    let (ok, text) = plan(&["--sequence-parallel", "3"]);
    assert!(!ok && text.contains("32 attention heads do not divide over 3 ranks") && !text.contains("panicked"), "{text}");
    let (ok, text) = plan_for("gpt-17", "80GB", &[]);
    assert!(!ok && text.contains("llama-3.1-8b") && !text.contains("panicked"), "{text}");
    let _ = std::fs::remove_dir_all(cache);
}
