//! The planner wired to recipes: budgets from the recipe and the command line, the inventory
//! from the model's code, speeds from calibration; `train plan` prints the result and `train run`
//! refuses a step that cannot fit before it loads a single weight.
pub mod calibrate;
pub mod inventory;
pub mod presets;
pub mod sequence;

use std::path::Path;

use planner::inventory::Inventory;
use planner::placement::{Placement, Tier};
use planner::plan::{human, Budgets, Options, Plan};

use crate::error::{Result, TrainerError};
use crate::model::lora::LoraConfig;
use crate::train::recipe::{Mode, Recipe};

/// What to plan for, beyond the recipe (command-line overrides).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub device_memory: Option<u64>,
    pub host: Option<u64>,
    pub numa: Option<u64>,
    pub nvme: Option<u64>,
    pub tokens: Option<u64>,
    /// Measure speeds again instead of the cached figures.
    pub calibrate: bool,
    pub mip_seconds: Option<f64>,
    /// Processes of the job (0 or 1: one): several sum their gradients in buckets.
    pub ranks: usize,
}

/// RAM the kernel would give this process now (MemAvailable).
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The budgets: command line first, then the recipe ([plan].device_memory, the [offload] tiers'
/// budgets); on CPU the device budget defaults to the RAM available now.
pub fn budgets(recipe: &Recipe, req: &Request) -> Result<Budgets> {
    let dev = recipe.run.device.target()?;
    let o = &recipe.offload;
    let device = match (req.device_memory, recipe.plan.as_ref().map(|p| p.device_memory.0), dev) {
        (Some(b), _, _) | (None, Some(b), _) => b,
        (None, None, tch::Device::Cpu) => mem_available().unwrap_or(0),
        (None, None, _) => return Err(TrainerError::Device("no device budget: pass --device-mem (e.g. 80GiB) or set [plan] device_memory".into())),
    };
    Ok(Budgets {
        device,
        host: req.host.unwrap_or(if o.has(Tier::Host) { o.host_bytes } else { 0 }),
        numa: req.numa.unwrap_or(if o.has(Tier::Numa) { o.numa_bytes } else { 0 }),
        nvme: req.nvme.unwrap_or(if o.has(Tier::Nvme) { o.nvme_bytes } else { 0 }),
    })
}

/// This process's resident set (VmRSS) when first asked: the runtime, its libraries and thread
/// pools, before any tensor of the run exists.
pub fn baseline_rss() -> u64 {
    static AT_START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AT_START.get_or_init(|| crate::memory::rss_bytes().unwrap_or(0))
}

fn options(recipe: &Recipe, req: &Request, tokens: u64) -> Options {
    let apply = recipe.plan.as_ref().is_none_or(|p| p.apply);
    let cpu = recipe.run.device.is_cpu();
    Options {
        tokens,
        // Without tiers the engine keeps every layer whatever keep_last says.
        keep_last: if recipe.offload.tiers.is_empty() { Some(usize::MAX) } else if apply { None } else { Some(recipe.offload.keep_last) },
        lookahead: recipe.offload.lookahead,
        max_inflight: recipe.offload.max_inflight_bytes,
        cpu,
        mip_seconds: req.mip_seconds.or(recipe.plan.as_ref().map(|p| p.mip_seconds)).unwrap_or(2.0),
        allow_recompute: !(recipe.train.mode == Mode::Lora && recipe.lora.as_ref().is_some_and(|l| l.dropout > 0.0)),
        max_alpha: 1.0,
        baseline_bytes: if cpu { baseline_rss() } else { 0 },
    }
}

/// Tiles the plan tries, largest first, when the recipe leaves `compute.tile_tokens` to it.
pub const TILE_CHOICES: [u64; 5] = [16384, 8192, 4096, 2048, 1024];

/// The tile a reach search assumes when the recipe leaves the choice to the plan.
const REACH_TILE: u64 = 8192;

/// Inventory, calibration and plan for the recipe's step. The inventory says the tile planned
/// with (`tile_tokens`): the recipe's `compute.tile_tokens`, or, when it leaves the choice to the
/// plan, the whole sequence if that fits, else the largest of [`TILE_CHOICES`] that fits (the
/// smallest when none does).
pub fn plan_recipe(recipe: &Recipe, cfg: &crate::model::config::ModelConfig, lora: Option<&LoraConfig>, req: &Request) -> Result<(Inventory, Plan)> {
    let dev = recipe.run.device.target()?;
    let kind = recipe.run.dtype.0;
    let sp = recipe.dist.sequence_parallel.max(1);
    let probe = |tile: Option<u64>| recipe_inventory(recipe, cfg, lora, tile, req.ranks);
    let whole = probe(None)?;
    // After the probe (whose tensors are small and gone): it ran libtorch's kernels once, so the
    // thread pools and kernel buffers that every step will hold are in the figure; before the
    // calibration, whose large buffers are not held afterwards.
    baseline_rss();
    let cal = crate::plan::calibrate::load_or_measure(dev, kind, &recipe.offload.nvme_dir, req.calibrate)?;
    // A rank of a sequence-parallel group plans its shard.
    let tokens = crate::model::seq::shard(req.tokens.unwrap_or(recipe.data.tokens_per_batch as u64) as i64, 0, sp).tokens as u64;
    let b = budgets(recipe, req)?;
    let opt = options(recipe, req, tokens);
    let plan_with = |inv: Inventory, mip_seconds: f64| -> Result<(Inventory, Plan)> {
        // Tiles keep the dropout masks, so their recompute is allowed with dropout on.
        let o = Options { mip_seconds, allow_recompute: opt.allow_recompute || inv.tile_tokens.is_some(), ..opt.clone() };
        let plan = planner::plan::plan(&inv, b, &cal, &o).map_err(|e| TrainerError::Device(format!("planner: {e}")))?;
        Ok((inv, plan))
    };
    // Sparse layers run whole sequences.
    let fixed_tile = if recipe.sparsity.is_some() { Some(None) } else { recipe.compute.fixed_tile() };
    match fixed_tile {
        Some(None) => plan_with(whole, opt.mip_seconds),
        Some(Some(tile)) => plan_with(probe(Some(tile))?, opt.mip_seconds),
        None => {
            let (whole, p) = plan_with(whole, opt.mip_seconds)?;
            let tried: Vec<u64> = TILE_CHOICES.into_iter().filter(|&c| c < tokens).collect();
            if p.fits || tried.is_empty() {
                return Ok((whole, p));
            }
            for &tile in &tried {
                // Fit is decided on bytes (greedy layouts); the MIP layouts only for the answer.
                let (inv, p) = plan_with(probe(Some(tile))?, 0.0)?;
                if p.fits {
                    return plan_with(inv, opt.mip_seconds);
                }
            }
            plan_with(probe(tried.last().copied())?, opt.mip_seconds)
        }
    }
}

/// The inventory of the recipe's step over token tiles of `tile` tokens (None: whole sequences):
/// per rank of a sequence-parallel group, with the recipe's token sparsity, for a job of `ranks`
/// processes.
fn recipe_inventory(recipe: &Recipe, cfg: &crate::model::config::ModelConfig, lora: Option<&LoraConfig>, tile: Option<u64>, ranks: usize) -> Result<Inventory> {
    let (dev, kind) = (recipe.run.device.target()?, recipe.run.dtype.0);
    let sp = recipe.dist.sequence_parallel.max(1) as i64;
    let mut inv = crate::plan::inventory::build_sharded(cfg, kind, lora, dev, recipe.train.loss_chunk, tile, sp)?;
    if ranks.max(sp as usize) > 1 {
        inv.statics.extend(crate::plan::inventory::all_reduce_bucket(&inv.statics, cfg.num_layers as u64, recipe.dist.bucket_bytes()));
    }
    if let Some(s) = recipe.sparsity.as_ref().filter(|s| s.scorer == crate::train::recipe::SparseScorer::Predictor) {
        inv.statics.push(crate::plan::inventory::predictor_weights(s, &recipe.run.dir, cfg, kind)?);
    }
    match recipe.sparsity.as_ref().filter(|s| s.from_the_start()) {
        Some(s) => {
            let s = s.resolve_with(cfg.num_layers as usize, &cfg.sliding_window, crate::model::sparse::Scorer::Exact).map_err(|e| TrainerError::Device(format!("recipe: {e}")))?;
            crate::plan::inventory::with_sparsity(inv, cfg, kind, lora, dev, &s)
        }
        None => Ok(inv),
    }
}

/// Writes plan.txt (with `extra` lines at its end), plan.json and plan.svg into `dir`.
pub fn write(dir: &Path, inv: &Inventory, plan: &Plan, fit: Option<&Fit>, extra: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
    let put = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(TrainerError::io(&p))
    };
    let mut text = planner::report::table(inv, plan);
    if let Some(f) = fit {
        text += &f.lines(plan.tokens);
    }
    text += extra;
    put("plan.txt", text)?;
    put("plan.json", serde_json::to_string_pretty(&serde_json::json!({ "inventory": inv, "plan": plan, "fit": fit })).unwrap_or_default())?;
    put("plan.svg", planner::report::svg(plan))?;
    Ok(())
}

