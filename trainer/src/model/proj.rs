//! The seven projections of a decoder layer, named once: their Hugging Face names, the short
//! names LoRA targets use, their shapes and which carry a bias.
use crate::model::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// In checkpoint order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    /// The MLP's projections (MLP channel sparsity runs them without adapters).
    pub const MLP: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// The name inside a layer, as in `model.layers.{i}.self_attn.q_proj.weight`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The module name PEFT's `target_modules` use (`q_proj`).
    pub fn short(self) -> &'static str {
        let n = self.hf_name();
        n.rsplit('.').next().unwrap_or(n)
    }

    /// Every short name, in checkpoint order.
    pub fn short_names() -> [&'static str; 7] {
        Proj::ALL.map(Proj::short)
    }

    pub fn from_short(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.short() == name)
    }

    /// `(out_features, in_features)` of the weight under `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (i64, i64) {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        match self {
            Proj::Q => (qd, d),
            Proj::K | Proj::V => (kvd, d),
            Proj::O => (d, qd),
            Proj::Gate | Proj::Up => (i, d),
            Proj::Down => (d, i),
        }
    }

    /// Whether the checkpoint holds a bias for it (Qwen2: q/k/v).
    pub fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            _ => cfg.mlp_bias,
        }
    }
}
