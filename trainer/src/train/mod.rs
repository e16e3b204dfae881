//! `train run`: the fine-tuning loop a recipe describes.
//!
//! Order of work: validate the recipe, refuse to overwrite an existing run, write the resolved
//! recipe, build model + tokenizer, attach LoRA, restore the newest complete checkpoint when
//! resuming, then steps of (micro-batches → explicit forward/backward → clip → AdamW), with
//! metrics, evaluation and checkpoints on their schedules, and a final export.
pub mod checkpoints;
pub mod optim;
pub mod recipe;
pub mod tensorboard;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::model::config::ModelConfig;
use crate::data::{pack, ChatTemplate, Encoder, Example};
use crate::error::{Result, TrainerError};
use crate::model::lora::LoraConfig;
use crate::model::{Batch, Model};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig, Decay, Schedule};
use crate::train::recipe::Recipe;
use crate::rng::Rng;
use checkpoints::TrainerState;
use crate::data::synth::{self, Task};
use crate::train::tensorboard::EventWriter;

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

/// Where training documents come from.
enum Source {
    Files { examples: Vec<Example>, shuffle: bool },
    Synth { task: Task, words: Vec<usize>, from_step: Vec<i64>, digits: usize, mix_shorter: bool },
}

struct Ctx {
    recipe: Recipe,
    tok: Tokenizer,
    tok_path: PathBuf,
    eos: Option<i64>,
    chat: Option<ChatTemplate>,
}

impl Ctx {
    fn encoder(&self, max_tokens: usize) -> Encoder<'_> {
        Encoder {
            tok: &self.tok,
            tok_path: self.tok_path.clone(),
            chat: self.chat.clone(),
            eos: self.eos,
            max_tokens,
        }
    }
}

fn synth_example(enc: &Encoder, task: Task, rng: &mut Rng, words: usize, digits: usize) -> Result<Example> {
    let s = synth::sample(task, rng, words, None, digits);
    enc.prompt_completion(&s.prompt, &s.completion)
}

impl Source {
    /// The micro-batch number `index` of the run (step · grad_accum + micro). File data advances
    /// `cursor`; synthetic data is a pure function of (seed, index).
    fn batch(&self, ctx: &Ctx, step: i64, index: u64, cursor: &mut u64) -> Result<Batch> {
        let d = &ctx.recipe.data;
        let budget = d.tokens_per_batch;
        let seed = ctx.recipe.run.seed;
        match self {
            Source::Files { examples, shuffle } => {
                let n = examples.len() as u64;
                let order = |epoch: u64| -> Vec<usize> {
                    let mut v: Vec<usize> = (0..examples.len()).collect();
                    if *shuffle {
                        Rng::derive(seed, 3, epoch).shuffle(&mut v);
                    }
                    v
                };
                let mut picked: Vec<&Example> = Vec::new();
                let mut used = 0usize;
                let mut epoch = u64::MAX;
                let mut perm = Vec::new();
                loop {
                    if *cursor / n != epoch {
                        epoch = *cursor / n;
                        perm = order(epoch);
                    }
                    let e = &examples[perm[(*cursor % n) as usize]];
                    if !picked.is_empty() && used + e.ids.len() > budget {
                        break;
                    }
                    used += e.ids.len();
                    picked.push(e);
                    *cursor += 1;
                    if used >= budget {
                        break;
                    }
                }
                Ok(pack(&picked))
            }
            Source::Synth { task, words, from_step, digits, mix_shorter } => {
                let stage = from_step.iter().rposition(|&s| s <= step).unwrap_or(0);
                let (lo, hi) = (words[0] as f64, words[stage] as f64);
                let enc = ctx.encoder(budget);
                let mut rng = Rng::derive(seed, 1, index);
                let mut picked = Vec::new();
                let mut used = 0;
                loop {
                    // Mixed lengths: log-uniform between the first stage's and this stage's, so
                    // every length seen so far keeps being trained as the context grows.
                    let w = if *mix_shorter { (lo * (hi / lo).powf(rng.unit())).round() as usize } else { hi as usize };
                    let e = synth_example(&enc, *task, &mut rng, w, *digits)?;
                    if !picked.is_empty() && used + e.ids.len() > budget {
                        break;
                    }
                    used += e.ids.len();
                    picked.push(e);
                }
                Ok(pack(&picked.iter().collect::<Vec<_>>()))
            }
        }
    }
}