/// What would fit, beside the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fit {
    /// The least device memory at the plan's length, every layer offloaded.
    pub least_device_bytes: u64,
    /// True when that needs more NVMe than configured (the configured tiers are too small).
    pub needs_more_nvme: bool,
    /// The longest step (a multiple of 1024 tokens) that fits the budgets; None: not even 1024.
    pub longest_tokens: Option<u64>,
    /// The tile that longest step runs with (None: the whole sequence at once).
    pub longest_tile: Option<u64>,
    /// Ranks each sequence is split over (`longest_tokens` is the whole sequence's).
    pub sequence_parallel: u64,
}

impl Fit {
    /// The report's closing lines (`tokens`: the plan's, per rank under sequence parallelism).
    pub fn lines(&self, tokens: u64) -> String {
        let p = self.sequence_parallel;
        format!(
            "least      device memory for {tokens} tokens{} with every layer offloaded{}: {}\nlongest    step that fits these budgets: {}\n",
            if p > 1 { " per rank" } else { "" },
            if self.needs_more_nvme { " (and an NVMe tier large enough)" } else { "" },
            human(self.least_device_bytes),
            self.longest_tokens.map_or("none (not even 1024 tokens)".to_string(), |t| match (self.longest_tile, p) {
                (tile, p) if p > 1 => format!("{t} tokens ({} on each of {p} ranks, each with these budgets{})", t / p, tile.map_or(String::new(), |t| format!("; compute.tile_tokens = {t}"))),
                (Some(tile), _) => format!("{t} tokens (compute.tile_tokens = {tile})"),
                (None, _) => format!("{t} tokens"),
            })
        )
    }
}

