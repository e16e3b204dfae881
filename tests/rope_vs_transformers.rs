//! RoPE frequency tables for every scaling type against transformers' own
//! `ROPE_INIT_FUNCTIONS`, on realistic (Llama-3.1, Qwen2-YaRN, DeepSeek-style mscale) settings.
mod common;
use common::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use trainer::model::config::ModelConfig;

const PY: &str = r#"
import json, sys, torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
cfg = AutoConfig.from_pretrained(sys.argv[1])
rp = cfg.rope_parameters
inv, att = ROPE_INIT_FUNCTIONS[rp["rope_type"]](cfg, "cpu", seq_len=int(sys.argv[2]))
print(json.dumps({"inv_freq": inv.tolist(), "attention_factor": float(att)}))
"#;

fn cases() -> Vec<(&'static str, Value, i64)> {
    let base = |rope: Value, theta: f64| {
        let mut c = llama_config();
        c["hidden_size"] = json!(512);
        c["num_attention_heads"] = json!(4); // head_dim 128
        c["num_key_value_heads"] = json!(1);
        c["max_position_embeddings"] = json!(131072);
        c["rope_theta"] = json!(theta);
        c["rope_scaling"] = rope;
        c
    };
    vec![
        ("llama3.1", base(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), 500000.0), 1000),
        ("linear", base(json!({"type": "linear", "factor": 4.0}), 10000.0), 1000),
        ("dynamic-beyond", base(json!({"type": "dynamic", "factor": 4.0}), 10000.0), 300000),
        ("dynamic-within", base(json!({"type": "dynamic", "factor": 4.0}), 10000.0), 5000),
        ("yarn-qwen", base(json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 1000000.0), 1000),
        ("yarn-mscale", base(json!({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}), 10000.0), 1000),
        ("yarn-no-truncate", base(json!({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "truncate": false, "attention_factor": 1.3}), 150000.0), 1000),
    ]
}

#[test]
fn inv_freq_and_attention_factor_match_transformers() {
    let py = venv_python();
    assert!(py.exists(), "{} missing: run `make setup`", py.display());
    let dir = tmp_dir("rope");
    for (name, cfg, seq_len) in cases() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let text = cfg.to_string();
        std::fs::write(d.join("config.json"), &text).unwrap();
        let (mc, _) = ModelConfig::parse(&text, &d.join("config.json")).unwrap();
        let (inv, att) = mc.rope.inv_freq(seq_len);
        let out = std::process::Command::new(&py).arg("-c").arg(PY).arg(&d).arg(seq_len.to_string()).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let hf: Value = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
        let want: Vec<f64> = hf["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let want = Tensor::from_slice(&want).to_kind(Kind::Double);
        let got = inv.to_kind(Kind::Double).to_device(Device::Cpu);
        let rel = ((&got - &want).abs() / want.abs()).max().double_value(&[]);
        let hf_att = hf["attention_factor"].as_f64().unwrap();
        println!("{name}: max relative inv_freq error {rel:.2e}, attention factor {att} (transformers {hf_att})");
        assert!(rel < 1e-6, "{name}: inv_freq relative error {rel:e}");
        assert!((att - hf_att).abs() < 1e-12, "{name}: attention factor {att} vs {hf_att}");
    }
}
