//! The run's result in the layout the Hugging Face stack loads: a PEFT adapter folder (LoRA) or
//! a full model folder.
use std::path::Path;

use tch::Tensor;

use crate::error::{Result, TrainerError};
use crate::model::lora::LoraConfig;
use crate::model::Model;

/// Writes `final/`: the adapter (LoRA, naming `base_name` as its base model) or the whole model
/// with the config and tokenizer files of `source`.
pub fn final_export(model: &Model, run_dir: &Path, lora: Option<&LoraConfig>, base_name: &str, source: &Path) -> Result<()> {
    let final_dir = run_dir.join("final");
    match lora {
        Some(l) => model.save_peft_adapter(&final_dir, l, base_name),
        None => export_hf(model, &final_dir, source),
    }
}

/// A full model as an HF folder: config.json and tokenizer files copied from the source folder,
/// weights in `model.safetensors`.
pub fn export_hf(model: &Model, dir: &Path, source: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"] {
        let src = source.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).map_err(TrainerError::io(&src))?;
        }
    }
    let tensors: Vec<(String, Tensor)> = model.named_parameters().into_iter().map(|(n, t)| (n, t.shallow_clone())).collect();
    crate::model::weights::write_safetensors(&dir.join("model.safetensors"), &tensors)
}
