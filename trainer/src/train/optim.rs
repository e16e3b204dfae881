//! AdamW (PyTorch's definition, decoupled weight decay), the learning-rate schedule, and
//! gradient clipping by global norm.
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::model::Grads;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter, float32 (float64 for float64 parameters), and
/// for a bf16/fp16 parameter its float32 master copy: updates smaller than the parameter's
/// rounding step would otherwise be lost.
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
    pub master: Option<Tensor>,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Updates taken so far (bias correction uses it).
    pub t: i64,
    pub state: BTreeMap<String, Moments>,
}

/// Biases and norm weights get no weight decay (the Hugging Face Trainer's rule).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> AdamW {
        AdamW { cfg, t: 0, state: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    /// Parameters are updated in place; moments live in float32 beside bf16 weights.
    pub fn step(&mut self, params: &[(String, &Tensor)], grads: &Grads, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, p) in params {
            let Some(g) = grads.get(name) else { continue };
            let acc = kernels::accum_kind(p.kind());
            let g = g.to_kind(acc);
            let st = self.state.entry(name.clone()).or_insert_with(|| Moments {
                m: g.zeros_like(),
                v: g.zeros_like(),
                master: (p.kind() != acc).then(|| p.to_kind(acc)),
            });
            // m = β1 m + (1-β1) g ; v = β2 v + (1-β2) g²
            let _ = st.m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
            let _ = st.v.g_mul_scalar_(c.beta2).g_add_(&(g.square() * (1.0 - c.beta2)));
            let denom = (&st.v / bc2).sqrt() + c.eps;
            let mut update = (&st.m / bc1) / denom * lr;
            let mut master = st.master.as_ref().map(|m| m.shallow_clone()).unwrap_or_else(|| p.to_kind(acc));
            if c.weight_decay != 0.0 && decays(name) {
                master = &master * (1.0 - lr * c.weight_decay);
            }
            update = master - update;
            if let Some(m) = st.master.as_mut() {
                let _ = m.copy_(&update);
            }
            let mut p = p.shallow_clone();
            let _ = p.copy_(&update.to_kind(p.kind()));
        }
    }
}

/// Global L2 norm of all gradients; when it exceeds `max_norm` every gradient is scaled down
/// to that norm. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: Option<f64>) -> f64 {
    let _guard = tch::no_grad_guard();
    let total: f64 = grads.values().map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    if let Some(m) = max_norm {
        let coef = m / (total + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                let _ = g.g_mul_scalar_(coef);
            }
        }
    }
    total
}

/// The learning-rate decay after warm-up (`train.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

/// Linear warm-up from 0, then the decay to `min_lr_ratio · lr` at `total` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: i64,
    pub total: i64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// Learning rate of update number `step` (0-based).
    pub fn lr_at(&self, step: i64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let p = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        let min = self.lr * self.min_lr_ratio;
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => min + (self.lr - min) * (1.0 - p),
            Decay::Cosine => min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }
}
