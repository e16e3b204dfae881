//! One optimizer step: the step's micro-batches, each through the explicit forward/backward with
//! its activations placed as the step's placement says, gradients accumulated, clipped, AdamW.
//! It runs under [`crate::guard`], so a libtorch failure inside it (a CUDA out-of-memory most
//! often) ends the run with an error that says where, what the device held and what would fit.
use std::time::Instant;

use planner::placement::Placement;
use tch::{Device, Kind};

use crate::data::source::{count_targets, Source};
use crate::error::{Result, TrainerError};
use crate::guard::{self, Failure, Phase};
use crate::model::Grads;
use crate::world::PendingSums;
use crate::train::optim::clip_grad_norm;
use crate::train::session::Session;

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Mean loss over the step's target tokens.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens of the step's micro-batches (all ranks').
    pub tokens: i64,
    pub seconds: f64,
    /// The largest saved-activation bytes of one micro-batch.
    pub saved_peak: usize,
    /// The process's peak resident set during the step.
    pub step_peak_rss: Option<u64>,
    /// On CUDA: the caching allocator's figures, with its allocated and reserved peaks over the
    /// step (what the plan's device peak is checked against).
    pub cuda_memory: Option<dist::cuda_memory::CudaMemory>,
    /// Under sequence parallelism: bytes this rank sent by all-to-all in the step, and seconds.
    pub all_to_all: Option<(u64, f64)>,
    /// Token sparsity: each sparse layer's kept fraction of tokens over this rank's micro-batches.
    pub kept: Vec<(usize, f64)>,
    /// A learned scorer's recall of the exact scorer's choice per sparse layer, on the steps
    /// `sparsity.recall_every` measures (empty on the others).
    pub recall: Vec<(usize, f64)>,
}

/// Step `step` (0-based) of the run; on success the session's state says `step + 1` is done.
pub fn train_step(s: &mut Session, source: &Source, store: &mut offload::store::ActivationStore, placement: &Placement, step: i64) -> Result<StepOutcome> {
    let t0 = Instant::now();
    let step_peak = crate::memory::PhasePeak::start_on(s.model.device());
    let traffic_before = s.model.seq.as_ref().map(|g| g.traffic());
    // Sparse layers run sparse from `sparsity.start_step` on (dense before it: the warm-up).
    s.model.sparsity = s.sparsity.clone().filter(|_| s.recipe.sparsity.as_ref().is_some_and(|r| r.active_at(step)));
    s.model.measure_recall = s.recipe.sparsity.as_ref().is_some_and(|r| r.recall_every > 0 && step % r.recall_every as i64 == 0);
    let recipe = &s.recipe;
    // The step's micro-batches are those one process with grad_accum × data-parallel size would
    // take; a rank builds its data-parallel rank's run of `grad_accum` of them and moves the data
    // cursor past the others' (under sequence parallelism the ranks of one group take the same
    // micro-batches, each its shard of every sequence).
    let (accum, world) = (recipe.train.grad_accum, &s.world);
    let sp = recipe.dist.sequence_parallel;
    let bucket = recipe.dist.bucket_bytes();
    let (dp_rank, dp_size) = world.data_parallel(sp);
    let per_step = accum * dp_size as i64;
    let first = dp_rank as i64 * accum;
    let mut mine = Vec::new();
    for micro in 0..per_step {
        let index = step * per_step + micro;
        if (first..first + accum).contains(&micro) {
            mine.push((index, source.batch(&recipe.data, recipe.run.seed, &s.tokens, step, index as u64, &mut s.state.cursor)?));
        } else {
            source.skip(&recipe.data, recipe.run.seed, &mut s.state.cursor);
        }
    }
    // The objective is the mean over the whole step's target tokens, on every rank. (A rank that
    // failed to build its micro-batch has stopped with its error; the launcher stops the others.)
    let targets: i64 = mine.iter().map(|(_, b)| count_targets(b)).sum();
    let tokens: i64 = mine.iter().map(|(_, b)| b.ids.size()[0]).sum();
    let [total, tokens] = world.sum_step_counts([targets, tokens], sp)?;
    let scale = 1.0 / total.max(1) as f64;
    let last = mine.len().saturating_sub(1);
    // The earlier micro-batches' gradient sums; the last micro-batch adds its own layer by layer
    // and starts each layer's sum across the ranks as soon as its backward is done.
    let mut earlier = Grads::new();
    let mut pending = PendingSums::default();
    let mut loss_sum = 0.0;
    let mut saved_peak = 0usize;
    let mut kept: Vec<(usize, i64, i64)> = Vec::new();
    let mut recall: Vec<(usize, u64, u64)> = Vec::new();
    let (model, loss_chunk) = (&s.model, recipe.train.loss_chunk);
    for (i, (index, b)) in mine.into_iter().enumerate() {
        // Dropout masks (LoRA) come from libtorch's generator: seeded per micro-batch, so a
        // resumed run, or a rank computing this micro-batch, draws what one uninterrupted
        // process drew (with grad_accum 1 the index is the step, as before).
        // The ranks of a sequence-parallel group draw masks for their own shards: apart.
        let shard = s.model.seq.as_ref().map_or(0, |g| g.rank as i64);
        tch::manual_seed((recipe.run.seed as i64).wrapping_mul(1_000_003).wrapping_add(index).wrapping_add(shard.wrapping_mul(7_919_000_011)));
        let (l, stats) = model.forward_backward_hooked(&b, Some(scale), loss_chunk, store, placement, &mut |g| {
            let mut g = g;
            for (n, t) in g.iter_mut() {
                if let Some(prev) = earlier.remove(n) {
                    *t += prev;
                }
            }
            if i < last {
                earlier.extend(g);
                Ok(())
            } else {
                world.start_sum(g, &mut pending, bucket)
            }
        })?;
        loss_sum += l.sum.to_device(Device::Cpu).to_kind(Kind::Double).double_value(&[]);
        saved_peak = saved_peak.max(stats.saved_bytes);
        for (l, rows, of) in stats.kept {
            match kept.iter_mut().find(|(m, _, _)| *m == l) {
                Some((_, k, t)) => (*k, *t) = (*k + rows.size()[0], *t + of),
                None => kept.push((l, rows.size()[0], of)),
            }
        }
        for (l, hits, of) in stats.recall {
            match recall.iter_mut().find(|(m, _, _)| *m == l) {
                Some((_, h, t)) => (*h, *t) = (*h + hits, *t + of),
                None => recall.push((l, hits, of)),
            }
        }
    }
    world.start_sum(earlier, &mut pending, bucket)?;
    guard::enter(Phase::Optimizer, None);
    let mut grads = pending.finish(world)?;
    let loss_sum = world.sum_f64(loss_sum)?;
    let clip = (recipe.train.grad_clip > 0.0).then_some(recipe.train.grad_clip);
    let grad_norm = clip_grad_norm(&mut grads, clip);
    let lr = s.schedule.lr_at(step);
    let params = s.model.trainable();
    s.opt.step(&params, &grads, lr);
    drop(grads);
    let loss = loss_sum / total.max(1) as f64;
    if !loss.is_finite() {
        return Err(TrainerError::Device(format!("step {}: loss is {loss}; stopping (lower train.lr, or check the data)", step + 1)));
    }
    s.state.step = step + 1;
    s.state.optimizer_t = s.opt.t;
    s.state.loss = loss;
    let all_to_all = s.model.seq.as_ref().zip(traffic_before).map(|(g, (b0, s0))| {
        let (b, secs) = g.traffic();
        (b - b0, secs - s0)
    });
    Ok(StepOutcome { loss, lr, grad_norm, tokens, seconds: t0.elapsed().as_secs_f64(), saved_peak, step_peak_rss: step_peak.bytes(), cuda_memory: step_peak.cuda(), all_to_all,
        kept: kept.into_iter().map(|(l, k, t)| (l, k as f64 / t.max(1) as f64)).collect(),
        // A layer whose documents had no block to choose by score has no recall to report.
        recall: recall.into_iter().filter(|&(_, _, t)| t > 0).map(|(l, h, t)| (l, h as f64 / t as f64)).collect(),
    })
}

