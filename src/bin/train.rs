//! `train`: the strata command line.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trainer::model::config::ModelConfig;
use trainer::model::Model;
use trainer::data::tokenizer;
use trainer::{device, eval};

/// jemalloc serves every allocation of the process, libtorch's tensors included: freed memory is
/// reused by the next step instead of fragmenting glibc's heap (`trainer::memory` has the
/// measurements behind this choice).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start-up (`MALLOC_CONF` in the environment is read after them
/// and wins): no separate arena that returns every large block at once, and freed pages given back
/// to the kernel within about 5 s, so a run's resident set stays at what the plan predicts.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8; 68] = b"narenas:1,oversize_threshold:0,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

#[cfg(feature = "jemalloc")]
extern "C" {
    /// jemalloc's control interface (the unprefixed symbol tikv-jemallocator links in).
    fn mallctl(name: *const std::ffi::c_char, oldp: *mut std::ffi::c_void, oldlenp: *mut usize, newp: *mut std::ffi::c_void, newlen: usize) -> std::ffi::c_int;
}

/// Returns every arena's unused dirty pages to the kernel now (`arena.<MALLCTL_ARENAS_ALL>.purge`):
/// at the start of each step (`trainer::memory::PhasePeak`), so the step starts from live memory.
#[cfg(feature = "jemalloc")]
fn purge_freed_pages() {
    // SAFETY: a NUL-terminated control name and no old or new value: the documented call form of
    // a purge; jemalloc is this process's malloc.
    unsafe {
        mallctl(c"arena.4096.purge".as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0);
    }
}

