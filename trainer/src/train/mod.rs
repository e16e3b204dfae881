//! `train run`: the fine-tuning loop a recipe describes, as named steps:
//! 1. [`session::Session::prepare`]: check the recipe, claim the run directory, plan the step
//!    before loading anything (`[plan]`), load the model and tokenizer, attach LoRA, build the
//!    optimizer, restore the newest checkpoint when resuming;
//! 2. the data ([`crate::data::source`]), the evaluation sets ([`evaluate`]), the metrics files
//!    ([`metrics`]) and the activation store with the step's placement;
//! 3. per step: [`step::guarded`] (micro-batches → explicit forward/backward → clip → AdamW,
//!    libtorch failures as errors), its metrics record, the progress line, evaluation and
//!    checkpoints on their schedules;
//! 4. the last evaluation and the export in the Hugging Face layout ([`export`]).
pub mod checkpoints;
pub mod evaluate;
pub mod export;
pub mod metrics;
pub mod optim;
pub mod predictor_fit;
pub mod progress;
pub mod recipe;
pub mod session;
pub mod step;
pub mod tensorboard;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::source::Source;
use crate::error::Result;
use evaluate::EvalSets;
use metrics::Metrics;
use progress::{fmt_secs, Progress};
use session::Session;

pub use session::model_config;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: i64,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub tokens_per_sec: f64,
    pub seconds: f64,
}

/// Runs (or resumes) the recipe at `recipe_path` with `overrides` applied; one rank of a job when
/// `env` says so (rank 0 alone writes metrics, checkpoints and the export, and evaluates).
pub fn run(recipe_path: &Path, overrides: &[String], resume: bool, env: Option<&crate::world::Env>) -> Result<RunSummary> {
    let mut s = Session::prepare(recipe_path, overrides, resume, env)?;
    let main = s.world.is_main();
    let source = Source::from_recipe(&s.recipe, &s.tokens)?;
    let evals = if s.evaluates() { EvalSets::from_recipe(&s.recipe, &s.tokens)? } else { EvalSets::none() };
    let mut metrics = if main { Some(Metrics::open(&s.run_dir, s.recipe.log.tensorboard)?) } else { None };
    let (mut store, placement) = s.activation_store()?;
    let total = s.recipe.train.steps;
    let progress = if main { Progress::new(s.state.step, total, s.recipe.log.every) } else { Progress::quiet() };
    let (start, start_step) = (Instant::now(), s.state.step);
    let (mut tokens_done, mut tokens_per_sec) = (0i64, 0.0);
    for step in s.state.step..total {
        let o = step::guarded(&mut s, &source, &mut store, &placement, step)?;
        tokens_done += o.tokens;
        tokens_per_sec = tokens_done as f64 / start.elapsed().as_secs_f64();
        if let Some(m) = &mut metrics {
            m.emit(metrics::step_record(s.state.step, &o, &store))?;
        }
        let tps = o.tokens as f64 / o.seconds;
        let eta = (total - s.state.step) as f64 * start.elapsed().as_secs_f64() / (s.state.step - start_step) as f64;
        let short = format!("loss {:.4} {tps:.0} tok/s", o.loss);
        let line = format!("step {}/{total} loss {:.4} lr {:.2e} grad_norm {:.3} {tps:.0} tok/s eta {}", s.state.step, o.loss, o.lr, o.grad_norm, fmt_secs(eta));
        progress.step(s.state.step, &line, &short);
        if s.eval_due() {
            evals.run(&s.model, s.state.step, metrics.as_mut(), &progress)?;
        }
        s.checkpoint_if_due()?;
    }
    let last = if s.evaluates() && (s.state.step > start_step || !evals.is_empty()) { evals.run(&s.model, s.state.step, metrics.as_mut(), &progress)? } else { (None, None) };
    progress.finish();
    if main {
        export::final_export(&s.model, &s.run_dir, s.lora.as_ref(), &s.base_name, &s.export_source)?;
    }
    Ok(RunSummary {
        run_dir: s.run_dir,
        steps: s.state.step,
        final_loss: s.state.loss,
        eval_loss: last.0,
        eval_accuracy: last.1,
        tokens_per_sec,
        seconds: start.elapsed().as_secs_f64(),
    })
}