/// The least device memory this step needs (every layer offloaded to the configured tiers, or to
/// an unbounded NVMe tier where those are too small) and the longest step that fits the budgets:
/// with the plan's tile, or with tiles of [`REACH_TILE`] tokens when the recipe leaves the tile to
/// the plan (which takes tiles wherever the whole sequence does not fit).
pub fn what_would_fit(recipe: &Recipe, cfg: &crate::model::config::ModelConfig, lora: Option<&LoraConfig>, inv: &Inventory, plan: &Plan, ranks: usize) -> Result<Fit> {
    let cal = &plan.calibration;
    let req = Request::default();
    let mut opt = options(recipe, &req, plan.tokens);
    opt.mip_seconds = 0.0;
    opt.allow_recompute |= inv.tile_tokens.is_some();
    let b = plan.budgets;
    let big = u64::MAX / 8;
    // Every layer offloaded, the fewest rows stored.
    let at = |budgets: Budgets| planner::plan::plan(inv, budgets, cal, &Options { keep_last: Some(0), max_alpha: 0.0, ..opt.clone() }).map_err(|e| TrainerError::Device(format!("planner: {e}")));
    let configured = at(Budgets { device: big, ..b })?;
    let (least_device_bytes, needs_more_nvme) = if configured.fits {
        (configured.device_peak, false)
    } else {
        let unbounded = if b.host + b.numa + b.nvme == 0 { Budgets { device: big, host: 0, numa: 0, nvme: big } } else { Budgets { device: big, nvme: big, ..b } };
        (at(unbounded)?.device_peak, true)
    };
    let sp = recipe.dist.sequence_parallel.max(1) as u64;
    let reach = match (recipe.compute.fixed_tile(), inv.tile_tokens, &recipe.sparsity) {
        (None, None, None) => Some(recipe_inventory(recipe, cfg, lora, Some(REACH_TILE), ranks)?),
        _ => None,
    };
    let (reach_inv, reach_opt) = match &reach {
        Some(r) => (r, Options { allow_recompute: true, ..opt.clone() }),
        None => (inv, opt.clone()),
    };
    let longest_tokens = planner::plan::longest_fitting(reach_inv, b, cal, &reach_opt, 1024, 1 << 24).map_err(|e| TrainerError::Device(format!("planner: {e}")))?;
    // Below the whole sequence's own reach the plan would not tile.
    let whole_reach = if reach.is_some() { planner::plan::longest_fitting(inv, b, cal, &opt, 1024, 1 << 24).map_err(|e| TrainerError::Device(format!("planner: {e}")))? } else { None };
    let (longest_tokens, longest_tile) = match (longest_tokens, whole_reach) {
        (Some(t), Some(w)) if w >= t => (Some(w), None),
        (None, w @ Some(_)) => (w, None),
        (t, _) => (t, reach_inv.tile_tokens),
    };
    // Per rank's shard, under sequence parallelism: the sequence is `sp` of them.
    let longest_tokens = longest_tokens.map(|t| t * sp);
    Ok(Fit { least_device_bytes, needs_more_nvme, longest_tokens, longest_tile, sequence_parallel: sp })
}

