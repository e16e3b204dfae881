//! Attaching LoRA adapters to a model (PEFT's initialisation and names) and exporting them in
//! the PEFT layout (`adapter_model.safetensors` + `adapter_config.json`) that `peft` loads.
use std::path::Path;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::model::weights::write_safetensors;
use crate::error::{Result, TrainerError};
use crate::model::layer::LoraWeights;
use crate::model::Model;

/// The projections LoRA can adapt, by their HF module names.
pub use crate::model::proj::Proj;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names from [`Proj::short_names`].
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

impl Model {
    /// Attaches fresh adapters and switches the model to LoRA training: `lora_A` uniform in
    /// ±1/sqrt(in) (PEFT's kaiming-uniform with a=√5), `lora_B` zero, so the model's output is
    /// unchanged until the first update. Adapters are float32 over a bf16/fp16/fp32 base (they are
    /// small and train better in full precision) and float64 over a float64 base (tests).
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: i64) -> Result<()> {
        for t in &cfg.targets {
            if Proj::from_short(t).is_none() {
                return Err(TrainerError::Device(format!("lora target `{t}` is not one of {:?}", Proj::short_names())));
            }
        }
        tch::manual_seed(seed);
        let kind = if self.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        let dev = self.device();
        for layer in &mut self.layers {
            for (name, lin) in layer.projections_mut() {
                let module = name.rsplit('.').next().unwrap_or(name);
                if !cfg.targets.iter().any(|t| t == module) {
                    continue;
                }
                let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = Tensor::empty([cfg.rank, inp], (kind, Device::Cpu)).uniform_(-bound, bound).to_device(dev);
                let b = Tensor::zeros([out, cfg.rank], (kind, dev));
                lin.lora = Some(LoraWeights { a, b, scale: cfg.scale(), dropout: cfg.dropout });
            }
        }
        self.full = false;
        Ok(())
    }

    /// Loads a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) onto
    /// this model. Errors name the file and key or tensor.
    pub fn load_peft_adapter(&mut self, dir: &Path) -> Result<LoraConfig> {
        let cp = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cp).map_err(TrainerError::io(&cp))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainerError::config(&cp, format!("line {}: {e}", e.line())))?;
        let get_f = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| TrainerError::config(&cp, format!("missing number `{k}`")));
        if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(TrainerError::config(&cp, format!("`peft_type` \"{t}\" is not LORA")));
            }
        }
        for flag in ["use_dora", "use_rslora"] {
            if v.get(flag).and_then(|x| x.as_bool()) == Some(true) {
                return Err(TrainerError::config(&cp, format!("`{flag}` adapters are not supported")));
            }
        }
        let targets: Vec<String> = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            Some(serde_json::Value::String(s)) if s == "all-linear" => Proj::short_names().iter().map(|s| s.to_string()).collect(),
            _ => return Err(TrainerError::config(&cp, "`target_modules` must be a list of module names")),
        };
        let cfg = LoraConfig { rank: get_f("r")? as i64, alpha: get_f("lora_alpha")?, dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0), targets };
        self.attach_lora(&cfg, 0)?;
        let wp = dir.join("adapter_model.safetensors");
        let files = crate::model::weights::WeightFiles::open_file(&wp)?;
        let dev = self.device();
        let _guard = tch::no_grad_guard();
        for (name, t) in self.named_adapters() {
            let src = files.load(&format!("base_model.model.{name}"), &t.size(), t.kind(), dev)?;
            let mut dst = t.shallow_clone();
            let _ = dst.copy_(&src);
        }
        Ok(cfg)
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`, as PEFT names them
    /// (`base_model.model.` + the HF module path).
    pub fn save_peft_adapter(&self, dir: &Path, cfg: &LoraConfig, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
        let tensors: Vec<(String, Tensor)> =
            self.named_adapters().into_iter().map(|(n, t)| (format!("base_model.model.{n}"), t.shallow_clone())).collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let conf = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": cfg.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&conf).unwrap_or_default()).map_err(TrainerError::io(&path))
    }
}