/// [`train_step`] under the guard: a libtorch failure becomes [`TrainerError::Torch`] with where
/// it happened and, for an out-of-memory, the device's state and what would fit.
pub fn guarded(s: &mut Session, source: &Source, store: &mut offload::store::ActivationStore, placement: &Placement, step: i64) -> Result<StepOutcome> {
    match guard::run(|| train_step(s, source, store, placement, step)) {
        Ok(r) => r,
        Err(f) => Err(failure_error(s, &f, step)),
    }
}

fn failure_error(s: &Session, f: &Failure, step: i64) -> TrainerError {
    if f.internal {
        return TrainerError::Device(format!("internal error in {} of step {} (a bug in strata; please report it): {}", f.place(), step + 1, f.message));
    }
    let mut context = String::new();
    if f.is_out_of_memory() {
        context += &memory_state(s.model.device());
        context += &s.what_would_fit();
    }
    context += &format!(
        "\n  step {} of {} failed; nothing already written was changed: the checkpoints in {} stay (`train run --resume` continues from the newest)",
        step + 1,
        s.recipe.train.steps,
        s.run_dir.display()
    );
    TrainerError::Torch { place: f.place(), message: f.message.clone(), context }
}

/// What the device holds now: on CUDA the driver's free/total (libtorch's own message has what
/// its allocator holds); on CPU the process's peak resident set and the RAM available.
fn memory_state(device: Device) -> String {
    let h = planner::plan::human;
    match device {
        Device::Cuda(i) => match offload::cuda::runtime().map(|rt| rt.memory(i)) {
            Some(Ok((free, total))) => format!("\n  cuda:{i}: {} free of {} (all processes)", h(free), h(total)),
            _ => String::new(),
        },
        _ => format!(
            "\n  this process peaked at {} resident; {} of RAM available now",
            crate::memory::peak_rss_bytes().map_or("?".into(), h),
            crate::plan::mem_available().map_or("?".into(), h)
        ),
    }
}
