//! `train predictor`: fits the learned block scorer ([`crate::model::predictor`]) of a recipe's
//! sparse layers against the exact scorer, the model frozen, on the recipe's training data;
//! measures its recall of the exact choice on batches it was not fitted on (beside the pooled
//! scorer's, and a fresh unfitted predictor's) and writes it where `sparsity.predictor` says.
//!
//! The target is the map the exact scorer ranks blocks by (per document, causal, from the roped
//! q and k), divided per layer by its mean on the first batch (rankings do not depend on that
//! scale). [`Objective::Rank`] (the default) fits the ranking the scorer makes from it;
//! [`Objective::Map`], the reference's, fits the map's entries: on the passkey demo's trained
//! model (400 updates) it recalled 0.36 of the exact choice, below the unfitted paths' 0.44;
//! the ranking objective 0.69.
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::data::source::Source;
use crate::error::{Result, TrainerError};
use crate::model::block::{BlockSaved, Context};
use crate::model::predictor::Predictor;
use crate::model::sparse::{self, LayerInputs, Scorer, Sparsity};
use crate::model::{Batch, Model};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::recipe::Recipe;

/// `train predictor`'s settings.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// AdamW updates.
    pub steps: usize,
    pub lr: f64,
    /// Each path's hidden width.
    pub width: i64,
    /// Each path's output width per slice.
    pub rank: i64,
    /// Batches after the fitted ones on which recall is measured.
    pub held_out: usize,
    /// A checkpoint (or a run directory's newest) whose weights the predictor is fitted for.
    pub from: Option<PathBuf>,
    /// Where the predictor goes instead of the recipe's `sparsity.predictor`.
    pub out: Option<PathBuf>,
    /// Print the loss every this many updates (0: never).
    pub log_every: usize,
    pub objective: Objective,
}

/// What the predictor is fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// The ranking the scorer makes: per document, the softmax of the predicted block scores
    /// (the map made symmetric and summed over the rating query blocks, as the exact scorer
    /// rates) against the exact scores' softmax (ListNet), each score vector divided by its own
    /// spread, over the blocks that may be chosen by score (not the first, not forced).
    Rank,
    /// The reference's: SmoothL1 of the predicted map's causal entries against the exact ones.
    Map,
}

impl Objective {
    pub fn parse(s: &str) -> Option<Objective> {
        match s {
            "rank" => Some(Objective::Rank),
            "map" => Some(Objective::Map),
            _ => None,
        }
    }
}