#[derive(Parser)]
#[command(name = "train", version, about = "Long-context fine-tuning with explicit activation placement")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mean next-token loss and perplexity of a Hugging Face model folder over JSONL files of
    /// {"text": ...} lines (one result per file).
    Eval {
        /// Folder with config.json, model.safetensors (or a sharded index) and tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter folder to apply on top (e.g. a run's final/).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSONL file(s), one {"text": ...} object per line.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Truncate each document to this many tokens.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// cpu, cuda or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Compute dtype: float32, float64, bfloat16, float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Tokens per chunk of the fused LM-head + cross-entropy (the [chunk, vocab] logits are
        /// the largest transient of the loss).
        #[arg(long, default_value_t = 1024)]
        loss_chunk: i64,
        /// One JSON object per file instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune as a recipe says. Overrides use the recipe's dotted key paths:
    /// `train run --recipe r.toml train.lr=3e-4 run.dir=runs/b`.
    Run {
        #[arg(long)]
        recipe: PathBuf,
        /// Continue from the newest complete checkpoint in run.dir.
        #[arg(long)]
        resume: bool,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Fit the learned block scorer of the recipe's sparse layers (`[sparsity]`, scorer
    /// "predictor") against the exact scorer, the model frozen, on the recipe's training data;
    /// print its recall of the exact choice on held-out batches and write it to
    /// `sparsity.predictor` (default: run.dir/predictor.safetensors).
    Predictor {
        #[arg(long)]
        recipe: PathBuf,
        /// The weights to fit for: a checkpoint directory, or a run directory (its newest
        /// complete checkpoint). Default: the recipe's base model as a run starts.
        #[arg(long)]
        from: Option<PathBuf>,
        /// AdamW updates, one batch each.
        #[arg(long, default_value_t = 400)]
        steps: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Hidden width of each path (query and key MLP).
        #[arg(long, default_value_t = trainer::model::predictor::DEFAULT_WIDTH)]
        width: i64,
        /// Output width of each path per head-wide slice of the hidden state.
        #[arg(long, default_value_t = trainer::model::predictor::DEFAULT_RANK)]
        rank: i64,
        /// Batches after the fitted ones on which recall is measured.
        #[arg(long, default_value_t = 8)]
        held_out: usize,
        /// Write here instead of `sparsity.predictor`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// "rank" (fit the block ranking the scorer makes: ListNet on the block scores) or "map"
        /// (the reference's: SmoothL1 on the block map's entries).
        #[arg(long, default_value = "rank")]
        objective: String,
        /// key.path=value overrides.
        overrides: Vec<String>,
    },
    /// Start this node's processes of a multi-process job, as torchrun does (same environment
    /// contract): `train launch --nproc-per-node 2 -- run --recipe r.toml`. Output lines carry a
    /// `[rank N]` prefix; when one rank fails the others are stopped and the rank is named.
    Launch {
        /// Processes on this node (one per GPU).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Nodes of the job.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This node's index in 0..nnodes.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        /// Address of node 0, which hosts the rendezvous store (default 127.0.0.1; required with
        /// several nodes).
        #[arg(long)]
        master_addr: Option<String>,
        /// Port of the rendezvous store (default: a free one; required with several nodes).
        #[arg(long)]
        master_port: Option<u16>,
        /// The `train` command each rank runs, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Plan a recipe's step before running it: every buffer class with shape formula and bytes,
    /// where each layer's activations wait, per-tier peaks, predicted step time, buffer layouts,
    /// and the longest step that fits. Writes plan.txt, plan.json and plan.svg.
    Plan {
        #[arg(long)]
        recipe: PathBuf,
        /// Compute-device memory, e.g. 80GiB (default: [plan] device_memory; on CPU the RAM
        /// available now).
        #[arg(long)]
        device_mem: Option<String>,
        /// Host-tier budget (default: offload.host_bytes when "host" is among offload.tiers).
        #[arg(long)]
        host_mem: Option<String>,
        /// NUMA-tier budget (default: offload.numa_bytes when "numa" is among offload.tiers).
        #[arg(long)]
        numa_mem: Option<String>,
        /// NVMe-tier budget (default: offload.nvme_bytes when "nvme" is among offload.tiers).
        #[arg(long)]
        nvme: Option<String>,
        /// Tokens per step (default: data.tokens_per_batch).
        #[arg(long)]
        tokens: Option<u64>,
        /// Measure this machine's speeds again (cached per device and dtype).
        #[arg(long)]
        calibrate: bool,
        /// Seconds each layout MIP may take (default: [plan] mip_seconds or 2).
        #[arg(long)]
        mip_seconds: Option<f64>,
        /// Directory for plan.txt / plan.json / plan.svg (default: run.dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Plan for this model instead of the recipe's: a config.json, a model folder, or a
        /// preset (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, mistral-7b-v0.3); nothing is
        /// downloaded or loaded.
        #[arg(long)]
        model_config: Option<String>,
        /// Token tiles of this many tokens (compute.tile_tokens; 0: the whole sequence; default:
        /// the recipe's, else the plan's choice).
        #[arg(long)]
        tile_tokens: Option<u64>,
        /// Processes per node of a data-parallel job (`train launch` / torchrun's
        /// --nproc-per-node): each holds what one process does; the node's totals are printed.
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Ranks each sequence is split over (dist.sequence_parallel): the plan is one rank's,
        /// with the all-to-alls' bytes and time and the job's MFU.
        #[arg(long)]
        sequence_parallel: Option<usize>,
        /// One rank's all-to-all send rate in GB/s for the sequence-parallel exchanges (default:
        /// 300 on CUDA, NVLink within a node; 1 on CPU, Gloo over loopback).
        #[arg(long)]
        all_to_all_gbps: Option<f64>,
        /// Peak dense TFLOP/s of one device for MFU (default on CUDA: 989, an H100 SXM in bf16).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// key.path=value recipe overrides.
        overrides: Vec<String>,
    },
    /// Data tools.
    #[command(subcommand)]
    Data(DataCmd),
    /// Benchmarks (numbers to read, not pass/fail).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum DataCmd {
    /// Write synthetic long-context retrieval samples as prompt/completion JSONL.
    Synth {
        /// passkey | kv-recall
        #[arg(long)]
        task: String,
        /// Sample length in words (one token each with the built-in tokenizer).
        #[arg(long)]
        tokens: usize,
        #[arg(long, default_value_t = 100)]
        samples: usize,
        /// Where the answer sits, 0 (start) to 1 (end); random when absent.
        #[arg(long)]
        depth: Option<f64>,
        #[arg(long, default_value_t = 5)]
        digits: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// What a recipe's data will train: the first examples with trained tokens marked (green in a
    /// terminal, [[...]] otherwise), tokens and trained share per example, truncation, packing.
    Inspect {
        #[arg(long)]
        recipe: PathBuf,
        /// Examples to show.
        #[arg(long, default_value_t = 3)]
        n: usize,
        /// key.path=value recipe overrides
        overrides: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Bandwidth of each offload tier through the engine's own path, beside the raw figure of
    /// the same memory or disk (memcpy; libtorch's pinned copy on CUDA; plain O_DIRECT I/O).
    Offload {
        /// Tiers to measure, comma-separated: host, numa (every node with memory), nvme.
        #[arg(long, default_value = "host,numa,nvme")]
        tiers: String,
        /// Directory on the disk to measure (default: the temporary directory).
        #[arg(long)]
        nvme_dir: Option<PathBuf>,
        /// Where the tensors live: cpu, or cuda (then host/numa copies are device↔host).
        #[arg(long, default_value = "auto")]
        device: String,
        /// Bytes to move each way.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Bytes per slice (one saved tensor).
        #[arg(long, default_value_t = 64 << 20)]
        slice_bytes: u64,
        /// false: the pread/pwrite engine.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        io_uring: bool,
    },
    /// All-reduce bandwidth of the job's process group (run it under `train launch` or
    /// torchrun): float32 tensors of `--bytes`, summed `--iters` times after a warm-up.
    Allreduce {
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// One forward + explicit backward of a Llama-shaped model with random weights.
    Step {
        #[arg(long, default_value_t = 8)]
        layers: i64,
        #[arg(long, default_value_t = 512)]
        hidden: i64,
        #[arg(long, default_value_t = 8)]
        heads: i64,
        #[arg(long, default_value_t = 4)]
        kv_heads: i64,
        #[arg(long, default_value_t = 1376)]
        intermediate: i64,
        #[arg(long, default_value_t = 32000)]
        vocab: i64,
        #[arg(long, default_value_t = 4096)]
        tokens: i64,
        /// Iterations measured after the first; their median time and their largest peak RSS
        /// (the steady state) are reported beside the first iteration's peak.
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Offload tiers, comma-separated from host, numa, nvme (default: keep everything; nvme
        /// when --nvme-dir is given). Each gets a budget of 5/4 of the step's saved activations.
        #[arg(long, default_value = "")]
        tiers: String,
        /// Directory of the NVMe tier's file.
        #[arg(long)]
        nvme_dir: Option<PathBuf>,
        /// With offload: the last k layers keep their activations.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// With offload: fraction of tokens whose recomputable activations are stored.
        #[arg(long, default_value_t = 1.0)]
        alpha: f64,
        /// Token tiles of this many tokens inside each block (0: the whole sequence).
        #[arg(long, default_value_t = 0)]
        tile_tokens: i64,
        /// Token sparsity: the fraction of blocks sparse layers keep (0: every layer dense).
        #[arg(long, default_value_t = 0.0)]
        sparse_keep: f64,
        /// Token sparsity: tokens per block.
        #[arg(long, default_value_t = 64)]
        sparse_block: i64,
        /// Token sparsity: the sparse layers, "upper" (dense in the first half and the last) or
        /// comma-separated indices.
        #[arg(long, default_value = "upper")]
        sparse_layers: String,
        /// Token sparsity: "exact" or "pooled".
        #[arg(long, default_value = "exact")]
        sparse_scorer: String,
        /// MLP channel sparsity: the fraction of intermediate channels saved (1: all).
        #[arg(long, default_value_t = 1.0)]
        sparse_mlp_keep: f64,
        /// MLP channel sparsity: its layers, "all", "upper" or comma-separated indices.
        #[arg(long, default_value = "all")]
        sparse_mlp_layers: String,
    },
}

/// `train eval`: loss and perplexity of a model folder (with an adapter) over JSONL files.
#[allow(clippy::too_many_arguments)]
fn eval_cmd(model: PathBuf, adapter: Option<PathBuf>, data: Vec<PathBuf>, max_tokens: Option<usize>, device: String, dtype: String, loss_chunk: i64, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let dev = device::parse_device(&device)?;
    let kind = device::parse_dtype(&dtype)?;
    if loss_chunk <= 0 {
        return Err(format!("--loss-chunk must be positive, found {loss_chunk}").into());
    }
    let (cfg, warnings) = ModelConfig::load(&model)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let tok = tokenizer::load(&model)?;
    let (mut m, unused) = Model::load(&model, cfg, kind, dev)?;
    if let Some(a) = &adapter {
        m.load_peft_adapter(a)?;
    }
    if !unused.is_empty() {
        eprintln!("warning: {}: {} tensor(s) in the checkpoint are not used: {}", model.display(), unused.len(), unused.join(", "));
    }
    let tok_path = model.join(tokenizer::TOKENIZER_FILE);
    for file in &data {
        let r = eval::eval_file(&m, &tok, &tok_path, file, max_tokens, loss_chunk)?;
        if json {
            let v = serde_json::json!({
                "file": r.file.display().to_string(),
                "loss": r.loss,
                "perplexity": r.perplexity,
                "tokens": r.tokens,
                "sequences": r.sequences,
                "device": format!("{dev:?}"),
                "dtype": dtype,
            });
            println!("{v}");
        } else {
            println!(
                "{}: loss {:.6} perplexity {:.4} ({} tokens predicted in {} sequences)",
                r.file.display(),
                r.loss,
                r.perplexity,
                r.tokens,
                r.sequences
            );
        }
    }
    Ok(())
}

/// `train predictor`: fits, then prints the loss and each layer's recall beside the baselines.
fn predictor_cmd(recipe: &Path, overrides: &[String], opts: &trainer::train::predictor_fit::FitOptions) -> Result<(), Box<dyn std::error::Error>> {
    let r = trainer::train::predictor_fit::fit_recipe(recipe, overrides, opts)?;
    println!("predictor: {} updates in {:.1} s, loss {:.5} -> {:.5} (first and last tenth of the updates)", r.updates, r.seconds, r.first_loss, r.last_loss);
    println!("held-out loss: {:.5} unfitted -> {:.5} fitted", r.held_loss.0, r.held_loss.1);
    println!("recall of the exact scorer's choice on {} held-out batches:", opts.held_out);
    for l in &r.recall {
        let f = |r: Option<f64>| r.map_or("n/a (no block to choose)".to_string(), |r| format!("{r:.3}"));
        println!("  layer {}: predictor {} (pooled {}, unfitted {})", l.layer, f(l.fitted), f(l.pooled), f(l.unfitted));
    }
    println!("wrote {} (sparsity.scorer = \"predictor\" reads it)", r.path.display());
    Ok(())
}

/// `train run`: trains a recipe and prints the summary.
fn run_cmd(recipe: PathBuf, resume: bool, overrides: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    // One rank of a job when torchrun or `train launch` says so (WORLD_SIZE and the rest).
    let env = trainer::world::Env::from_process()?;
    let s = match trainer::train::run(&recipe, &overrides, resume, env.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            // torchrun reads a failing rank's root cause from this file.
            if let Some(f) = env.as_ref().and_then(|e| e.error_file.as_ref()) {
                if let Err(w) = trainer::world::write_error_file(f, &e.to_string()) {
                    eprintln!("warning: could not write {}: {w}", f.display());
                }
            }
            return Err(e.into());
        }
    };
    if env.as_ref().is_some_and(|e| e.rank != 0) {
        return Ok(());
    }
    let mut line = format!(
        "done: {} steps in {:.1} s, final train loss {:.4}, {:.0} tokens/s",
        s.steps, s.seconds, s.final_loss, s.tokens_per_sec
    );
    if let Some(l) = s.eval_loss {
        line += &format!(", eval loss {l:.4}");
    }
    if let Some(a) = s.eval_accuracy {
        line += &format!(", retrieval accuracy {:.1}%", 100.0 * a);
    }
    println!("{line}");
    println!("run directory: {}", s.run_dir.display());
    if let Some(rss) = trainer::memory::peak_rss_bytes() {
        println!("peak RSS: {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}

/// `train plan`'s sequence-parallel flags.
struct SeqFlags {
    sequence_parallel: Option<usize>,
    all_to_all_gbps: Option<f64>,
    peak_tflops: Option<f64>,
}

/// `train plan`: the table, what would fit, and the plan files.
#[allow(clippy::too_many_arguments)]
fn plan_cmd(recipe: PathBuf, device_mem: Option<String>, host_mem: Option<String>, numa_mem: Option<String>, nvme: Option<String>, tokens: Option<u64>, calibrate: bool, mip_seconds: Option<f64>, out: Option<PathBuf>, model_config: Option<String>, tile_tokens: Option<u64>, nproc_per_node: usize, seq: SeqFlags, mut overrides: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = |flag: &str, v: Option<String>| -> Result<Option<u64>, String> {
        v.map(|s| planner::plan::parse_bytes(&s).ok_or(format!("{flag} {s}: not a byte count (e.g. 80GiB, 24GB)"))).transpose()
    };
    let req = trainer::plan::Request {
        device_memory: bytes("--device-mem", device_mem)?,
        host: bytes("--host-mem", host_mem)?,
        numa: bytes("--numa-mem", numa_mem)?,
        nvme: bytes("--nvme", nvme)?,
        tokens,
        calibrate,
        mip_seconds,
        ranks: nproc_per_node,
    };
    if tokens == Some(0) {
        return Err("--tokens must be positive".into());
    }
    if let Some(t) = tile_tokens {
        overrides.push(format!("compute.tile_tokens={t}"));
    }
    if let Some(p) = seq.sequence_parallel {
        overrides.push(format!("dist.sequence_parallel={p}"));
    }
    let r = trainer::train::recipe::Recipe::load(&recipe, &overrides)?;
    let cfg = match &model_config {
        Some(m) => trainer::plan::presets::model_config(m)?,
        None => trainer::train::model_config(&r, &recipe)?.0,
    };
    let lora = trainer::train::session::lora_config(&r);
    let (inv, plan) = trainer::plan::plan_recipe(&r, &cfg, lora.as_ref(), &req)?;
    print!("{}", planner::report::table(&inv, &plan));
    let fit = trainer::plan::what_would_fit(&r, &cfg, lora.as_ref(), &inv, &plan, nproc_per_node)?;
    print!("{}", fit.lines(plan.tokens));
    let mut extra = String::new();
    let sp = r.dist.sequence_parallel as u64;
    if sp > 1 {
        if seq.all_to_all_gbps.is_some_and(|g| !(g > 0.0)) || seq.peak_tflops.is_some_and(|p| !(p > 0.0)) {
            return Err("--all-to-all-gbps and --peak-tflops must be positive".into());
        }
        let cuda = !r.run.device.is_cpu();
        let gbps = seq.all_to_all_gbps.unwrap_or(if cuda { 300.0 } else { 1.0 });
        let peak = seq.peak_tflops.or(cuda.then_some(989.0)).map(|t| t * 1e12);
        let ex = trainer::plan::sequence::Exchange::new(&cfg, r.run.dtype.0.elt_size_in_bytes() as u64, plan.tokens, sp);
        extra += &trainer::plan::sequence::lines(&inv, &plan, &ex, gbps * 1e9, peak);
    }
    extra += &trainer::plan::job_lines(&r, &plan, nproc_per_node);
    print!("{extra}");
    let dir = out.unwrap_or(r.run.dir.clone());
    trainer::plan::write(&dir, &inv, &plan, Some(&fit), &extra)?;
    println!("wrote {}/plan.txt, plan.json, plan.svg", dir.display());
    Ok(())
}

/// `train data synth`: synthetic retrieval samples as prompt/completion lines.
fn synth_cmd(task: String, tokens: usize, samples: usize, depth: Option<f64>, digits: usize, seed: u64, out: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let t = trainer::data::synth::Task::parse(&task).ok_or(format!("--task {task}: expected passkey or kv-recall"))?;
    if tokens < 16 || digits == 0 || samples == 0 {
        return Err("--tokens must be ≥ 16, --digits and --samples positive".into());
    }
    if let Some(d) = depth {
        if !(0.0..=1.0).contains(&d) {
            return Err(format!("--depth {d}: expected a fraction in [0, 1]").into());
        }
    }
    let mut text = String::new();
    for i in 0..samples {
        let mut rng = trainer::rng::Rng::derive(seed, 4, i as u64);
        let s = trainer::data::synth::sample(t, &mut rng, tokens, depth, digits);
        text += &serde_json::json!({"prompt": s.prompt, "completion": s.completion}).to_string();
        text.push('\n');
    }
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("wrote {samples} {task} samples of ~{tokens} words to {}", out.display());
    Ok(())
}

/// `train bench offload`: each tier through the store beside the raw memory or disk.
fn bench_offload_cmd(tiers: String, nvme_dir: Option<PathBuf>, device: String, bytes: u64, slice_bytes: u64, io_uring: bool) -> Result<(), Box<dyn std::error::Error>> {
    if bytes == 0 || slice_bytes == 0 || slice_bytes > bytes {
        return Err("bench offload: --bytes and --slice-bytes must be positive, slice ≤ bytes".into());
    }
    let dev = device::parse_device(&device)?;
    let nodes = offload::numa::nodes()?;
    let list: Vec<_> = nodes.iter().map(|n| serde_json::json!({"node": n.id, "cpus": n.cpus.len(), "mem_total_bytes": n.mem_total_bytes, "far": n.is_far()})).collect();
    println!("{}", serde_json::json!({ "numa_nodes": list, "device": format!("{dev:?}") }));
    let mem = |tier: offload::store::Tier, node: Option<u32>| -> Result<(), Box<dyn std::error::Error>> {
        let r = offload::bench::bench_memory(tier, node.unwrap_or(0), bytes, slice_bytes, dev)?;
        println!(
            "{}",
            serde_json::json!({
                "tier": tier.name(), "numa_node": node, "device": format!("{dev:?}"), "bytes": r.bytes, "slice_bytes": slice_bytes,
                "raw_write_GBps": r.raw_write_gbps, "raw_read_GBps": r.raw_read_gbps,
                "tier_write_GBps": r.tier_write_gbps, "tier_read_GBps": r.tier_read_gbps,
                "write_ratio": r.tier_write_gbps / r.raw_write_gbps, "read_ratio": r.tier_read_gbps / r.raw_read_gbps,
            })
        );
        Ok(())
    };
    for tier in parse_tiers("bench offload", &tiers)? {
        match tier {
            offload::store::Tier::Numa => {
                for n in nodes.iter().filter(|n| n.mem_total_bytes > 0) {
                    mem(tier, Some(n.id))?;
                }
            }
            offload::store::Tier::Nvme => {
                let dir = nvme_dir.clone().unwrap_or_else(std::env::temp_dir);
                let r = offload::bench::bench_nvme(&dir, bytes, slice_bytes, io_uring)?;
                println!(
                    "{}",
                    serde_json::json!({
                        "tier": "nvme", "dir": dir.display().to_string(), "bytes": r.bytes, "slice_bytes": r.slice_bytes,
                        "engine": if r.io_uring { "io_uring" } else { "pread/pwrite" },
                        "raw_write_GBps": r.raw_write_gbps, "raw_read_GBps": r.raw_read_gbps,
                        "tier_write_GBps": r.tier_write_gbps, "tier_read_GBps": r.tier_read_gbps,
                        "write_ratio": r.tier_write_gbps / r.raw_write_gbps, "read_ratio": r.tier_read_gbps / r.raw_read_gbps,
                    })
                );
            }
            _ => mem(tier, None)?,
        }
    }
    Ok(())
}

/// `train bench step`'s token-sparsity flags.
struct SparseFlags {
    keep: f64,
    block: i64,
    layers: String,
    scorer: String,
    mlp_keep: f64,
    mlp_layers: String,
}

impl SparseFlags {
    /// The engine's settings for a model of `layers` layers (None: dense); the recipe's rules.
    fn resolve(&self, layers: usize) -> Result<Option<trainer::model::sparse::Sparsity>, String> {
        if self.keep == 0.0 && self.mlp_keep == 1.0 {
            return Ok(None);
        }
        use trainer::train::recipe::{SparseLayers, SparseScorer, SparsitySection};
        if !(0.0..=1.0).contains(&self.keep) || self.block <= 0 || !(self.mlp_keep > 0.0 && self.mlp_keep <= 1.0) {
            return Err(format!("bench step: --sparse-keep {} must lie in (0, 1] (0: attention dense), --sparse-block {} be positive and --sparse-mlp-keep {} lie in (0, 1]", self.keep, self.block, self.mlp_keep));
        }
        let list = |flag: &str, v: &str| -> Result<SparseLayers, String> {
            Ok(match v {
                "upper" | "all" => SparseLayers::Named(v.into()),
                l => SparseLayers::List(l.split(',').map(|x| x.trim().parse::<usize>().map_err(|_| format!("bench step: {flag} {l}: \"upper\", \"all\" or comma-separated layer indices"))).collect::<Result<_, _>>()?),
            })
        };
        // --sparse-keep 0 with MLP channels: attention stays dense.
        let (keep_ratio, layers_spec) = if self.keep == 0.0 { (1.0, SparseLayers::List(Vec::new())) } else { (self.keep, list("--sparse-layers", &self.layers)?) };
        let mlp_layers = list("--sparse-mlp-layers", &self.mlp_layers)?;
        // A predictor is fitted to a model's weights; this bench's are random.
        let scorer = match self.scorer.as_str() {
            "exact" => SparseScorer::Exact,
            "pooled" => SparseScorer::Pooled,
            s => return Err(format!("bench step: --sparse-scorer {s}: exact or pooled (a predictor is fitted to a model's weights, and this bench's are random)")),
        };
        let section = SparsitySection { block_size: self.block, keep_ratio, layers: layers_spec, scorer, score_queries: Default::default(), start_step: 0, mlp_keep_ratio: self.mlp_keep, mlp_layers, predictor: None, recall_every: 0 };
        let engine = scorer.training_free().ok_or("bench step: the scorer needs a fitted predictor")?;
        section.resolve_with(layers, &vec![None; layers], engine).map(Some)
    }
}

/// `train bench step`: time and memory of forward + backward steps.
#[allow(clippy::too_many_arguments)]
fn bench_step_cmd(layers: i64, hidden: i64, heads: i64, kv_heads: i64, intermediate: i64, vocab: i64, tokens: i64, iters: usize, device: String, dtype: String, tiers: String, nvme_dir: Option<PathBuf>, keep_last: usize, alpha: f64, tile_tokens: i64, sparse: SparseFlags) -> Result<(), Box<dyn std::error::Error>> {
    let dev = device::parse_device(&device)?;
    let kind = device::parse_dtype(&dtype)?;
    if [layers, hidden, heads, kv_heads, intermediate, vocab, tokens].iter().any(|v| *v <= 0) || iters == 0 || !(0.0..=1.0).contains(&alpha) || tile_tokens < 0 {
        return Err("bench step: every size and --iters must be positive, --alpha in [0, 1], --tile-tokens not negative".into());
    }
    let mut tiers = parse_tiers("bench step", &tiers)?;
    if tiers.is_empty() && nvme_dir.is_some() {
        tiers.push(offload::store::Tier::Nvme);
    }
    let sparsity = sparse.resolve(layers as usize)?;
    if sparsity.is_some() && (tile_tokens > 0 || !tiers.is_empty()) {
        return Err("bench step: --sparse-keep / --sparse-mlp-keep run whole-sequence resident layers here (no --tile-tokens, --tiers or --nvme-dir)".into());
    }
    let b = trainer::bench::StepBench { layers, hidden, heads, kv_heads, intermediate, vocab, tokens, iters, tiers, nvme_dir, keep_last, alpha, tile_tokens: (tile_tokens > 0).then_some(tile_tokens), sparsity };
    println!("{}", trainer::bench::run_step_bench(&b, kind, dev)?);
    Ok(())
}

/// Parses `--tiers host,numa,nvme` (empty entries ignored).
fn parse_tiers(cmd: &str, list: &str) -> Result<Vec<offload::store::Tier>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| offload::store::TIERS.iter().copied().find(|x| x.name() == t).ok_or(format!("{cmd}: --tiers: unknown tier `{t}` (host, numa, nvme)")))
        .collect()
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.cmd {
        Cmd::Eval { model, adapter, data, max_tokens, device, dtype, loss_chunk, json } => eval_cmd(model, adapter, data, max_tokens, device, dtype, loss_chunk, json),
        Cmd::Run { recipe, resume, overrides } => run_cmd(recipe, resume, overrides),
        Cmd::Predictor { recipe, from, steps, lr, width, rank, held_out, out, objective, overrides } => {
            let objective = trainer::train::predictor_fit::Objective::parse(&objective).ok_or_else(|| format!("train predictor: --objective {objective}: rank or map"))?;
            let opts = trainer::train::predictor_fit::FitOptions { steps, lr, width, rank, held_out, from, out, log_every: 50, objective };
            predictor_cmd(&recipe, &overrides, &opts)
        }
        Cmd::Launch { nproc_per_node, nnodes, node_rank, master_addr, master_port, cmd } => {
            let exe = std::env::current_exe()?;
            let job = trainer::launch::Job { nproc_per_node, nnodes, node_rank, master_addr, master_port };
            Ok(trainer::launch::launch(&exe, &job, &cmd)?)
        }
        Cmd::Plan { recipe, device_mem, host_mem, numa_mem, nvme, tokens, calibrate, mip_seconds, out, model_config, tile_tokens, nproc_per_node, sequence_parallel, all_to_all_gbps, peak_tflops, overrides } => {
            plan_cmd(recipe, device_mem, host_mem, numa_mem, nvme, tokens, calibrate, mip_seconds, out, model_config, tile_tokens, nproc_per_node, SeqFlags { sequence_parallel, all_to_all_gbps, peak_tflops }, overrides)
        }
        Cmd::Data(DataCmd::Synth { task, tokens, samples, depth, digits, seed, out }) => synth_cmd(task, tokens, samples, depth, digits, seed, out),
        Cmd::Data(DataCmd::Inspect { recipe, n, overrides }) => {
            use std::io::IsTerminal;
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let marks = if colour { trainer::data::inspect::Marks::Colour } else { trainer::data::inspect::Marks::Brackets };
            print!("{}", trainer::data::inspect::inspect(&recipe, &overrides, n, marks)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::Offload { tiers, nvme_dir, device, bytes, slice_bytes, io_uring }) => bench_offload_cmd(tiers, nvme_dir, device, bytes, slice_bytes, io_uring),
        Cmd::Bench(BenchCmd::Allreduce { bytes, iters }) => {
            let env = trainer::world::Env::from_process()?.ok_or("bench allreduce: no job environment (run it under `train launch` or torchrun)")?;
            let r = trainer::world::bench_all_reduce(&env, bytes, iters)?;
            if env.rank == 0 {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Step { layers, hidden, heads, kv_heads, intermediate, vocab, tokens, iters, device, dtype, tiers, nvme_dir, keep_last, alpha, tile_tokens, sparse_keep, sparse_block, sparse_layers, sparse_scorer, sparse_mlp_keep, sparse_mlp_layers }) => {
            let sparse = SparseFlags { keep: sparse_keep, block: sparse_block, layers: sparse_layers, scorer: sparse_scorer, mlp_keep: sparse_mlp_keep, mlp_layers: sparse_mlp_layers };
            bench_step_cmd(layers, hidden, heads, kv_heads, intermediate, vocab, tokens, iters, device, dtype, tiers, nvme_dir, keep_last, alpha, tile_tokens, sparse)
        }
    }
}

fn main() -> ExitCode {
    // Before any thread exists and before libtorch touches CUDA.
    trainer::memory::configure_cuda_allocator();
    #[cfg(feature = "jemalloc")]
    trainer::memory::set_page_release(purge_freed_pages);
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error of ours already names its cause in its message.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
