//! `config.json` of a Hugging Face Llama / Qwen2 / Mistral folder, in two layers: a serde mirror
//! of the file ([`HfConfigFile`]) and the validated runtime [`ModelConfig`] with every default
//! resolved.
//!
//! HF configs carry many keys that do not affect the computation (`architectures`,
//! `transformers_version`, `use_cache`, ...) and gain new ones with every release, so the mirror
//! does not deny unknown keys: it collects them, the keys known to be harmless are dropped, and
//! the rest are reported as warnings. Keys that would change the numerics and that strata does not
//! implement (`partial_rotary_factor` ≠ 1, `quantization_config`, a RoPE type it lacks) are errors.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kernels::rope::{RopeConfig, RopeScaling};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, TrainerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

/// The file as written. Every field optional here; defaults are applied in [`ModelConfig::from_file`]
/// with the same values transformers uses for each `model_type`.
#[derive(Debug, Deserialize)]
pub struct HfConfigFile {
    pub model_type: Option<String>,
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<i64>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub sliding_window: Option<i64>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<i64>,
    pub layer_types: Option<Vec<String>>,
    pub attention_dropout: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Keys that never change the computation of a training step.
const HARMLESS_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "bos_token_id",
    "pad_token_id",
    "auto_map",
    "_attn_implementation_autoset",
    "use_mrope",
    "tokenizer_class",
];

/// Validated model description: no Options left except where absence has a meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    /// `eos_token_id` may be an int or a list in HF configs; always a list here.
    pub eos_token_ids: Vec<i64>,
    /// Per layer: the sliding window, when that layer uses one.
    pub sliding_window: Vec<Option<i64>>,
    /// The checkpoint's stored dtype (`torch_dtype` / `dtype`), if it says.
    pub stored_dtype: Option<String>,
}

/// What parsing found but did not use: unknown keys, for the user to see.
pub type Warnings = Vec<String>;

fn int_list(v: &Option<Value>, key: &str, path: &Path) -> Result<Vec<i64>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n.as_i64().map(|i| vec![i]).ok_or_else(|| TrainerError::config(path, format!("`{key}` must be an integer"))),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| TrainerError::config(path, format!("`{key}` must hold integers, found {x}"))))
            .collect(),
        Some(other) => Err(TrainerError::config(path, format!("`{key}` must be an integer or a list of integers, found {other}"))),
    }
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<(ModelConfig, Warnings)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(TrainerError::io(&path))?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<(ModelConfig, Warnings)> {
        let file: HfConfigFile = serde_json::from_str(text)
            .map_err(|e| TrainerError::config(path, format!("line {}, column {}: {e}", e.line(), e.column())))?;
        Self::from_file(file, path)
    }

    pub fn from_file(f: HfConfigFile, path: &Path) -> Result<(ModelConfig, Warnings)> {
        let p = PathBuf::from(path);
        let err = |msg: String| TrainerError::config(&p, msg);
        let model_type = f.model_type.clone().ok_or_else(|| err("missing `model_type` (expected llama, qwen2 or mistral)".into()))?;
        let arch = match model_type.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => return Err(err(format!("unsupported `model_type` \"{other}\": strata supports llama, qwen2 and mistral"))),
        };
        let req = |v: Option<i64>, key: &str| -> Result<i64> {
            match v {
                Some(x) if x > 0 => Ok(x),
                Some(x) => Err(err(format!("`{key}` must be positive, found {x}"))),
                None => Err(err(format!("missing `{key}`"))),
            }
        };
        let vocab_size = req(f.vocab_size, "vocab_size")?;
        let hidden_size = req(f.hidden_size, "hidden_size")?;
        let intermediate_size = req(f.intermediate_size, "intermediate_size")?;
        let num_layers = req(f.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = req(f.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = req(f.num_key_value_heads.or(Some(num_heads)), "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(err(format!("`num_attention_heads` ({num_heads}) is not a multiple of `num_key_value_heads` ({num_kv_heads})")));
        }
        let head_dim = match f.head_dim {
            Some(d) => req(Some(d), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(err(format!("`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` ({num_heads}) and no `head_dim` is given"))),
        };
        if head_dim % 2 != 0 {
            return Err(err(format!("`head_dim` must be even for RoPE, found {head_dim}")));
        }
        let act = f.hidden_act.clone().unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(err(format!("`hidden_act` \"{act}\" is not supported (only silu)")));
        }
        if let Some(prf) = f.partial_rotary_factor {
            if prf != 1.0 {
                return Err(err(format!("`partial_rotary_factor` {prf} is not supported (only 1.0)")));
            }
        }
        if f.other.contains_key("quantization_config") {
            return Err(err("quantized checkpoints (`quantization_config`) are not supported".into()));
        }
        let max_position_embeddings = req(f.max_position_embeddings.or(Some(match arch {
            Arch::Llama => 2048,
            Arch::Qwen2 => 32768,
            Arch::Mistral => 131072,
        })), "max_position_embeddings")?;
        let rms_norm_eps = f.rms_norm_eps.unwrap_or(match arch {
            Arch::Llama => 1e-6,
            Arch::Qwen2 => 1e-6,
            Arch::Mistral => 1e-6,
        });
        let rope = parse_rope(&f, head_dim, max_position_embeddings, &p)?;
        let attention_bias = f.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama => (attention_bias, attention_bias, f.mlp_bias.unwrap_or(false)),
            Arch::Qwen2 => (true, false, false),
            Arch::Mistral => (false, false, false),
        };
        let sliding_window = sliding_windows(&f, arch, num_layers, &p)?;
        let bos = int_list(&f.bos_token_id, "bos_token_id", &p)?;
        let eos_token_ids = int_list(&f.eos_token_id, "eos_token_id", &p)?;

        let mut warnings = Vec::new();
        if let Some(d) = f.attention_dropout {
            if d != 0.0 {
                warnings.push(format!("{}: `attention_dropout` {d} is ignored (strata trains without attention dropout)", p.display()));
            }
        }
        for key in f.other.keys() {
            if !HARMLESS_KEYS.contains(&key.as_str()) {
                warnings.push(format!("{}: unknown key `{key}` ignored", p.display()));
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            sliding_window,
            stored_dtype: f.torch_dtype.clone().or(f.dtype.clone()),
        };
        Ok((cfg, warnings))
    }
}

