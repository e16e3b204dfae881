//! Everything a run holds from its start to its end, and how it is set up: the recipe checked,
//! the run directory claimed, the step planned before any weight is loaded, the model and its
//! tokenizer, LoRA, the optimizer, and the state of the newest checkpoint when resuming.
use std::path::{Path, PathBuf};

use planner::placement::Placement;

use crate::data::source::Tokens;
use crate::data::{synth, ChatTemplate};
use crate::error::{Result, TrainerError};
use crate::model::config::ModelConfig;
use crate::model::lora::LoraConfig;
use crate::model::Model;
use crate::train::checkpoints::{self, TrainerState};
use crate::train::optim::{AdamW, AdamWConfig, Schedule};
use crate::train::recipe::{Mode, Recipe, Tier};
use crate::world::{Env, World};

pub struct Session {
    pub recipe: Recipe,
    /// The resolved recipe as written into the run directory (and into every checkpoint).
    pub recipe_toml: String,
    pub run_dir: PathBuf,
    pub model: Model,
    pub tokens: Tokens,
    pub lora: Option<LoraConfig>,
    /// The base model's name for a PEFT adapter's config.
    pub base_name: String,
    /// The folder whose config and tokenizer files a full export copies.
    pub export_source: PathBuf,
    pub opt: AdamW,
    pub schedule: Schedule,
    pub state: TrainerState,
    /// The plan's placement when `[plan] apply` (else the engine decides, see [`Session::activation_store`]).
    pub planned: Option<Placement>,
    /// The job's processes (one when alone); rank 0 alone writes the run's files.
    pub world: World,
    /// The recipe's token sparsity, resolved; its layers run sparse from `sparsity.start_step`.
    pub sparsity: Option<std::sync::Arc<crate::model::sparse::Sparsity>>,
}

/// The model's configuration without its weights: the folder's config.json, or `[model.init]`
/// (then also the config.json text to write into the run directory).
pub fn model_config(recipe: &Recipe, recipe_path: &Path) -> Result<(ModelConfig, Option<String>)> {
    match (&recipe.model.path, &recipe.model.init) {
        (Some(path), _) => {
            let (cfg, warnings) = ModelConfig::load(path)?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            Ok((cfg, None))
        }
        (None, Some(init)) => {
            let mut table = init.clone();
            table.insert("vocab_size".into(), toml::Value::Integer(synth::VOCAB.len() as i64));
            table.entry("bos_token_id").or_insert(toml::Value::Integer(1));
            table.entry("eos_token_id").or_insert(toml::Value::Integer(2));
            table.entry("max_position_embeddings").or_insert(toml::Value::Integer(recipe.data.max_tokens.max(2048) as i64));
            let cfg_json = serde_json::to_value(&table).map_err(|e| TrainerError::config(recipe_path, format!("model.init: {e}")))?;
            let cfg_text = serde_json::to_string_pretty(&cfg_json).unwrap_or_default();
            let (cfg, _) = ModelConfig::parse(&cfg_text, &recipe_path.join("[model.init]"))?;
            Ok((cfg, Some(cfg_text)))
        }
        (None, None) => Err(TrainerError::config(recipe_path, "[model] needs `path` or `init`")),
    }
}

/// The `[lora]` section as the model's adapter configuration, in LoRA mode.
pub fn lora_config(recipe: &Recipe) -> Option<LoraConfig> {
    recipe.lora.as_ref().filter(|_| recipe.train.mode == Mode::Lora).map(|l| LoraConfig { rank: l.rank, alpha: l.alpha, dropout: l.dropout, targets: l.targets.clone() })
}

/// Refuses to overwrite a run that has checkpoints (unless resuming); creates the directory and
/// writes the resolved recipe. Returns the existing checkpoints, newest first.
/// `main`: this process writes the run's files (the only process, or rank 0); the other ranks
/// read the checkpoints and write nothing.
fn claim_run_dir(recipe: &Recipe, resume: bool, main: bool) -> Result<(Vec<(i64, PathBuf)>, String)> {
    let run_dir = &recipe.run.dir;
    let existing = checkpoints::list(run_dir);
    if !existing.is_empty() && !resume {
        return Err(TrainerError::Checkpoint {
            path: run_dir.clone(),
            msg: "already holds checkpoints: pass --resume to continue it, or choose another run.dir (nothing was overwritten)".into(),
        });
    }
    let recipe_toml = recipe.to_toml();
    if !main {
        return Ok((existing, recipe_toml));
    }
    std::fs::create_dir_all(run_dir).map_err(TrainerError::io(run_dir))?;
    let resolved = run_dir.join("recipe.toml");
    std::fs::write(&resolved, &recipe_toml).map_err(TrainerError::io(&resolved))?;
    Ok((existing, recipe_toml))
}