/// The error of a run whose plan does not fit, with what would.
pub fn refusal(plan: &Plan, fit: &Fit) -> TrainerError {
    let longest = match fit.longest_tokens {
        Some(t) => format!("the longest step that fits these budgets is {t} tokens (data.tokens_per_batch)"),
        None => "the longest step that fits these budgets: none (not even 1024 tokens)".into(),
    };
    TrainerError::Device(format!(
        "the plan does not fit ({}): at {} tokens{} the device needs at least {} with every layer offloaded{} (a [plan] device_memory of that or more); {longest}. Nothing was loaded; plan.txt in the run directory has the table.",
        plan.problems.join("; "),
        plan.tokens,
        if fit.sequence_parallel > 1 { " per rank" } else { "" },
        human(fit.least_device_bytes),
        if fit.needs_more_nvme { " and a larger offload.nvme_bytes" } else { "" },
    ))
}

/// What a data-parallel job of `ranks` processes per node holds, beside the one-process plan:
/// every rank holds the plan's device peak on its own GPU and its own tiers (the budgets are per
/// rank), so the node holds `ranks` times the host, NUMA and NVMe peaks; an optimizer step
/// trains on `ranks × grad_accum` micro-batches.
pub fn job_lines(recipe: &Recipe, plan: &Plan, ranks: usize) -> String {
    if ranks <= 1 {
        return String::new();
    }
    let n = ranks as u64;
    let sp = recipe.dist.sequence_parallel.max(1) as u64;
    let accum = recipe.train.grad_accum as u64;
    let holds = format!(
        "each holds the device peak above on its own GPU and its own tiers; this node holds host {}, numa {}, nvme {}",
        human(n * plan.host_peak),
        human(n * plan.numa_peak),
        human(n * plan.nvme_peak)
    );
    // A sequence split over `sp` ranks is at most `sp` shards of the plan's tokens.
    let sequence = plan.tokens * sp;
    match (sp, n % sp, sp % n) {
        (1, _, _) => format!("job        {ranks} processes per node, data parallel: {holds}; an optimizer step trains on {n} × {accum} × {} = {} tokens per node\n", plan.tokens, n * accum * plan.tokens),
        (_, 0, _) => format!(
            "job        {ranks} processes per node, {} data parallel × {sp} sequence parallel: {holds}; an optimizer step trains on {} × {accum} sequences of up to {sequence} tokens per node\n",
            n / sp,
            n / sp
        ),
        (_, _, 0) => format!(
            "job        {ranks} processes per node, each sequence split over {sp} ranks on {} nodes (all-to-alls cross nodes: slower than within one): {holds}; an optimizer step trains on {accum} sequences of up to {sequence} tokens per group\n",
            sp / n
        ),
        _ => format!("job        {ranks} processes per node do not divide into groups of {sp} (dist.sequence_parallel) nor groups into nodes: `train run` refuses a job whose size is not a multiple of it\n"),
    }
}

