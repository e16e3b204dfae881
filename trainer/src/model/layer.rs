//! One decoder layer's parameters (`model.layers.{i}.*`): its norms and its seven projections,
//! each with its LoRA adapter when one is attached. The block's code ([`super::block`]) reads
//! these; the model ([`super::Model`]) owns them.
use tch::Tensor;

use crate::model::proj::Proj;

/// A projection's parameters, with its LoRA adapter when one is attached.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
}

/// PEFT's `lora_A` / `lora_B` of one projection and its hyper-parameters.
pub struct LoraWeights {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// alpha / rank
    pub scale: f64,
    pub dropout: f64,
}

/// One decoder layer's parameters (`model.layers.{i}.*`).
pub struct Layer {
    pub input_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Layer {
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            (Proj::Q.hf_name(), &mut self.q_proj),
            (Proj::K.hf_name(), &mut self.k_proj),
            (Proj::V.hf_name(), &mut self.v_proj),
            (Proj::O.hf_name(), &mut self.o_proj),
            (Proj::Gate.hf_name(), &mut self.gate_proj),
            (Proj::Up.hf_name(), &mut self.up_proj),
            (Proj::Down.hf_name(), &mut self.down_proj),
        ]
    }

    /// The projections with their HF sub-names, in checkpoint order.
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        Proj::ALL.map(|p| (p.hf_name(), self.proj(p)))
    }
}
