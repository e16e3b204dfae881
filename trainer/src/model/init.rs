//! Fresh weights for a configuration (training from scratch, benchmarks, tests), initialised as
//! transformers does for these models: normal(0, initializer_range) for matrices and embeddings,
//! ones for norms, zeros for biases.
use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::model::config::ModelConfig;
use crate::error::Result;
use crate::model::{param_specs, Model};

impl Model {
    /// Random model; the same `seed` gives the same weights.
    pub fn init_random(cfg: ModelConfig, std: f64, kind: Kind, device: Device, seed: i64) -> Result<Model> {
        tch::manual_seed(seed);
        let mut named = BTreeMap::new();
        for (name, shape) in param_specs(&cfg) {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(&shape, (Kind::Float, Device::Cpu))
            } else if name.ends_with(".bias") {
                Tensor::zeros(&shape, (Kind::Float, Device::Cpu))
            } else {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * std
            };
            named.insert(name, t.to_kind(kind).to_device(device));
        }
        Model::from_named(cfg, named)
    }
}