fn count_targets(b: &Batch) -> i64 {
    b.labels.ne(kernels::cross_entropy::IGNORE_INDEX).sum(Kind::Int64).int64_value(&[])
}

/// Scores of a model on answer-bearing examples.
#[derive(Debug, Clone, Copy)]
pub struct EvalScores {
    /// Mean loss over every target token.
    pub loss: f64,
    /// Fraction of examples whose whole answer is right (teacher-forced argmax over the answer
    /// equals greedy decoding exactly when every answer token is right).
    pub exact: f64,
    /// Fraction of answer tokens predicted right.
    pub token: f64,
}

pub fn eval_synth(model: &Model, examples: &[Example], eos: Option<i64>, chunk: i64) -> Result<EvalScores> {
    let mut correct = 0usize;
    let (mut tok_ok, mut tok_n) = (0usize, 0usize);
    let mut loss_sum = 0.0;
    let mut count = 0i64;
    // A few samples per forward: packed attention keeps them apart.
    for group in examples.chunks(8) {
        let refs: Vec<&Example> = group.iter().collect();
        let b = pack(&refs);
        let (l, pred) = model.loss_and_argmax(&b, chunk)?;
        loss_sum += l.sum.to_device(Device::Cpu).to_kind(Kind::Double).double_value(&[]);
        count += l.count;
        let pred: Vec<i64> = Vec::<i64>::try_from(pred.to_device(Device::Cpu)).unwrap_or_default();
        let mut off = 0usize;
        for e in group {
            let answer: Vec<usize> = (1..e.ids.len()).filter(|&t| e.target[t] && Some(e.ids[t]) != eos).collect();
            let right = answer.iter().filter(|&&t| pred.get(off + t - 1) == Some(&e.ids[t])).count();
            correct += (right == answer.len()) as usize;
            tok_ok += right;
            tok_n += answer.len();
            off += e.ids.len();
        }
    }
    Ok(EvalScores {
        loss: loss_sum / count.max(1) as f64,
        exact: correct as f64 / examples.len().max(1) as f64,
        token: tok_ok as f64 / tok_n.max(1) as f64,
    })
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Runs (or resumes) the recipe at `recipe_path` with `overrides` applied.
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

pub fn run(recipe_path: &Path, overrides: &[String], resume: bool) -> Result<RunSummary> {
    let recipe = Recipe::load(recipe_path, overrides)?;
    let dev = crate::device::parse_device(&recipe.run.device)?;
    let kind = crate::device::parse_dtype(&recipe.run.dtype)?;
    let run_dir = recipe.run.dir.clone();
    let existing = checkpoints::list(&run_dir);
    if !existing.is_empty() && !resume {
        return Err(TrainerError::Checkpoint {
            path: run_dir.clone(),
            msg: "already holds checkpoints: pass --resume to continue it, or choose another run.dir (nothing was overwritten)".into(),
        });
    }
    std::fs::create_dir_all(&run_dir).map_err(TrainerError::io(&run_dir))?;
    let recipe_toml = recipe.to_toml();
    let resolved = run_dir.join("recipe.toml");
    std::fs::write(&resolved, &recipe_toml).map_err(TrainerError::io(&resolved))?;

    // Model and tokenizer.
    let model_dir = run_dir.join("model");
    let (cfg, cfg_text) = model_config(&recipe, recipe_path)?;
    let lora_cfg = recipe.lora.as_ref().filter(|_| recipe.train.mode == "lora").map(|l| LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        targets: l.targets.clone(),
    });
    // The plan decides before any weight is loaded.
    let offload_cfg = &recipe.offload;
    let mut planned: Option<planner::placement::Placement> = None;
    if let Some(ps) = &recipe.plan {
        let (inv, plan) = crate::plan::plan_recipe(&recipe, &cfg, lora_cfg.as_ref(), &crate::plan::Request::default())?;
        if !plan.fits {
            let fit = crate::plan::what_would_fit(&recipe, &inv, &plan)?;
            crate::plan::write(&run_dir, &inv, &plan, Some(&fit))?;
            return Err(crate::plan::refusal(&plan, &fit));
        }
        crate::plan::write(&run_dir, &inv, &plan, None)?;
        eprintln!(
            "plan: keep_last {}, alpha {:.3}, device peak {} of {}, predicted step {:.2}s (plan.txt in the run directory{})",
            plan.keep_last,
            plan.placement.alpha(0),
            planner::plan::human(plan.device_peak),
            planner::plan::human(plan.budgets.device),
            plan.step_seconds,
            if ps.apply { "" } else { "; not applied: [plan] apply = false" }
        );
        if ps.apply {
            planned = Some(plan.placement);
        }
    }
    let (mut model, tok, tok_path, chat, base_name) = match (&recipe.model.path, cfg_text) {
        (Some(path), _) => {
            let tok = crate::data::tokenizer::load(path)?;
            let chat = ChatTemplate::load(path)?;
            let (m, unused) = Model::load(path, cfg, kind, dev)?;
            if !unused.is_empty() {
                eprintln!("warning: {} unused tensor(s) in {}", unused.len(), path.display());
            }
            (m, tok, path.join(crate::data::tokenizer::TOKENIZER_FILE), chat, path.display().to_string())
        }
        (None, Some(cfg_text)) => {
            std::fs::create_dir_all(&model_dir).map_err(TrainerError::io(&model_dir))?;
            let cp = model_dir.join("config.json");
            std::fs::write(&cp, &cfg_text).map_err(TrainerError::io(&cp))?;
            let tp = model_dir.join(crate::data::tokenizer::TOKENIZER_FILE);
            std::fs::write(&tp, synth::tokenizer_json().to_string()).map_err(TrainerError::io(&tp))?;
            let tok = crate::data::tokenizer::load(&model_dir)?;
            let m = Model::init_random(cfg, recipe.model.init_std, kind, dev, recipe.run.seed as i64)?;
            (m, tok, tp, None, "strata-from-scratch".to_string())
        }
        (None, None) => return Err(TrainerError::config(recipe_path, "[model] needs `path` or `init`")),
    };
    let eos = model.cfg.eos_token_ids.first().copied();
    if let Some(l) = &lora_cfg {
        model.attach_lora(l, recipe.run.seed as i64 + 1)?;
    }
    let t = &recipe.train;
    let mut opt = AdamW::new(AdamWConfig { lr: t.lr, beta1: t.betas[0], beta2: t.betas[1], eps: t.eps, weight_decay: t.weight_decay });
    let schedule = Schedule {
        lr: t.lr,
        warmup: t.warmup,
        total: t.steps,
        decay: match t.schedule.as_str() {
            "linear" => Decay::Linear,
            "constant" => Decay::Constant,
            _ => Decay::Cosine,
        },
        min_lr_ratio: t.min_lr_ratio,
    };

    // Resume from the newest checkpoint that loads.
    let mut state = TrainerState { step: 0, cursor: 0, optimizer_t: 0, seed: recipe.run.seed, loss: f64::NAN };
    if resume {
        for (_, dir) in &existing {
            match checkpoints::load(dir, &mut model, &mut opt) {
                Ok(s) => {
                    eprintln!("resuming from {} (step {})", dir.display(), s.step);
                    state = s;
                    break;
                }
                Err(e) => eprintln!("warning: skipping checkpoint: {e}"),
            }
        }
        if state.step == 0 {
            eprintln!("no complete checkpoint in {}: starting from step 0", run_dir.display());
        }
    }

    let ctx = Ctx { recipe: recipe.clone(), tok, tok_path, eos, chat };
    let cap = recipe.data.max_tokens.min(recipe.data.tokens_per_batch);
    let source = match &recipe.data.synth {
        Some(s) => Source::Synth {
            task: Task::parse(&s.task).unwrap_or(Task::Passkey),
            words: s.words.clone(),
            from_step: if s.from_step.is_empty() { vec![0] } else { s.from_step.clone() },
            digits: s.digits,
            mix_shorter: s.mix_shorter,
        },
        None => {
            let enc = ctx.encoder(cap);
            let mut examples = Vec::new();
            for f in &recipe.data.train {
                examples.extend(enc.file(f)?);
            }
            Source::Files { examples, shuffle: recipe.data.shuffle }
        }
    };
    // Evaluation sets are fixed for the whole run.
    let synth_eval: Option<Vec<Example>> = match &recipe.data.synth {
        Some(s) => {
            let words = recipe.eval.words.unwrap_or(*s.words.last().unwrap_or(&128));
            let enc = ctx.encoder(usize::MAX);
            let mut v = Vec::new();
            for i in 0..recipe.eval.samples {
                let mut rng = Rng::derive(recipe.run.seed, 2, i as u64);
                v.push(synth_example(&enc, Task::parse(&s.task).unwrap_or(Task::Passkey), &mut rng, words, s.digits)?);
            }
            Some(v)
        }
        None => None,
    };
    let file_eval: Option<Vec<Example>> = match &recipe.eval.data {
        Some(p) => Some(ctx.encoder(cap).file(p)?),
        None => None,
    };

    let mut tb = if recipe.log.tensorboard { Some(EventWriter::create(&run_dir.join("tb"))?) } else { None };
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(TrainerError::io(&metrics_path))?;
    // A killed run may have left half a line: end it, so the next record starts clean. Readers
    // take the last record of a step (a resumed run repeats the steps after its checkpoint).
    let last_byte = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&metrics_path).map_err(TrainerError::io(&metrics_path))?;
        let mut b = [b'\n'];
        if f.seek(SeekFrom::End(-1)).is_ok() {
            f.read_exact(&mut b).map_err(TrainerError::io(&metrics_path))?;
        }
        b[0]
    };
    if last_byte != b'\n' {
        metrics.write_all(b"\n").map_err(TrainerError::io(&metrics_path))?;
    }
    let mut emit = |v: serde_json::Value, tb: &mut Option<EventWriter>| -> Result<()> {
        // One write per record, so a kill leaves whole lines or one partial last line.
        metrics.write_all(format!("{v}\n").as_bytes()).map_err(TrainerError::io(&metrics_path))?;
        if let (Some(w), Some(obj)) = (tb.as_mut(), v.as_object()) {
            let step = obj.get("step").and_then(|s| s.as_i64()).unwrap_or(0);
            let scalars: Vec<(&str, f64)> = obj.iter().filter(|(k, _)| k.contains('/')).filter_map(|(k, v)| v.as_f64().map(|f| (k.as_str(), f))).collect();
            w.scalars(step, &scalars)?;
        }
        Ok(())
    };

    let evaluate = |model: &Model, step: i64, tb: &mut Option<EventWriter>, emit: &mut dyn FnMut(serde_json::Value, &mut Option<EventWriter>) -> Result<()>| -> Result<(Option<f64>, Option<f64>)> {
        let mut loss = None;
        let mut scores = None;
        if let Some(ex) = &synth_eval {
            let s = eval_synth(model, ex, eos, recipe.train.loss_chunk)?;
            loss = Some(s.loss);
            scores = Some(s);
        }
        if let Some(ex) = &file_eval {
            loss = Some(eval_synth(model, ex, None, recipe.train.loss_chunk)?.loss);
        }
        if loss.is_some() {
            let mut v = json!({"step": step, "eval/loss": loss});
            if let Some(s) = scores {
                v["eval/accuracy"] = json!(s.exact);
                v["eval/token_accuracy"] = json!(s.token);
            }
            eprintln!(
                "eval step {step}: loss {:.4}{}",
                loss.unwrap_or(f64::NAN),
                scores.map(|s| format!(" exact-match accuracy {:.1}% (answer tokens {:.1}%)", 100.0 * s.exact, 100.0 * s.token)).unwrap_or_default()
            );
            emit(v, tb)?;
        }
        Ok((loss, scores.map(|s| s.exact)))
    };

    let cuda_device = match model.device() {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let mut store = offload::store::ActivationStore::new(&offload_cfg.store_config(cuda_device))?;
    if offload_cfg.tiers.iter().any(|t| t == "numa") {
        let far = offload::numa::nodes()?.iter().any(|n| n.id == offload_cfg.numa_node && n.is_far());
        eprintln!("numa tier: node {} ({})", offload_cfg.numa_node, if far { "far memory: no CPUs, e.g. CXL" } else { "a node with CPUs" });
    }
    // Who decides where each saved tensor lives: the plan when applied, else the recipe's
    // keep_last and α by the same rule. The model applies it and the store executes it.
    let placement = match planned {
        Some(p) => p,
        None => crate::plan::engine_placement(&model.cfg, kind, lora_cfg.as_ref(), dev, recipe.train.loss_chunk, recipe.data.tokens_per_batch as u64, offload_cfg, &store)?,
    };
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let start_step = state.step;
    let mut tokens_done = 0i64;
    let mut last = (None, None);
    let mut last_tps = 0.0;
    let accum = recipe.train.grad_accum;
    for step in state.step..recipe.train.steps {
        let t0 = Instant::now();
        let step_peak = crate::memory::PhasePeak::start();
        // Dropout masks (LoRA) come from libtorch's generator: seed it per step so a resumed run
        // draws what the uninterrupted run drew.
        tch::manual_seed((recipe.run.seed as i64).wrapping_mul(1_000_003).wrapping_add(step));
        let mut batches = Vec::new();
        for micro in 0..accum {
            batches.push(source.batch(&ctx, step, (step * accum + micro) as u64, &mut state.cursor)?);
        }
        let total: i64 = batches.iter().map(count_targets).sum();
        let scale = 1.0 / total.max(1) as f64;
        let mut grads = crate::model::Grads::new();
        let mut loss_sum = 0.0;
        let mut saved_peak = 0usize;
        let mut step_tokens = 0i64;
        for b in &batches {
            let (l, g, stats) = model.forward_backward_with(b, Some(scale), recipe.train.loss_chunk, &mut store, &placement)?;
            loss_sum += l.sum.to_device(Device::Cpu).to_kind(Kind::Double).double_value(&[]);
            saved_peak = saved_peak.max(stats.saved_bytes);
            step_tokens += b.ids.size()[0];
            for (n, gr) in g {
                match grads.get_mut(&n) {
                    Some(acc) => *acc += gr,
                    None => {
                        grads.insert(n, gr);
                    }
                }
            }
        }
        let clip = (recipe.train.grad_clip > 0.0).then_some(recipe.train.grad_clip);
        let grad_norm = clip_grad_norm(&mut grads, clip);
        let lr = schedule.lr_at(step);
        let params = model.trainable();
        opt.step(&params, &grads, lr);
        drop(grads);
        let loss = loss_sum / total.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainerError::Device(format!("step {}: loss is {loss}; stopping (lower train.lr, or check the data)", step + 1)));
        }
        state.step = step + 1;
        state.optimizer_t = opt.t;
        state.loss = loss;
        tokens_done += step_tokens;
        let dt = t0.elapsed().as_secs_f64();
        let tps = step_tokens as f64 / dt;
        last_tps = tokens_done as f64 / start.elapsed().as_secs_f64();
        let eta = (recipe.train.steps - state.step) as f64 * start.elapsed().as_secs_f64() / (state.step - start_step) as f64;
        let mut m = json!({
            "step": state.step, "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens_per_sec": tps, "train/tokens": step_tokens,
            "memory/activations_bytes": saved_peak as f64,
        });
        // The step's own peak (from the step's start to its optimizer update) and the run's.
        if let Some(rss) = step_peak.bytes() {
            m["memory/step_peak_rss_bytes"] = json!(rss as f64);
        }
        if let Some(rss) = crate::memory::peak_rss_bytes() {
            m["memory/host_peak_rss_bytes"] = json!(rss as f64);
        }
        if store.has_tiers() {
            let st = store.stats();
            for (tier, _) in store.capacities() {
                let peak = match tier {
                    offload::store::Tier::Host => st.host_peak_bytes,
                    offload::store::Tier::Numa => st.numa_peak_bytes,
                    _ => st.nvme_peak_bytes,
                };
                m[format!("memory/{}_peak_bytes", tier.name())] = json!(peak as f64);
            }
            m["offload/written_bytes"] = json!(st.written_bytes as f64);
            m["offload/read_bytes"] = json!(st.read_bytes as f64);
            m["offload/io_seconds"] = json!(st.write_seconds + st.read_seconds);
            m["offload/stall_seconds"] = json!(st.stall_seconds);
        }
        emit(m, &mut tb)?;
        let line = format!("step {}/{} loss {loss:.4} lr {lr:.2e} grad_norm {grad_norm:.3} {tps:.0} tok/s eta {}", state.step, recipe.train.steps, fmt_secs(eta));
        if tty {
            eprint!("\r{line}   ");
        }
        if state.step % recipe.log.every == 0 || state.step == recipe.train.steps {
            if tty {
                eprintln!();
            } else {
                eprintln!("{line}");
            }
        }
        if recipe.eval.every > 0 && state.step % recipe.eval.every == 0 && state.step != recipe.train.steps {
            evaluate(&model, state.step, &mut tb, &mut emit)?;
        }
        let ck = recipe.checkpoint.every;
        if (ck > 0 && state.step % ck == 0) || state.step == recipe.train.steps {
            checkpoints::save(&run_dir, &model, &opt, &state, &recipe_toml, lora_cfg.as_ref())?;
            checkpoints::prune(&run_dir, recipe.checkpoint.keep_last)?;
        }
    }
    if state.step > start_step || synth_eval.is_some() || file_eval.is_some() {
        last = evaluate(&model, state.step, &mut tb, &mut emit)?;
    }
    // Export in the layout the Hugging Face stack loads.
    let final_dir = run_dir.join("final");
    match &lora_cfg {
        Some(l) => model.save_peft_adapter(&final_dir, l, &base_name)?,
        None => export_hf(&model, &final_dir, recipe.model.path.as_deref().unwrap_or(&model_dir))?,
    }
    Ok(RunSummary {
        run_dir,
        steps: state.step,
        final_loss: state.loss,
        eval_loss: last.0,
        eval_accuracy: last.1,
        tokens_per_sec: last_tps,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A full model as an HF folder: config.json and tokenizer files copied from the source folder,
/// weights in `model.safetensors`.
pub fn export_hf(model: &Model, dir: &Path, source: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"] {
        let src = source.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).map_err(TrainerError::io(&src))?;
        }
    }
    let tensors: Vec<(String, Tensor)> = model.named_parameters().into_iter().map(|(n, t)| (n, t.shallow_clone())).collect();
    crate::model::weights::write_safetensors(&dir.join("model.safetensors"), &tensors)
}