/// What a fit did.
#[derive(Debug, Clone)]
pub struct FitReport {
    pub path: PathBuf,
    /// Updates taken (a batch with nothing to rank takes none).
    pub updates: usize,
    /// Mean loss of the first and the last tenth of the updates.
    pub first_loss: f64,
    pub last_loss: f64,
    /// The objective on the held-out batches: of the initial (unfitted) paths, of the fitted.
    pub held_loss: (f64, f64),
    /// Per sparse layer on the held-out batches: the fitted predictor's recall of the exact
    /// choice, the pooled scorer's, and an unfitted predictor's (the same initial weights).
    pub recall: Vec<LayerRecall>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct LayerRecall {
    pub layer: usize,
    /// None when the held-out batches had no block to choose by score.
    pub fitted: Option<f64>,
    pub pooled: Option<f64>,
    pub unfitted: Option<f64>,
}

/// The first held-out batch's index.
const HELD_OUT_FROM: u64 = 1 << 30;

/// One document of one sparse layer: its normed input and its exact block map.
struct Example {
    layer: usize,
    /// `[n, hidden]`
    x_norm: Tensor,
    /// `[nb, nb]` causal (zero above the diagonal)
    target: Tensor,
    /// `[nb, 1]` each query block's weight in a block's score (1, or whether it holds targets)
    query_weight: Tensor,
    /// `[r]` int64: the blocks that may be chosen by score (not the first, not forced)
    rated: Tensor,
}

/// Fits the predictor of the recipe at `recipe_path` (with `overrides`) and writes it.
pub fn fit_recipe(recipe_path: &Path, overrides: &[String], opts: &FitOptions) -> Result<FitReport> {
    let recipe = Recipe::load(recipe_path, overrides)?;
    let section = recipe.sparsity.as_ref().ok_or_else(|| TrainerError::config(recipe_path, "`train predictor` fits the scorer of `[sparsity]`'s layers: the recipe has no [sparsity] section"))?;
    if opts.steps == 0 || opts.width <= 0 || opts.rank <= 0 || opts.held_out == 0 || !(opts.lr > 0.0) {
        return Err(TrainerError::config(recipe_path, format!("train predictor: --steps, --width, --rank and --held-out must be positive and --lr above 0 (got {opts:?})")));
    }
    let (model, tokens) = crate::train::session::frozen_model(&recipe, recipe_path, opts.from.as_deref())?;
    let cfg = &model.cfg;
    let rule = section.resolve_with(cfg.num_layers as usize, &cfg.sliding_window, Scorer::Exact).map_err(|e| TrainerError::config(recipe_path, e))?;
    if rule.layers.is_empty() {
        return Err(TrainerError::config(recipe_path, "`sparsity.layers` names no layer: nothing to fit a predictor for"));
    }
    if cfg.hidden_size % cfg.head_dim != 0 {
        return Err(TrainerError::config(recipe_path, format!("the predictor reads the hidden state in head_dim-wide slices: hidden_size {} is not a multiple of head_dim {}", cfg.hidden_size, cfg.head_dim)));
    }
    let path = opts.out.clone().unwrap_or_else(|| section.predictor_path(&recipe.run.dir));
    let source = Source::from_recipe(&recipe, &tokens)?;
    // The data the sparse layers see first: the stage of `sparsity.start_step`.
    let step = section.start_step as i64;
    let mut cursor = 0u64;
    let mut batch = |index: u64| source.batch(&recipe.data, recipe.run.seed, &tokens, step, index, &mut cursor);
    let t0 = Instant::now();
    // The same seed draws the same initial paths again for the unfitted baseline.
    let fresh = || {
        tch::manual_seed(recipe.run.seed as i64);
        Predictor::new(&path, &rule.layers, rule.block, cfg.head_dim, opts.width, opts.rank, (model.kind(), model.device()))
    };
    let p = fresh();
    let mut opt = AdamW::new(AdamWConfig { lr: opts.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    // Per layer, its targets' mean over the first batch that has any (fixed from then on).
    let mut scale: Vec<(usize, f64)> = Vec::new();
    let mut losses = Vec::with_capacity(opts.steps);
    if let Some(n) = source.documents().filter(|&n| n < opts.steps + opts.held_out) {
        eprintln!("warning: {n} training documents for {} fitted and {} held-out batches: the held-out batches come round to documents the predictor was fitted on", opts.steps, opts.held_out);
    }
    for i in 0..opts.steps {
        let examples = examples(&model, &rule, &batch(i as u64)?)?;
        for &l in &rule.layers {
            let mine: Vec<&Tensor> = examples.iter().filter(|e| e.layer == l).map(|e| &e.target).collect();
            if !mine.is_empty() && !scale.iter().any(|(m, _)| *m == l) {
                scale.push((l, mean_causal(mine.into_iter())));
            }
        }
        let loss = fit_loss(&p, &examples, &scale, opts.objective)?;
        let Some(loss) = loss else { continue };
        loss.backward();
        losses.push(loss.double_value(&[]));
        let params = p.parameters();
        let grads = params.iter().map(|(n, t)| (n.clone(), t.grad())).filter(|(_, g)| g.defined()).collect();
        opt.step(&params, &grads, opts.lr);
        for (_, t) in &params {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        if opts.log_every > 0 && (i + 1) % opts.log_every == 0 {
            eprintln!("predictor step {}/{} loss {:.5}", i + 1, opts.steps, losses.last().copied().unwrap_or(f64::NAN));
        }
    }
    if losses.is_empty() {
        return Err(TrainerError::config(recipe_path, format!("train predictor: no document of the recipe's data spans two blocks of {} tokens: nothing to rank", rule.block)));
    }
    let tenth = (losses.len() / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first_loss, last_loss) = (mean(&losses[..tenth]), mean(&losses[losses.len() - tenth..]));
    // Batch indices far past any fit's, so fits of any length are measured on the same batches
    // (synthetic data; file data takes the batches after the fitted ones).
    let held: Vec<Batch> = (0..opts.held_out).map(|j| batch(HELD_OUT_FROM + j as u64)).collect::<Result<_>>()?;
    p.save()?;
    // The objective on the held-out batches, of the fitted paths and of the initial ones.
    let held_loss = {
        let _guard = tch::no_grad_guard();
        let mut ex = Vec::new();
        for b in &held {
            ex.extend(examples(&model, &rule, b)?);
        }
        let value = |q: &Predictor| -> Result<f64> { Ok(fit_loss(q, &ex, &scale, opts.objective)?.map_or(f64::NAN, |t| t.double_value(&[]))) };
        (value(&fresh())?, value(&p)?)
    };
    let (fitted, unfitted) = (Scorer::predictor(p), Scorer::predictor(fresh()));
    let mut counts = vec![[(0u64, 0u64); 3]; rule.layers.len()];
    for b in &held {
        let forced = rule.target_queries.then(|| sparse::target_weights(&b.labels, &crate::model::block::offsets(&b.doc_lens), rule.block)).transpose()?;
        model.visit_layers(b, &mut |l, saved, ctx| {
            let Some(at) = rule.layers.iter().position(|&m| m == l) else { return Ok(()) };
            let inputs = layer_inputs(l, saved, ctx);
            let exact = sparse::scores(&Scorer::Exact, &inputs, &ctx.cu_seqlens, rule.block, forced.as_deref())?;
            for (k, scorer) in [&fitted, &Scorer::Pooled, &unfitted].into_iter().enumerate() {
                let got = sparse::scores(scorer, &inputs, &ctx.cu_seqlens, rule.block, forced.as_deref())?;
                let (h, t) = sparse::recall(&ctx.cu_seqlens, rule.block, rule.keep, &exact, &got, forced.as_deref());
                counts[at][k].0 += h;
                counts[at][k].1 += t;
            }
            Ok(())
        })?;
    }
    let ratio = |(h, t): (u64, u64)| (t > 0).then(|| h as f64 / t as f64);
    let recall = rule.layers.iter().zip(&counts).map(|(&layer, c)| LayerRecall { layer, fitted: ratio(c[0]), pooled: ratio(c[1]), unfitted: ratio(c[2]) }).collect();
    Ok(FitReport { path, updates: losses.len(), first_loss, last_loss, held_loss, recall, seconds: t0.elapsed().as_secs_f64() })
}

/// What a scorer reads of layer `l`'s saved tensors.
fn layer_inputs<'a>(l: usize, saved: &'a BlockSaved, ctx: &Context) -> LayerInputs<'a> {
    LayerInputs { layer: l, x_norm: &saved.x_attn, q: &saved.attn.q, k: &saved.attn.k, scale: ctx.attn[l].scale }
}

/// Every document of `batch` spanning two blocks or more, for each sparse layer of `rule`.
fn examples(model: &Model, rule: &Sparsity, batch: &Batch) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let cu = crate::model::block::offsets(&batch.doc_lens);
    let forced = rule.target_queries.then(|| sparse::target_weights(&batch.labels, &cu, rule.block)).transpose()?;
    let mut first_block = 0usize;
    model.visit_layers(batch, &mut |l, saved, ctx| {
        if !rule.is_sparse(l) {
            return Ok(());
        }
        let at = layer_inputs(l, saved, ctx);
        let acc = kernels::accum_kind(at.q.kind());
        first_block = 0;
        for w in ctx.cu_seqlens.windows(2) {
            let (s, n) = (w[0], w[1] - w[0]);
            let nb = (n + rule.block - 1) / rule.block;
            let doc = first_block..first_block + nb as usize;
            first_block += nb as usize;
            if nb < 2 {
                continue;
            }
            let target = sparse::exact_map(&at.q.narrow(0, s, n).to_kind(acc), &at.k.narrow(0, s, n).to_kind(acc), rule.block, at.scale);
            let w: Vec<f64> = forced.as_ref().map_or(vec![1.0; nb as usize], |f| f[doc.clone()].to_vec());
            let rated: Vec<i64> = (1..nb).filter(|&b| !forced.as_ref().is_some_and(|f| f[doc.start + b as usize] > 0.0)).collect();
            let dev = target.device();
            let query_weight = Tensor::from_slice(&w).to_kind(acc).to_device(dev).unsqueeze(1);
            let rated = Tensor::from_slice(&rated).to_device(dev);
            out.push(Example { layer: l, x_norm: at.x_norm.narrow(0, s, n).copy(), target, query_weight, rated });
        }
        Ok(())
    })?;
    Ok(out)
}

/// The mean of the maps' causal entries (1 when there are none or they are all zero).
fn mean_causal<'a>(maps: impl Iterator<Item = &'a Tensor>) -> f64 {
    let (mut sum, mut n) = (0.0, 0i64);
    for m in maps {
        let nb = m.size()[0];
        sum += m.sum(Kind::Double).double_value(&[]);
        n += nb * (nb + 1) / 2;
    }
    if n == 0 || sum <= 0.0 {
        1.0
    } else {
        sum / n as f64
    }
}

