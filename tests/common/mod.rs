//! Tiny Hugging Face-layout checkpoints that the tests write themselves: config.json,
//! model.safetensors (or shards + index), tokenizer.json.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use trainer::model::weights::write_safetensors;
use trainer::model::config::ModelConfig;
use trainer::model::param_specs;

pub const VOCAB: usize = 48;

pub fn vocab() -> Vec<String> {
    let mut v = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    v.extend((3..VOCAB).map(|i| format!("w{i}")));
    v
}

/// A fresh temporary directory under target/ (kept on failure for inspection).
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes config.json, random weights and tokenizer.json. `shards` > 1 splits the weights into
/// that many files with an index; `dtype` is the stored dtype.
pub fn write_checkpoint(dir: &Path, config: &Value, dtype: Kind, shards: usize, seed: i64) -> ModelConfig {
    write_checkpoint_with(dir, config, dtype, shards, seed, |_| {})
}

/// As [`write_checkpoint`], with a hook that may damage the tensor list before it is written.
pub fn write_checkpoint_with(
    dir: &Path,
    config: &Value,
    dtype: Kind,
    shards: usize,
    seed: i64,
    mutate: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> ModelConfig {
    std::fs::create_dir_all(dir).unwrap();
    let text = serde_json::to_string_pretty(config).unwrap();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let (cfg, _) = ModelConfig::parse(&text, &dir.join("config.json")).unwrap();
    tch::manual_seed(seed);
    let mut tensors: Vec<(String, Tensor)> = param_specs(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 0.1 + 1.0
            } else if name.ends_with(".bias") {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 0.1
            } else if name.contains("embed_tokens") || name == "lm_head.weight" {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 0.5
            } else {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) / (shape[1] as f64).sqrt()
            };
            (name, t.to_kind(dtype))
        })
        .collect();
    mutate(&mut tensors);
    if shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut weight_map = BTreeMap::new();
        for (i, chunk) in tensors.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
            write_safetensors(&dir.join(&file), chunk).unwrap();
            for (n, _) in chunk {
                weight_map.insert(n.clone(), file.clone());
            }
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    let words = vocab();
    let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let tok = trainer::data::tokenizer::word_level_json(&refs, Some("<s>"));
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    cfg
}

/// Base Llama-shaped config: 2 layers, hidden 64, 4 heads over 2 kv heads (head_dim 16).
pub fn llama_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    })
}

pub fn qwen2_config() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "sliding_window": 4096,
        "max_window_layers": 2,
        "bos_token_id": 1,
        "eos_token_id": [2, 0],
        "torch_dtype": "bfloat16"
    })
}

pub fn mistral_config() -> Value {
    json!({
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "sliding_window": 7,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
}

/// Deterministic documents over the tiny vocabulary: a repeated pattern with noise, so a loss
/// is neither trivial nor uniform.
pub fn write_texts(path: &Path, lines: usize, min_words: usize, seed: u64) {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    let mut out = String::new();
    for i in 0..lines {
        let n = min_words + i * 7 % 23;
        let words: Vec<String> = (0..n).map(|j| format!("w{}", 3 + if j % 3 == 0 { next() % (VOCAB - 3) } else { (j * 5 + i) % (VOCAB - 3) })).collect();
        out.push_str(&json!({"text": words.join(" ")}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// Runs the real `train` binary.
pub fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().expect("run train")
}

pub fn venv_python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3")
}

/// A tiny Llama folder (`dir/base`, written once) and a text file of 40 lines; returns (model
/// dir, data file).
pub fn tiny_llama_and_texts(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("base");
    if !model.exists() {
        write_checkpoint(&model, &llama_config(), Kind::Float, 1, 21);
    }
    let data = dir.join("train.jsonl");
    write_texts(&data, 40, 24, 9);
    (model, data)
}

/// A run's step → train/loss, the last record of each step (a resumed run repeats some; a line
/// being written right now is skipped).
pub fn losses_by_step(run: &Path) -> BTreeMap<i64, f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v = serde_json::from_str::<Value>(l).ok()?;
            Some((v.get("step")?.as_i64()?, v.get("train/loss")?.as_f64()?))
        })
        .collect()
}
