//! Bad input reaches the user as one clear error line naming the file / key / tensor / line,
//! with exit status 1 — never a panic (status 101) or a silent result.
mod common;
use std::path::Path;

use common::*;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn eval_err(model: &Path, data: &Path, extra: &[&str]) -> String {
    let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    if !extra.contains(&"--device") {
        args.extend_from_slice(&["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    let out = train(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected a clean error, got {:?}: {stderr}", out.status);
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn good(name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = tmp_dir(name);
    let model = dir.join("model");
    write_checkpoint(&model, &llama_config(), Kind::Float, 1, 5);
    let data = dir.join("data.jsonl");
    write_texts(&data, 3, 10, 1);
    (dir, model, data)
}

#[test]
fn missing_and_malformed_config() {
    let (dir, model, data) = good("bad-config");
    std::fs::remove_file(model.join("config.json")).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("config.json") && e.contains("No such file"), "{e}");

    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\",\n \"vocab_size\": 48,,}").unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("config.json") && e.contains("line 2"), "{e}");

    let mut cfg = llama_config();
    cfg["model_type"] = json!("gpt2");
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("unsupported `model_type` \"gpt2\""), "{e}");

    let mut cfg = llama_config();
    cfg["rope_scaling"] = json!({"rope_type": "longrope", "factor": 2.0});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("rope_scaling") && e.contains("longrope"), "{e}");

    let mut cfg = llama_config();
    cfg["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("low_freq_factor"), "{e}");

    let mut cfg = llama_config();
    cfg["num_key_value_heads"] = json!(3);
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("num_key_value_heads"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (dir, model, data) = good("bad-truncated");
    let f = model.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let dir = tmp_dir("bad-tensors");
    let data = dir.join("data.jsonl");
    write_texts(&data, 2, 10, 1);
    let model = dir.join("missing");
    write_checkpoint_with(&model, &llama_config(), Kind::Float, 1, 5, |ts| ts.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");

    let model = dir.join("misshaped");
    write_checkpoint_with(&model, &llama_config(), Kind::Float, 1, 5, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.layers.0.self_attn.k_proj.weight" {
                *t = Tensor::zeros([64, 64], (Kind::Float, Device::Cpu));
            }
        }
    });
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[64, 64]") && e.contains("[32, 64]"), "{e}");

    let model = dir.join("int-dtype");
    write_checkpoint_with(&model, &llama_config(), Kind::Float, 1, 5, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.norm.weight" {
                *t = t.to_kind(Kind::Int);
            }
        }
    });
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("model.norm.weight") && e.contains("dtype"), "{e}");

    let model = dir.join("sharded");
    write_checkpoint(&model, &llama_config(), Kind::Float, 2, 5);
    std::fs::remove_file(model.join("model-00002-of-00002.safetensors")).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("model.safetensors.index.json") && e.contains("model-00002-of-00002.safetensors"), "{e}");

    let model = dir.join("empty");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), llama_config().to_string()).unwrap();
    std::fs::copy(dir.join("missing/tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("no model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_data_tokenizer_and_flags() {
    let (dir, model, data) = good("bad-data");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"w3 w4 w5\"}\n\n{\"txt\": \"w3\"}\n").unwrap();
    let e = eval_err(&model, &bad, &[]);
    assert!(e.contains("bad.jsonl:3"), "{e}");

    let e = eval_err(&model, &dir.join("nope.jsonl"), &[]);
    assert!(e.contains("nope.jsonl"), "{e}");

    let e = eval_err(&model, &data, &["--device", "tpu"]);
    assert!(e.contains("--device tpu"), "{e}");
    let e = eval_err(&model, &data, &["--dtype", "int8"]);
    assert!(e.contains("--dtype int8"), "{e}");

    // A tokenizer with more words than the model's vocabulary.
    let words: Vec<String> = (0..100).map(|i| if i == 0 { "<unk>".into() } else { format!("w{i}") }).collect();
    let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    std::fs::write(model.join("tokenizer.json"), trainer::data::tokenizer::word_level_json(&refs, None).to_string()).unwrap();
    let big = dir.join("big.jsonl");
    std::fs::write(&big, "{\"text\": \"w3 w99 w4\"}\n").unwrap();
    let e = eval_err(&model, &big, &[]);
    assert!(e.contains("big.jsonl:1") && e.contains("vocab_size 48"), "{e}");

    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let e = eval_err(&model, &data, &[]);
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A libtorch failure inside a step — here a CPU allocation the process may not make (gate_proj's
/// output of 2^16 tokens × 2^18 channels, 64 GiB, under a 40 GiB address-space limit, the way a
/// machine without that much memory refuses it) — ends the run with one error naming the phase
/// and layer, libtorch's message, the memory state and what would fit; exit 1, no panic, and the
/// run directory keeps what was written before.
#[test]
fn a_libtorch_failure_inside_a_step_is_an_error_with_phase_layer_and_what_would_fit() {
    let dir = tmp_dir("torch-failure");
    let recipe = dir.join("huge.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"[run]
dir = "{run}"
device = "cpu"
[model]
tokenizer = "synthetic"
[model.init]
model_type = "llama"
hidden_size = 16
intermediate_size = 262144
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
[data]
tokens_per_batch = 65536
max_tokens = 4096
[data.synth]
task = "passkey"
words = [64]
[train]
steps = 2
lr = 1e-3
[eval]
samples = 1
"#,
            run = dir.join("run").display()
        ),
    )
    .unwrap();
    // jemalloc reserves without committing (MAP_NORESERVE), so only an address-space limit makes
    // the kernel refuse at once instead of the OOM killer acting later.
    let out = std::process::Command::new("bash")
        .args(["-c", "ulimit -v 41943040 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_train"), "run", "--recipe", recipe.to_str().unwrap()])
        .output()
        .unwrap();
    let se = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(!se.contains("panicked") && !se.contains("RUST_BACKTRACE") && !se.contains("frame #"), "{se}");
    for needle in [
        "error: libtorch failed in the forward of layer 0",
        "can't allocate memory",
        "resident",
        "`train plan` for this step",
        "longest step that fits",
        "step 1 of 2 failed",
    ] {
        assert!(se.contains(needle), "`{needle}` missing from:\n{se}");
    }
    assert!(dir.join("run").join("recipe.toml").exists());
    let _ = std::fs::remove_dir_all(dir);
}