/// The placement the engine runs when no plan decides: `keep_last` and α from the recipe (or
/// the bench's flags) over the store's tiers, by the planner's own rule
/// ([`planner::placement::from_inventory`]) on an inventory probed from the block code, for the
/// model as it runs (its token tiles change what is stored).
pub fn engine_placement(
    model: &crate::model::Model,
    lora: Option<&LoraConfig>,
    ce_chunk: i64,
    tokens: u64,
    offload: &crate::train::recipe::OffloadSection,
    store: &offload::store::ActivationStore,
) -> Result<Placement> {
    // A sequence-parallel rank places its shard.
    let tokens = model.seq.as_ref().map_or(tokens, |g| g.shard(tokens as i64).tokens as u64);
    if !store.has_tiers() {
        return Ok(Placement::resident(model.cfg.num_layers as usize, tokens));
    }
    let inv = crate::plan::inventory::of_model(model, lora, ce_chunk)?;
    let caps = store.capacities();
    let p = planner::placement::from_inventory(&inv, tokens, offload.keep_last, offload.alpha, offload.lookahead, &caps);
    if p.overflow_bytes > 0 {
        let have: Vec<String> = caps.iter().map(|(t, b)| format!("{} {}", t.name(), human(*b))).collect();
        return Err(TrainerError::Device(format!(
            "offload tiers too small: at {tokens} tokens the {} offloaded layers' saved tensors need {} more than the tiers hold ({}); raise offload.{}_bytes, keep more layers on the device (offload.keep_last) or store fewer rows (offload.alpha)",
            p.offloaded(),
            human(p.overflow_bytes),
            have.join(", "),
            caps.last().map_or("nvme", |(t, _)| t.name()),
        )));
    }
    Ok(p)
}

/// After a step ran out of memory: what `train plan` says about this recipe's step with the
/// device's memory (`[plan] device_memory`, else the GPU's total or the RAM available) as the
/// budget — the least device memory at this length and the longest step that fits. Speeds are
/// the cached calibration or assumed figures (the answer depends on bytes only).
///
/// `tile`: the token tile the step ran with.
pub fn fit_after_failure(recipe: &Recipe, cfg: &crate::model::config::ModelConfig, lora: Option<&LoraConfig>, tile: Option<u64>, ranks: usize) -> Result<String> {
    let dev = recipe.run.device.target()?;
    let kind = recipe.run.dtype.0;
    let device_memory = match (recipe.plan.as_ref(), dev) {
        (Some(p), _) => Some(p.device_memory.0),
        (None, tch::Device::Cuda(i)) => offload::cuda::runtime().and_then(|rt| rt.memory(i).ok()).map(|(_, total)| total),
        (None, _) => None,
    };
    let req = Request { device_memory, ranks, ..Request::default() };
    let sp = recipe.dist.sequence_parallel.max(1);
    let inv = recipe_inventory(recipe, cfg, lora, tile, ranks)?;
    let cal = crate::plan::calibrate::cached_or_assumed(dev, kind);
    let tokens = crate::model::seq::shard(recipe.data.tokens_per_batch as i64, 0, sp).tokens as u64;
    let o = options(recipe, &req, tokens);
    let opt = Options { mip_seconds: 0.0, allow_recompute: o.allow_recompute || tile.is_some(), ..o };
    let plan = planner::plan::plan(&inv, budgets(recipe, &req)?, &cal, &opt).map_err(|e| TrainerError::Device(format!("planner: {e}")))?;
    let fit = what_would_fit(recipe, cfg, lora, &inv, &plan, ranks)?;
    Ok(format!(
        "\n  `train plan` for this step with a device budget of {}: {}; least device memory with every layer offloaded{}: {}; longest step that fits: {}",
        human(plan.budgets.device),
        if plan.fits { format!("fits at a predicted peak of {} (the step held more than planned)", human(plan.device_peak)) } else { format!("does not fit ({})", plan.problems.join("; ")) },
        if fit.needs_more_nvme { " (and more NVMe)" } else { "" },
        human(fit.least_device_bytes),
        fit.longest_tokens.map_or("none (not even 1024 tokens)".to_string(), |t| format!("{t} tokens (data.tokens_per_batch)")),
    ))
}
