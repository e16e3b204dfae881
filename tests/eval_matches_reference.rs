//! `train eval` on tiny Llama / Qwen2 / Mistral checkpoints written here in HF layout, against
//! (1) the autograd reference built from plain libtorch ops and (2) Hugging Face transformers.
//! Also: the whole model's explicit backward against autograd.
mod common;
use std::path::Path;

use common::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;
use trainer::eval::shifted;
use trainer::model::Model;

/// (name, config, stored dtype, shards)
fn variants() -> Vec<(&'static str, Value, Kind, usize)> {
    let mut llama3 = llama_config();
    llama3["rope_scaling"] =
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    let mut yarn = llama_config();
    yarn["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 32});
    yarn["tie_word_embeddings"] = json!(true);
    yarn["head_dim"] = json!(32);
    let mut dynamic = llama_config();
    dynamic["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
    dynamic["max_position_embeddings"] = json!(16);
    let mut linear = llama_config();
    linear["rope_scaling"] = json!({"rope_type": "linear", "factor": 3.0});
    linear["attention_bias"] = json!(true);
    linear["mlp_bias"] = json!(true);
    vec![
        ("llama", llama_config(), Kind::Float, 1),
        ("llama3-rope-sharded-bf16", llama3, Kind::BFloat16, 3),
        ("yarn-tied", yarn, Kind::Float, 1),
        ("dynamic-ntk", dynamic, Kind::Float, 1),
        ("linear-rope-biases", linear, Kind::Half, 2),
        ("qwen2", qwen2_config(), Kind::BFloat16, 1),
        ("mistral-sliding", mistral_config(), Kind::Float, 1),
    ]
}

fn setup(name: &str, cfg: &Value, kind: Kind, shards: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = tmp_dir(&format!("eval-{name}"));
    let model = dir.join("model");
    write_checkpoint(&model, cfg, kind, shards, 17);
    let data = dir.join("data.jsonl");
    write_texts(&data, 5, 20, 3);
    (model, data)
}

fn eval_json(model: &Path, data: &Path, dtype: &str) -> Value {
    let out = train(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--device", "cpu", "--dtype", dtype, "--json", "--loss-chunk", "7"]);
    assert!(out.status.success(), "train eval failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Reference mean loss over the file by autograd's naive model in float64.
fn reference_loss(model_dir: &Path, data: &Path) -> (f64, i64) {
    let (cfg, _) = ModelConfig::load(model_dir).unwrap();
    let (m, _) = Model::load(model_dir, cfg, Kind::Double, Device::Cpu).unwrap();
    let tok = trainer::data::tokenizer::load(model_dir).unwrap();
    let (mut sum, mut n) = (0.0, 0i64);
    for line in std::fs::read_to_string(data).unwrap().lines() {
        let text: Value = serde_json::from_str(line).unwrap();
        let ids = trainer::data::tokenizer::encode(&tok, text["text"].as_str().unwrap(), model_dir).unwrap();
        let (x, y) = shifted(&ids);
        let (mean, _) = trainer::model::reference::loss_and_grads(&m, &trainer::model::Batch::single(x, y));
        sum += mean * (ids.len() - 1) as f64;
        n += ids.len() as i64 - 1;
    }
    (sum / n as f64, n)
}

#[test]
fn eval_loss_matches_autograd_reference_in_float32() {
    for (name, cfg, kind, shards) in variants() {
        let (model, data) = setup(name, &cfg, kind, shards);
        let got = eval_json(&model, &data, "float32");
        let (want, n) = reference_loss(&model, &data);
        let loss = got["loss"].as_f64().unwrap();
        let rel = (loss - want).abs() / want.abs();
        println!("{name}: train eval {loss:.9} reference {want:.9} relative {rel:.2e} over {n} tokens");
        assert_eq!(got["tokens"].as_i64().unwrap(), n);
        assert!(rel < 1e-5, "{name}: relative error {rel:e}");
        assert!((got["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
    }
}

#[test]
fn eval_loss_matches_transformers() {
    let py = venv_python();
    assert!(py.exists(), "{} missing: run `make setup` (make test does it)", py.display());
    for (name, cfg, kind, shards) in variants() {
        let (model, data) = setup(&format!("hf-{name}"), &cfg, kind, shards);
        let got = eval_json(&model, &data, "float32");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_reference.py");
        let out = std::process::Command::new(&py).arg(&script).arg(&model).arg(&data).output().unwrap();
        assert!(out.status.success(), "{name}: transformers failed: {}", String::from_utf8_lossy(&out.stderr));
        let hf: Value = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
        let (loss, want) = (got["loss"].as_f64().unwrap(), hf["loss"].as_f64().unwrap());
        let rel = (loss - want).abs() / want.abs();
        println!("{name}: train eval {loss:.9} transformers {want:.9} relative {rel:.2e}");
        assert_eq!(got["tokens"], hf["tokens"], "{name}: token counts differ (tokenization)");
        assert!(rel < 1e-5, "{name}: relative error {rel:e} against transformers");
    }
}

#[test]
fn whole_model_explicit_backward_matches_autograd() {
    for (name, cfg, kind, shards) in variants() {
        let (model_dir, _) = setup(&format!("bwd-{name}"), &cfg, kind, shards);
        let (mc, _) = ModelConfig::load(&model_dir).unwrap();
        let (m, _) = Model::load(&model_dir, mc, Kind::Double, Device::Cpu).unwrap();
        // 29 tokens: not a multiple of anything; beyond Mistral's window of 7 and dynamic's 16.
        let ids: Vec<i64> = (0..29).map(|i| (i * 13 + 5) % VOCAB as i64).collect();
        let (x, y) = shifted(&ids);
        let _ = y.get(3).fill_(-100); // one ignored label
        let (loss, grads, _) = m.forward_backward(&trainer::model::Batch::single(x.shallow_clone(), y.shallow_clone()), None, 5).unwrap();
        let (ref_loss, ref_grads) = trainer::model::reference::loss_and_grads(&m, &trainer::model::Batch::single(x, y));
        let mean = loss.sum.double_value(&[]) / loss.count as f64;
        assert!((mean - ref_loss).abs() < 1e-12 * ref_loss.abs(), "{name}: loss {mean} vs {ref_loss}");
        assert_eq!(grads.len(), ref_grads.len(), "{name}: gradient count");
        let mut worst = 0.0f64;
        for (n, g) in &ref_grads {
            let got = grads.get(n).unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let scale = g.abs().max().double_value(&[]).max(1e-3);
            let e = (got - g).abs().max().double_value(&[]) / scale;
            assert!(e < 1e-9, "{name}: {n}: relative error {e:e}");
            worst = worst.max(e);
        }
        println!("{name}: {} parameter gradients, worst relative error {worst:.2e}", grads.len());
        let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    }
}