/// One document's loss under `objective` and its weight in its layer's mean (map: its causal
/// entries; rank: its blocks chosen by score); None when it has nothing to rank.
fn example_loss(p: &Predictor, e: &Example, scale: f64, objective: Objective) -> Result<Option<(Tensor, i64)>> {
    let pred = p.map(e.layer, &e.x_norm)?;
    let target = (&e.target / scale).to_kind(pred.kind());
    let nb = pred.size()[0];
    Ok(match objective {
        Objective::Map => {
            let causal = Tensor::ones([nb, nb], (pred.kind(), pred.device())).tril(0);
            Some(((pred.smooth_l1_loss(&target, tch::Reduction::None, 1.0) * causal).sum(pred.kind()), nb * (nb + 1) / 2))
        }
        Objective::Rank if e.rated.size()[0] < 2 => None,
        Objective::Rank => {
            // ListNet: the exact scores' softmax is the distribution the predicted scores' softmax
            // is fitted to, over the blocks that may be chosen by score.
            let score = |m: &Tensor| ((m + m.tr()) * &e.query_weight).sum_dim_intlist(0, false, pred.kind()).index_select(0, &e.rated);
            // Both at their own spread: a ranking does not depend on the scores' scale, and the
            // paths' initial scale (far from the map's) would otherwise dominate the fit.
            let spread = |x: Tensor| &x / x.std(false).clamp_min(1e-12);
            let (got, want) = (spread(score(&pred)), spread(score(&target)).softmax(0, pred.kind()));
            // Each block that may be chosen weighs the same, as in the recall: a long document
            // counts more than a short one (weighing documents alike fitted the many short
            // samples and ranked the long ones' blocks worse).
            let r = e.rated.size()[0];
            Some((-(want * got.log_softmax(0, pred.kind())).sum(pred.kind()) * r as f64, r))
        }
    })
}

/// The sum over layers of each layer's mean [`example_loss`]; None without anything to fit.
fn fit_loss(p: &Predictor, examples: &[Example], scale: &[(usize, f64)], objective: Objective) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for &(l, s) in scale {
        let (mut sum, mut n): (Option<Tensor>, i64) = (None, 0);
        for e in examples.iter().filter(|e| e.layer == l) {
            let Some((err, w)) = example_loss(p, e, s, objective)? else { continue };
            sum = Some(match sum {
                Some(a) => a + err,
                None => err,
            });
            n += w;
        }
        if let Some(sum) = sum {
            let layer = sum / n as f64;
            total = Some(match total {
                Some(t) => t + layer,
                None => layer,
            });
        }
    }
    Ok(total)
}