/// With a `[plan]` section: plans the step before any weight is loaded, writes plan.txt /
/// plan.json / plan.svg into the run directory, refuses a step that cannot fit (with what
/// would), and returns the plan's placement when `apply`.
fn plan_before_loading(recipe: &Recipe, cfg: &ModelConfig, lora: Option<&LoraConfig>, world: &World) -> Result<Option<(Placement, Option<u64>)>> {
    let (main, ranks) = (world.is_main(), world.size);
    let Some(ps) = &recipe.plan else { return Ok(None) };
    let (inv, plan) = crate::plan::plan_recipe(recipe, cfg, lora, &crate::plan::Request { ranks, ..Default::default() })?;
    if !plan.fits {
        let fit = crate::plan::what_would_fit(recipe, cfg, lora, &inv, &plan, ranks)?;
        if main {
            crate::plan::write(&recipe.run.dir, &inv, &plan, Some(&fit), "")?;
        }
        return Err(crate::plan::refusal(&plan, &fit));
    }
    if !main {
        return Ok(ps.apply.then_some((plan.placement, inv.tile_tokens)));
    }
    crate::plan::write(&recipe.run.dir, &inv, &plan, None, "")?;
    eprintln!(
        "plan: keep_last {}, alpha {:.3}, {}, device peak {} of {}, predicted step {:.2}s (plan.txt in the run directory{})",
        plan.keep_last,
        plan.placement.alpha(0),
        inv.tile_tokens.map_or("whole-sequence blocks".to_string(), |t| format!("token tiles of {t}")),
        planner::plan::human(plan.device_peak),
        planner::plan::human(plan.budgets.device),
        plan.step_seconds,
        if ps.apply { "" } else { "; not applied: [plan] apply = false" }
    );
    Ok(ps.apply.then_some((plan.placement, inv.tile_tokens)))
}

/// The model with its weights (an HF folder, or fresh from `[model.init]`, whose config and
/// tokenizer are written into `run_dir/model`; by the other ranks of a job into a folder of
/// their own), its tokenizer, and the base's name and folder; on `dev`.
fn load_model(recipe: &Recipe, recipe_path: &Path, cfg: ModelConfig, cfg_text: Option<String>, dev: tch::Device, world: &World) -> Result<(Model, Tokens, String, PathBuf)> {
    let kind = recipe.run.dtype.0;
    let (model, tok, tok_path, chat, base_name, source) = match (&recipe.model.path, cfg_text) {
        (Some(path), _) => {
            let tok = crate::data::tokenizer::load(path)?;
            let chat = ChatTemplate::load(path)?;
            let (m, unused) = Model::load(path, cfg, kind, dev)?;
            if !unused.is_empty() {
                eprintln!("warning: {} unused tensor(s) in {}", unused.len(), path.display());
            }
            (m, tok, path.join(crate::data::tokenizer::TOKENIZER_FILE), chat, path.display().to_string(), path.clone())
        }
        (None, Some(cfg_text)) => {
            let model_dir = if world.is_main() { recipe.run.dir.join("model") } else { std::env::temp_dir().join(format!("strata-rank{}-{}", world.rank, std::process::id())) };
            std::fs::create_dir_all(&model_dir).map_err(TrainerError::io(&model_dir))?;
            let cp = model_dir.join("config.json");
            std::fs::write(&cp, &cfg_text).map_err(TrainerError::io(&cp))?;
            let tp = model_dir.join(crate::data::tokenizer::TOKENIZER_FILE);
            std::fs::write(&tp, synth::tokenizer_json().to_string()).map_err(TrainerError::io(&tp))?;
            let tok = crate::data::tokenizer::load(&model_dir)?;
            let m = Model::init_random(cfg, recipe.model.init_std, kind, dev, recipe.run.seed as i64)?;
            (m, tok, tp, None, "strata-from-scratch".to_string(), model_dir)
        }
        (None, None) => return Err(TrainerError::config(recipe_path, "[model] needs `path` or `init`")),
    };
    let eos = model.cfg.eos_token_ids.first().copied();
    Ok((model, Tokens { tok, tok_path, eos, chat }, base_name, source))
}

