//! Rotary position embedding with the scalings Hugging Face defines (`modeling_rope_utils.py`):
//! default, linear, dynamic-NTK, llama3 and YaRN. Uses HF's `rotate_half` convention: the two
//! halves of a head are the (real, imaginary) parts, and cos/sin are `cat(freqs, freqs)`.
//!
//! RoPE is token-local and has no parameters, so it saves nothing: backward is the transpose
//! rotation, `dq = dy·cos − rotate_half(dy·sin)`.
use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

/// The scaling variants, with every default already resolved (no Options left but YaRN's
/// explicit attention factor, whose absence means "derive it").
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware base change once the sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f64, max_position_embeddings: i64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: i64 },
    Yarn {
        factor: f64,
        original_max_position_embeddings: i64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub head_dim: i64,
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Inverse frequencies `[head_dim/2]` (float32, as HF computes them) and the factor cos/sin
    /// are multiplied by. `seq_len` matters only for dynamic NTK (HF uses max(position)+1).
    pub fn inv_freq(&self, seq_len: i64) -> (Tensor, f64) {
        let dim = self.head_dim;
        let opts = (Kind::Float, Device::Cpu);
        let base_inv = |base: f64| -> Tensor {
            let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
            Tensor::pow_scalar(base, &exps).reciprocal()
        };
        match &self.scaling {
            RopeScaling::Default => (base_inv(self.theta), 1.0),
            RopeScaling::Linear { factor } => (base_inv(self.theta) / *factor, 1.0),
            RopeScaling::Dynamic { factor, max_position_embeddings } => {
                let max_pos = *max_position_embeddings as f64;
                let s = (seq_len as f64).max(max_pos);
                let base = self.theta * ((factor * s / max_pos) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                (base_inv(base), 1.0)
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let inv = base_inv(self.theta);
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = inv.reciprocal() * (2.0 * PI);
                let inv_llama = (&inv / *factor).where_self(&wavelen.gt(low_wavelen), &inv);
                let smooth = (wavelen.reciprocal() * old - *low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (smooth.ones_like() - &smooth) * &inv_llama / *factor + &smooth * &inv_llama;
                let is_medium = wavelen.lt(high_wavelen).logical_not().logical_and(&wavelen.gt(low_wavelen).logical_not());
                (smoothed.where_self(&is_medium, &inv_llama), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let att = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => get_mscale(*factor, *m) / get_mscale(*factor, *ma),
                    _ => get_mscale(*factor, 1.0),
                };
                let base = self.theta;
                let orig = *original_max_position_embeddings as f64;
                let d = dim as f64;
                let correction_dim = |rot: f64| (d * (orig / (rot * 2.0 * PI)).ln()) / (2.0 * base.ln());
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001; // HF: prevent a singular ramp
                }
                let pos_freqs = base_inv(base).reciprocal();
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (&pos_freqs * *factor).reciprocal();
                let ramp = ((Tensor::arange(dim / 2, opts) - low) / (high - low)).clamp(0.0, 1.0);
                let extra_factor = ramp.ones_like() - ramp;
                let inv = interpolation * (extra_factor.ones_like() - &extra_factor) + extrapolation * &extra_factor;
                (inv, att)
            }
        }
    }

    /// cos and sin tables for the given positions, `[T, head_dim]` each, in `kind` on `device`.
    /// Float64 is computed in float64 throughout (the tests' reference precision); any other
    /// dtype follows HF: float32 frequencies and angles, then cast.
    ///
    /// # Shapes
    /// - `positions`: `[T]` int64 → `([T, head_dim], [T, head_dim])`
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind, device: Device) -> (Tensor, Tensor) {
        let seq_len = if positions.numel() == 0 { 0 } else { positions.max().int64_value(&[]) + 1 };
        let (inv, att) = self.inv_freq(seq_len);
        let work = if kind == Kind::Double { Kind::Double } else { Kind::Float };
        let inv = inv.to_kind(work).to_device(device);
        let pos = positions.to_device(device).to_kind(work);
        let freqs = pos.unsqueeze(1) * inv.unsqueeze(0); // [T, head_dim/2]
        let emb = Tensor::cat(&[&freqs, &freqs], 1); // [T, head_dim]
        ((emb.cos() * att).to_kind(kind), (emb.sin() * att).to_kind(kind))
    }
}

/// `cat(-x2, x1)` over the last dimension.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// # Shapes
/// - `x`: `[T, heads, head_dim]`, `cos`/`sin`: `[T, head_dim]` → `[T, heads, head_dim]`
pub fn forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
    x * c + rotate_half(x) * s
}

/// Transpose of the rotation: `rotate_half` is the matrix [[0,-I],[I,0]], whose transpose is
/// its negation.
pub fn backward(grad_out: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1));
    grad_out * c - rotate_half(&(grad_out * s))
}