fn sliding_windows(f: &HfConfigFile, arch: Arch, layers: i64, p: &Path) -> Result<Vec<Option<i64>>> {
    let window = match f.sliding_window {
        Some(w) if w <= 0 => return Err(TrainerError::config(p, format!("`sliding_window` must be positive, found {w}"))),
        w => w,
    };
    let n = layers as usize;
    Ok(match arch {
        Arch::Llama => vec![None; n],
        Arch::Mistral => vec![window; n],
        Arch::Qwen2 => {
            if let Some(types) = &f.layer_types {
                if types.len() != n {
                    return Err(TrainerError::config(p, format!("`layer_types` has {} entries for {n} layers", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(None),
                        "sliding_attention" => Ok(window),
                        other => Err(TrainerError::config(p, format!("`layer_types`: unknown layer type \"{other}\""))),
                    })
                    .collect::<Result<_>>()?
            } else if f.use_sliding_window.unwrap_or(false) {
                let from = f.max_window_layers.unwrap_or(28);
                (0..layers).map(|i| if i >= from { window } else { None }).collect()
            } else {
                vec![None; n]
            }
        }
    })
}

/// `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older files), resolved as
/// `standardize_rope_params` and the `_compute_*_parameters` functions of transformers do.
fn parse_rope(f: &HfConfigFile, head_dim: i64, max_pos: i64, p: &Path) -> Result<RopeConfig> {
    let dict = match (&f.rope_parameters, &f.rope_scaling) {
        (Some(Value::Object(m)), _) => m.clone(),
        (_, Some(Value::Object(m))) => m.clone(),
        (Some(Value::Null) | None, Some(Value::Null) | None) => serde_json::Map::new(),
        _ => return Err(TrainerError::config(p, "`rope_parameters` / `rope_scaling` must be an object or null")),
    };
    let key_name = if matches!(f.rope_parameters, Some(Value::Object(_))) { "rope_parameters" } else { "rope_scaling" };
    let err = |msg: String| TrainerError::config(p, format!("`{key_name}`: {msg}"));
    let num = |k: &str| -> Result<Option<f64>> {
        match dict.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| err(format!("`{k}` must be a number, found {v}"))),
        }
    };
    let need = |k: &str, ty: &str| -> Result<f64> { num(k)?.ok_or_else(|| err(format!("rope type \"{ty}\" needs `{k}`"))) };
    let theta = num("rope_theta")?.or(f.rope_theta).unwrap_or(10000.0);
    if theta <= 1.0 {
        return Err(err(format!("rope_theta must be > 1, found {theta}")));
    }
    let ty = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string();
    if let Some(prf) = num("partial_rotary_factor")? {
        if prf != 1.0 {
            return Err(err(format!("`partial_rotary_factor` {prf} is not supported")));
        }
    }
    let orig = |d: &serde_json::Map<String, Value>| -> Result<i64> {
        match d.get("original_max_position_embeddings") {
            None | Some(Value::Null) => Ok(max_pos),
            Some(v) => v.as_i64().filter(|x| *x > 0).ok_or_else(|| err(format!("`original_max_position_embeddings` must be a positive integer, found {v}"))),
        }
    };
    let scaling = match ty.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need("factor", "linear")? },
        "dynamic" => RopeScaling::Dynamic { factor: need("factor", "dynamic")?, max_position_embeddings: max_pos },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor", "llama3")?,
            low_freq_factor: need("low_freq_factor", "llama3")?,
            high_freq_factor: need("high_freq_factor", "llama3")?,
            original_max_position_embeddings: orig(&dict)?,
        },
        "yarn" => {
            let o = orig(&dict)?;
            let factor = num("factor")?.unwrap_or(max_pos as f64 / o as f64);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: o,
                // transformers uses `get(..) or default`, so 0 and null both mean the default.
                beta_fast: num("beta_fast")?.filter(|x| *x != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow")?.filter(|x| *x != 0.0).unwrap_or(1.0),
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                attention_factor: num("attention_factor")?,
                truncate: dict.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            }
        }
        other => return Err(err(format!("rope type \"{other}\" is not supported (default, linear, dynamic, llama3, yarn)"))),
    };
    if let RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } | RopeScaling::Llama3 { factor, .. } | RopeScaling::Yarn { factor, .. } = &scaling {
        if *factor <= 0.0 {
            return Err(err(format!("`factor` must be positive, found {factor}")));
        }
    }
    Ok(RopeConfig { head_dim, theta, scaling })
}