/// The model a recipe trains, for work that reads it without training it (`train predictor`):
/// its base weights as a run starts (an HF folder, or `[model.init]`'s with the run's seed,
/// written into `run.dir/model`), then, with `from`, a checkpoint's weights (a `step_…`
/// directory, or a run directory's newest complete one; its adapters under LoRA).
pub fn frozen_model(recipe: &Recipe, recipe_path: &Path, from: Option<&Path>) -> Result<(Model, Tokens)> {
    let dev = recipe.run.device.resolve()?;
    let (cfg, cfg_text) = model_config(recipe, recipe_path)?;
    let (mut model, tokens, _, _) = load_model(recipe, recipe_path, cfg, cfg_text, dev, &World::alone())?;
    let Some(from) = from else { return Ok((model, tokens)) };
    if let Some(l) = lora_config(recipe) {
        model.attach_lora(&l, recipe.run.seed as i64 + 1)?;
    }
    let complete = |d: &Path| d.join(checkpoints::DONE).exists();
    let dir = match checkpoints::list(from).into_iter().find(|(_, d)| complete(d)) {
        _ if complete(from) => from.to_path_buf(),
        Some((_, newest)) => newest,
        None => return Err(TrainerError::Checkpoint { path: from.to_path_buf(), msg: "neither a complete checkpoint (no DONE marker) nor a run directory holding one".into() }),
    };
    let mut opt = AdamW::new(AdamWConfig { lr: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    let state = checkpoints::load(&dir, &mut model, &mut opt)?;
    eprintln!("weights of {} (step {})", dir.display(), state.step);
    Ok((model, tokens))
}

/// The state of the newest checkpoint that loads (its weights and optimizer moments restored);
/// step 0 when there is none.
fn resume_from(existing: &[(i64, PathBuf)], recipe: &Recipe, model: &mut Model, opt: &mut AdamW) -> TrainerState {
    for (_, dir) in existing {
        match checkpoints::load(dir, model, opt) {
            Ok(s) => {
                // One write: the ranks of a job share torchrun's stderr, and a line written in
                // pieces interleaves with theirs.
                let line = format!("resuming from {} (step {})\n", dir.display(), s.step);
                let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
                return s;
            }
            Err(e) => eprintln!("warning: skipping checkpoint: {e}"),
        }
    }
    eprintln!("no complete checkpoint in {}: starting from step 0", recipe.run.dir.display());
    TrainerState { step: 0, cursor: 0, optimizer_t: 0, seed: recipe.run.seed, loss: f64::NAN }
}

impl Session {
    /// Sets a run up; nothing is loaded when the recipe, the run directory or the plan refuse.
    ///
    /// With a job environment (`env`: torchrun's or `train launch`'s) it first meets the other
    /// ranks: they must run the same resolved recipe; a restarted job resumes.
    pub fn prepare(recipe_path: &Path, overrides: &[String], resume: bool, env: Option<&Env>) -> Result<Session> {
        let recipe = Recipe::load(recipe_path, overrides)?;
        // cuda:LOCAL_RANK in a job (crate::device).
        let dev = recipe.run.device.resolve()?;
        let world = match env {
            Some(e) => World::join(e, recipe.dist.backend, std::time::Duration::from_secs(recipe.dist.timeout_seconds), dev)?,
            None => World::alone(),
        };
        let sp = recipe.dist.sequence_parallel;
        world.check_sequence_parallel(sp)?;
        // torchrun restarts every rank after a failure: each continues from the newest checkpoint.
        let resume = resume || env.is_some_and(|e| e.restart_count > 0);
        let (existing, recipe_toml) = claim_run_dir(&recipe, resume, world.is_main())?;
        world.check_same("resolved recipe", crc32c::crc32c(recipe_toml.as_bytes()) as u64)?;
        let (cfg, cfg_text) = model_config(&recipe, recipe_path)?;
        if sp > 1 {
            crate::model::seq::kv_copies(cfg.num_heads, cfg.num_kv_heads, sp as i64).map_err(|e| TrainerError::config(recipe_path, format!("dist.sequence_parallel = {sp}: {e}")))?;
        }
        let lora = lora_config(&recipe);
        let planned = plan_before_loading(&recipe, &cfg, lora.as_ref(), &world)?;
        // The process before any weight exists: what a plan after a failure counts as its own.
        crate::plan::baseline_rss();
        let (mut model, tokens, base_name, export_source) = load_model(&recipe, recipe_path, cfg, cfg_text, dev, &world)?;
        if !world.is_main() && recipe.model.path.is_none() {
            // The folder a rank other than 0 wrote its [model.init] config and tokenizer into:
            // loaded now, and it never exports.
            let _ = std::fs::remove_dir_all(&export_source);
        }
        if let Some(l) = &lora {
            model.attach_lora(l, recipe.run.seed as i64 + 1)?;
        }
        // The recipe's tile, else the applied plan's choice, else the whole sequence.
        let tile = match recipe.compute.fixed_tile() {
            Some(t) => t,
            None => planned.as_ref().and_then(|(_, t)| *t),
        };
        model.tile_tokens = tile.map(|t| t as i64);
        model.seq = world.sequence_group(sp)?;
        let mut sparsity = None;
        if let Some(s) = &recipe.sparsity {
            if model.tile_tokens.is_some() {
                return Err(TrainerError::config(recipe_path, "`sparsity`: the plan chose token tiles, which sparse layers do not run yet; set compute.tile_tokens = 0"));
            }
            let resolved = s.resolve_for(&model.cfg, model.kind(), model.device(), &recipe.run.dir).map_err(|e| TrainerError::config(recipe_path, e))?;
            sparsity = Some(std::sync::Arc::new(resolved));
            // After a dense warm-up, the store is placed for dense layers (its peak is theirs);
            // each step decides whether its sparse layers run sparse (`train_step`).
            model.sparsity = sparsity.clone().filter(|_| s.from_the_start());
        }
        let planned = planned.map(|(p, _)| p);
        let t = &recipe.train;
        let mut opt = AdamW::new(AdamWConfig { lr: t.lr, beta1: t.betas[0], beta2: t.betas[1], eps: t.eps, weight_decay: t.weight_decay });
        let schedule = Schedule { lr: t.lr, warmup: t.warmup, total: t.steps, decay: t.schedule, min_lr_ratio: t.min_lr_ratio };
        let state = if resume {
            resume_from(&existing, &recipe, &mut model, &mut opt)
        } else {
            TrainerState { step: 0, cursor: 0, optimizer_t: 0, seed: recipe.run.seed, loss: f64::NAN }
        };
        // Every rank starts from rank 0's trainable weights (the same by construction; this makes
        // it so whatever the ranks' libraries do).
        for (_, p) in model.trainable() {
            world.from_main(&p)?;
        }
        world.check_same("resumed step", state.step as u64)?;
        let run_dir = recipe.run.dir.clone();
        Ok(Session { recipe, recipe_toml, run_dir, model, tokens, lora, base_name, export_source, opt, schedule, state, planned, world, sparsity })
    }

    /// The activation store with the recipe's tiers, and the placement it runs: the plan's when
    /// applied, else the recipe's keep_last and α by the planner's rule.
    pub fn activation_store(&mut self) -> Result<(offload::store::ActivationStore, Placement)> {
        let o = &self.recipe.offload;
        let cuda_device = match self.model.device() {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        let store = offload::store::ActivationStore::new(&o.store_config(cuda_device, self.world.rank))?;
        if o.has(Tier::Numa) {
            let far = offload::numa::nodes()?.iter().any(|n| n.id == o.numa_node && n.is_far());
            eprintln!("numa tier: node {} ({})", o.numa_node, if far { "far memory: no CPUs, e.g. CXL" } else { "a node with CPUs" });
        }
        let placement = match self.planned.take() {
            Some(p) => p,
            None => crate::plan::engine_placement(
                &self.model,
                self.lora.as_ref(),
                self.recipe.train.loss_chunk,
                self.recipe.data.tokens_per_batch as u64,
                o,
                &store,
            )?,
        };
        Ok((store, placement))
    }

    /// Whether an evaluation runs after the step just done (the last one always evaluates after
    /// the loop).
    pub fn eval_due(&self) -> bool {
        let (e, s) = (self.recipe.eval.every, self.state.step);
        self.evaluates() && e > 0 && s % e == 0 && s != self.recipe.train.steps
    }

    /// Whether this rank evaluates: rank 0, and under sequence parallelism the rest of its group
    /// (each evaluates its shard of every sequence; rank 0 reports).
    pub fn evaluates(&self) -> bool {
        self.world.rank < self.recipe.dist.sequence_parallel.max(1)
    }

    /// Saves a checkpoint when one is due after the step just done (and at the last step), then
    /// deletes the oldest beyond `checkpoint.keep_last`.
    pub fn checkpoint_if_due(&self) -> Result<()> {
        let (every, s) = (self.recipe.checkpoint.every, self.state.step);
        if self.world.is_main() && ((every > 0 && s % every == 0) || s == self.recipe.train.steps) {
            checkpoints::save(&self.run_dir, &self.model, &self.opt, &self.state, &self.recipe_toml, self.lora.as_ref())?;
            checkpoints::prune(&self.run_dir, self.recipe.checkpoint.keep_last)?;
        }
        Ok(())
    }

    /// After an out-of-memory: what the plan says would fit, as lines for the error (empty when
    /// even planning fails).
    pub fn what_would_fit(&self) -> String {
        // The probe allocates on the device that just ran out: guarded too.
        match crate::guard::run(|| crate::plan::fit_after_failure(&self.recipe, &self.model.cfg, self.lora.as_ref(), self.model.tile_tokens.map(|t| t as u64), self.world.size)) {
            Ok(Ok(lines)) => lines,
            Ok(Err(e)) => format!("\n  (no plan: {e})"),
            Err(f) => format!("\n  (no plan: the planner's probe failed too: {})", f.message),
        }
    }
}
