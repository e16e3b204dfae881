//! The trainer: Hugging Face checkpoints, the decoder with explicit backward, evaluation.
//!
//! Where to look:
//! - [`config`]: `config.json` → validated [`config::ModelConfig`]
//! - [`checkpoint`]: safetensors (single or sharded), memory-mapped
//! - [`model`]: parameters by HF name, whole-model forward + explicit backward
//! - [`block`]: one decoder layer and the activations it saves ([`block::BlockSaved`])
//! - [`reference`]: the autograd reference the tests compare against
//! - [`eval`]: `train eval`
//! - [`memory`]: the process's resident set per step, the CPU allocator's settings
pub mod bench;
pub mod calibrate;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod init;
pub mod inventory;
pub mod lora;
pub mod memory;
pub mod model;
pub mod optim;
pub mod plan_run;
pub mod recipe;
pub mod rng;
pub mod run;
pub mod run_state;
pub mod synth;
pub mod tensorboard;
pub mod reference;
pub mod tokenizer;

pub use error::{Result, TrainerError};
