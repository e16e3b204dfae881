//! Model configurations shipped with strata, so that `train plan --model-config llama-3.1-8b`
//! answers "does it fit my GPU" before a 16 GB download: each is the `config.json` of the public
//! checkpoint (the planner needs the shapes only).
use std::path::Path;

use crate::error::{Result, TrainerError};
use crate::model::config::ModelConfig;

/// Name and `config.json` of every preset.
pub const PRESETS: [(&str, &str); 4] = [
    ("llama-3.1-8b", include_str!("../../presets/llama-3.1-8b.json")),
    ("llama-3.1-70b", include_str!("../../presets/llama-3.1-70b.json")),
    ("qwen2.5-7b", include_str!("../../presets/qwen2.5-7b.json")),
    ("mistral-7b-v0.3", include_str!("../../presets/mistral-7b-v0.3.json")),
];

/// The configuration `arg` names: a `config.json` file, a model folder holding one, or a preset.
pub fn model_config(arg: &str) -> Result<ModelConfig> {
    let path = Path::new(arg);
    let (cfg, warnings) = if path.is_dir() {
        ModelConfig::load(path)?
    } else if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(TrainerError::io(path))?;
        ModelConfig::parse(&text, path)?
    } else if let Some((name, text)) = PRESETS.iter().find(|(n, _)| n.eq_ignore_ascii_case(arg)) {
        ModelConfig::parse(text, Path::new(&format!("<preset {name}>")))?
    } else {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(TrainerError::config(path, format!("no such file, folder or preset (presets: {})", names.join(", "))));
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses() {
        for (name, _) in PRESETS {
            let cfg = model_config(name).unwrap();
            assert!(cfg.num_layers > 0 && cfg.hidden_size > 0, "{name}");
        }
        assert!(model_config("gpt-17").unwrap_err().to_string().contains("llama-3.1-8b"));
    }
}
