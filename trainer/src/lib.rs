//! The trainer: Hugging Face checkpoints, the decoder with explicit backward, the training loop
//! and the planner wired to recipes.
//!
//! Where to look:
//! - [`model`]: the decoder. `config.json` → [`model::config::ModelConfig`]; weights by HF name
//!   ([`model::weights`]); one layer and the activations it saves ([`model::block::BlockSaved`]);
//!   the whole-model forward + explicit backward, which applies the step's placement
//!   ([`model::Model::forward_backward_with`]); LoRA, initialisation, the autograd reference.
//! - [`data`]: JSONL sources, chat templates and packing; synthetic tasks; tokenizers.
//! - [`train`]: `train run` — the recipe, the loop as named steps, the optimizer, checkpoints,
//!   metrics/TensorBoard, evaluation, export.
//! - [`plan`]: the planner glue — the inventory probed from the block code, calibration, the plan
//!   of a recipe, and the placement the engine runs when no plan decides.
//! - [`guard`]: libtorch failures inside a step as errors naming phase and layer.
//! - [`memory`]: the process's resident set per step, the allocators' settings.
//! - [`eval`] (`train eval`), [`bench`] (`train bench step`).
pub mod bench;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod guard;
pub mod launch;
pub mod memory;
pub mod model;
pub mod plan;
pub mod rng;
pub mod train;
pub mod world;

pub use error::{Result, TrainerError};
