//! Tiny model configurations and a packed batch shared by the engine's tests.
#![allow(dead_code)]
use tch::Tensor;
use trainer::model::Batch;

pub const GQA: &str = r#"{"model_type": "llama", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}"#;
pub const MHA_QWEN: &str = r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;
pub const WINDOW: &str = r#"{"model_type": "mistral", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "rope_theta": 10000.0, "sliding_window": 13}"#;

/// Documents of the given lengths packed one after another, every ninth label ignored.
pub fn batch(lens: &[i64]) -> Batch {
    let t: i64 = lens.iter().sum();
    let ids = Tensor::from_slice(&(0..t).map(|i| (i * 7 + 1) % 50).collect::<Vec<_>>());
    let labels = Tensor::from_slice(&(0..t).map(|i| if i % 9 == 0 { -100 } else { (i * 3 + 2) % 50 }).collect::<Vec<_>>());
    Batch { ids, labels, doc_lens: lens.to_vec() }
}
