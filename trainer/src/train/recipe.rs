//! Recipes: TOML files that say everything a run does. A serde mirror that denies unknown keys
//! (so a typo is an error naming the key and line), command-line overrides with the same dotted
//! paths (`train.lr=3e-4`), and the resolved recipe written into the run directory.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::synth::Task;
use crate::error::{Result, TrainerError};
use crate::model::proj::Proj;
use crate::train::optim::Decay;
pub use planner::placement::Tier;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub lora: Option<LoraSection>,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub offload: OffloadSection,
    #[serde(default)]
    pub compute: ComputeSection,
    /// With this section `train run` plans the step before loading weights: it refuses a run that
    /// cannot fit, and takes keep_last and α from the plan.
    #[serde(default)]
    pub plan: Option<PlanSection>,
    #[serde(default)]
    pub dist: DistSection,
    /// Contextual token sparsity; absent: every layer dense.
    #[serde(default)]
    pub sparsity: Option<SparsitySection>,
}

/// `[sparsity]`: contextual token sparsity (LeMo / JENGA). In a sparse layer only the most
/// informative blocks of each document take part in attention: the attention's saved tensors
/// (input norm, q, k, v, output, logsumexp) exist for their tokens only, and a dropped token's
/// attention output is zero (it still passes through the residual and the MLP). Trade-off: less
/// activation memory and attention work for an approximation of the dense model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparsitySection {
    /// Tokens per block; blocks start at each document's start and never cross its end.
    #[serde(default = "default_sparse_block")]
    pub block_size: i64,
    /// Fraction of each document's blocks a sparse layer keeps (its first block, the attention
    /// sink, always among them), in (0, 1]. The reference keeps 0.4.
    pub keep_ratio: f64,
    /// The sparse layers: "upper" (the reference: dense in the first half and in the last layer)
    /// or a list of layer indices.
    #[serde(default)]
    pub layers: SparseLayers,
    /// How blocks are rated: "exact" (the block map of `Σ_heads ReLU(q·k/√d)` maxima, made
    /// symmetric and summed over query blocks: a second attention-sized product per sparse layer),
    /// "pooled" (the same over block-mean q and k: cheap, training-free) or "predictor" (a learned
    /// predictor of the exact map from the layer's normed input, read from `predictor`; fit it
    /// first with `train predictor --recipe R`).
    #[serde(default)]
    pub scorer: SparseScorer,
    /// The predictor's file: `train predictor` writes it, the "predictor" scorer reads it.
    /// Default: `predictor.safetensors` in `run.dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<PathBuf>,
    /// With the "predictor" scorer: every this many steps (from step 0) the sparse layers also
    /// rate exactly, and the predictor's recall of the exact choice goes to the metrics
    /// (`sparsity/predictor_recall_layer{l}`). Trade-off: such a step pays the exact scorer's
    /// product too. 0: never.
    #[serde(default = "ten")]
    pub recall_every: u64,
    /// Which query blocks rate the key blocks: "all" (the reference) or "targets" (only those
    /// holding training targets, where the loss comes from: a prompt/completion sample's answer;
    /// those blocks are also always kept, or their tokens would lose their attention. For
    /// prompt/completion data: on plain text every block holds targets, and nothing is dropped).
    #[serde(default)]
    pub score_queries: ScoreQueries,
    /// Optimizer steps run with every layer dense before the sparse layers start (a dense
    /// warm-up: the model first learns where to attend on short contexts, then the scorer can
    /// find those blocks). The plan is then the dense step's, the whole run's peak.
    #[serde(default)]
    pub start_step: u64,
    /// MLP channel sparsity (the reference keeps 0.2): the fraction of the intermediate channels
    /// whose gate/up/act columns a layer of `mlp_layers` saves — those with the largest norms over
    /// the sequence. The forward stays exact; the backward passes the input gradient through the
    /// kept channels only (an approximate gradient; under full fine-tuning the other channels'
    /// MLP weights get none that step). 1 (the default): off. The MLP's projections must not
    /// carry LoRA adapters. Trade-off: the MLP's saved tensors, most of a layer's, shrink to this
    /// fraction, for a coarser gradient.
    #[serde(default = "one")]
    pub mlp_keep_ratio: f64,
    /// The layers with MLP channel sparsity: "all" (the reference), "upper" or a list.
    #[serde(default = "all_layers")]
    pub mlp_layers: SparseLayers,
}

fn one() -> f64 {
    1.0
}

fn ten() -> u64 {
    10
}

fn all_layers() -> SparseLayers {
    SparseLayers::Named("all".into())
}

impl SparsitySection {
    /// Whether optimizer step `step` (counted from 0) runs the sparse layers sparse.
    pub fn active_at(&self, step: i64) -> bool {
        step >= self.start_step as i64
    }

    /// Whether every step of a run runs sparse (what the plan may count on).
    pub fn from_the_start(&self) -> bool {
        self.start_step == 0
    }
}

/// `sparsity.score_queries`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreQueries {
    #[default]
    All,
    Targets,
}

fn default_sparse_block() -> i64 {
    64
}

/// `sparsity.layers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SparseLayers {
    Named(String),
    List(Vec<usize>),
}

impl Default for SparseLayers {
    fn default() -> Self {
        SparseLayers::Named("upper".into())
    }
}

/// `sparsity.scorer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparseScorer {
    #[default]
    Exact,
    Pooled,
    Predictor,
}

impl SparseScorer {
    /// The engine's scorer when it needs no fitted file.
    pub fn training_free(self) -> Option<crate::model::sparse::Scorer> {
        match self {
            SparseScorer::Exact => Some(crate::model::sparse::Scorer::Exact),
            SparseScorer::Pooled => Some(crate::model::sparse::Scorer::Pooled),
            SparseScorer::Predictor => None,
        }
    }
}

impl SparsitySection {
    /// Where the predictor of a run in `run_dir` lives.
    pub fn predictor_path(&self, run_dir: &Path) -> PathBuf {
        self.predictor.clone().unwrap_or_else(|| run_dir.join("predictor.safetensors"))
    }

    /// The engine's settings for `cfg`'s model in `kind` on `device`, its predictor read from
    /// [`Self::predictor_path`] when the scorer is one; errors name the key.
    pub fn resolve_for(&self, cfg: &crate::model::config::ModelConfig, kind: tch::Kind, device: tch::Device, run_dir: &Path) -> std::result::Result<crate::model::sparse::Sparsity, String> {
        let scorer = match self.scorer.training_free() {
            Some(s) => s,
            None => {
                if cfg.hidden_size % cfg.head_dim != 0 {
                    return Err(format!("`sparsity.scorer` = \"predictor\" reads the hidden state in head_dim-wide slices: hidden_size {} is not a multiple of head_dim {}", cfg.hidden_size, cfg.head_dim));
                }
                let path = self.predictor_path(run_dir);
                let p = crate::model::predictor::Predictor::load(&path, cfg.head_dim, kind, device).map_err(|e| format!("`sparsity.predictor`: {e}"))?;
                p.check(&self.layers.resolve("sparsity.layers", cfg.num_layers as usize)?, self.block_size).map_err(|e| format!("`sparsity.predictor`: {e}"))?;
                crate::model::sparse::Scorer::predictor(p)
            }
        };
        self.resolve_with(cfg.num_layers as usize, &cfg.sliding_window, scorer)
    }

    /// The settings for a model of `layers` layers whose layer l has sliding window
    /// `windows[l]`, rated by `scorer` (the planner gives any: every scorer saves the same
    /// tensors); errors name the key.
    pub fn resolve_with(&self, layers: usize, windows: &[Option<i64>], scorer: crate::model::sparse::Scorer) -> std::result::Result<crate::model::sparse::Sparsity, String> {
        let list = self.layers.resolve("sparsity.layers", layers)?;
        let mlp_layers = self.mlp_layers.resolve("sparsity.mlp_layers", layers)?;
        if let Some(l) = list.iter().find(|&&l| windows.get(l).copied().flatten().is_some()) {
            return Err(format!("`sparsity.layers`: layer {l} attends through a sliding window, which a compacted sequence would widen; leave it dense"));
        }
        Ok(crate::model::sparse::Sparsity {
            block: self.block_size,
            keep: self.keep_ratio,
            layers: list,
            scorer,
            target_queries: self.score_queries == ScoreQueries::Targets,
            mlp_keep: self.mlp_keep_ratio,
            mlp_layers,
        })
    }
}

impl SparseLayers {
    /// The layer indices of a model of `layers` layers; errors name `key`.
    pub fn resolve(&self, key: &str, layers: usize) -> std::result::Result<Vec<usize>, String> {
        let list = match self {
            SparseLayers::Named(n) if n == "upper" => crate::model::sparse::Sparsity::upper_layers(layers),
            SparseLayers::Named(n) if n == "all" => (0..layers).collect(),
            SparseLayers::Named(n) => return Err(format!("`{key}`: \"{n}\": expected \"upper\", \"all\" or a list of layer indices")),
            SparseLayers::List(v) => v.clone(),
        };
        match list.iter().find(|&&l| l >= layers) {
            Some(l) => Err(format!("`{key}`: layer {l} is out of range: the model has {layers} layers (0..{})", layers.saturating_sub(1))),
            None => Ok(list),
        }
    }
}

/// `[dist]`: the process group of a job of several processes (torchrun or `train launch`;
/// unused by a single process).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistSection {
    /// "auto" (NCCL when the run computes on CUDA and strata was built with the CUDA wheel's
    /// NCCL, else Gloo), "nccl" (GPU-to-GPU, CUDA runs only) or "gloo" (CPU; CUDA tensors go
    /// through host memory).
    #[serde(default)]
    pub backend: Backend,
    /// Seconds the rendezvous and each collective may wait for the other ranks before the run
    /// stops with an error. Rank 0 alone evaluates and writes checkpoints while the others wait
    /// at the next step's all-reduce, so it must cover those.
    #[serde(default = "default_dist_timeout")]
    pub timeout_seconds: u64,
    /// Ranks one sequence is split over (DeepSpeed-Ulysses: each holds 1/P of every token-local
    /// activation and attends with heads/P of the heads over the whole sequence). Consecutive
    /// ranks form a group; data parallel × sequence parallel = world size. 1: each rank computes
    /// whole sequences. Trade-off: per-rank activation memory falls as 1/P, for four all-to-alls
    /// per layer forward and five backward.
    #[serde(default = "default_sequence_parallel")]
    pub sequence_parallel: usize,
    /// MiB of small gradients summed across ranks in one all-reduce (torch DDP's
    /// `bucket_cap_mb`): a layer's gradients below it are copied into flat buckets of up to this
    /// size, larger ones are summed in place. Trade-off: larger buckets, fewer collectives; the
    /// plan counts one bucket of memory beside the gradients.
    #[serde(default = "default_bucket_cap_mb")]
    pub bucket_cap_mb: f64,
}

impl DistSection {
    /// `bucket_cap_mb` in bytes.
    pub fn bucket_bytes(&self) -> u64 {
        (self.bucket_cap_mb * (1u64 << 20) as f64) as u64
    }
}

impl Default for DistSection {
    fn default() -> Self {
        DistSection { backend: Backend::Auto, timeout_seconds: default_dist_timeout(), sequence_parallel: 1, bucket_cap_mb: default_bucket_cap_mb() }
    }
}

fn default_sequence_parallel() -> usize {
    1
}

fn default_bucket_cap_mb() -> f64 {
    25.0
}

fn default_dist_timeout() -> u64 {
    1800
}

/// `dist.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Gloo,
    Nccl,
}

/// `train.mode`: which tensors train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every parameter.
    Full,
    /// Only the LoRA adapters of `[lora]`.
    Lora,
}

/// `run.device`: where the step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else the CPU.
    Auto,
    Cpu,
    /// The first CUDA device (with torchrun, the local rank's).
    Cuda,
}

impl DeviceChoice {
    /// The device to run on now (an error when CUDA is asked for and absent).
    pub fn resolve(self) -> Result<tch::Device> {
        crate::device::parse_device(self.name())
    }

    /// The device to plan for: "cuda" stays CUDA on a machine without a GPU (the plan is for the
    /// machine the run will use).
    pub fn target(self) -> Result<tch::Device> {
        crate::device::target_device(self.name())
    }

    /// Whether the step computes on the CPU.
    pub fn is_cpu(self) -> bool {
        self == DeviceChoice::Cpu || (self == DeviceChoice::Auto && !tch::Cuda::is_available())
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// `run.dtype`: the dtype of weights and activations ("float32", "bfloat16", "float16",
/// "float64", or their short forms), validated when the recipe is read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dtype(pub tch::Kind);

impl TryFrom<String> for Dtype {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        crate::device::parse_dtype(&s).map(Dtype).map_err(|_| format!("`{s}` is not a dtype: expected float32, float64, bfloat16 or float16"))
    }
}

impl From<Dtype> for String {
    fn from(d: Dtype) -> String {
        match d.0 {
            tch::Kind::Double => "float64",
            tch::Kind::BFloat16 => "bfloat16",
            tch::Kind::Half => "float16",
            _ => "float32",
        }
        .into()
    }
}

/// A byte count written as an integer or a string with a unit ("80GiB", "24 GB").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Value", into = "toml::Value")]
pub struct Bytes(pub u64);

impl TryFrom<toml::Value> for Bytes {
    type Error = String;
    fn try_from(v: toml::Value) -> std::result::Result<Self, String> {
        match &v {
            toml::Value::Integer(i) if *i >= 0 => Ok(Bytes(*i as u64)),
            toml::Value::String(s) => planner::plan::parse_bytes(s).map(Bytes).ok_or_else(|| format!("`{s}` is not a byte count (e.g. 80GiB, 24GB, 1000000)")),
            _ => Err(format!("{v} is not a byte count (e.g. 80GiB, 24GB, 1000000)")),
        }
    }
}

impl From<Bytes> for toml::Value {
    fn from(b: Bytes) -> toml::Value {
        toml::Value::Integer(b.0.min(i64::MAX as u64) as i64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanSection {
    /// Memory of the compute device the step must fit in (GPU memory; on CPU the RAM for
    /// everything kept resident). Tier budgets are the [offload] ones.
    pub device_memory: Bytes,
    /// true: keep_last and alpha come from the plan; false: from [offload] (the plan still
    /// checks that they fit).
    #[serde(default = "default_true")]
    pub apply: bool,
    /// Seconds each buffer-layout MIP may take before the greedy layout is used.
    #[serde(default = "default_mip_seconds")]
    pub mip_seconds: f64,
}

fn default_mip_seconds() -> f64 {
    2.0
}

/// `[compute]`: how a block's work is cut.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComputeSection {
    /// Tokens per tile of a block's token-local ops (norms, projections, RoPE, SwiGLU), forward
    /// and backward: no `[T, intermediate]` tensor exists whole, so one layer's working set stops
    /// growing with the MLP and the longest step grows several-fold; smaller tiles run smaller
    /// GEMMs (slower below a few thousand tokens). 0: the whole sequence at once. Absent: the
    /// plan's choice with an applied `[plan]` (whole when that fits), else the whole sequence.
    #[serde(default)]
    pub tile_tokens: Option<u64>,
}

/// The largest `compute.tile_tokens` taken (2^40 tokens: no sequence is longer).
pub const MAX_TILE_TOKENS: u64 = 1 << 40;

impl ComputeSection {
    /// The tile the recipe fixes: `Some(None)` for the whole sequence, `Some(Some(n))` for tiles
    /// of n tokens, `None` when it leaves the choice to the plan.
    pub fn fixed_tile(&self) -> Option<Option<u64>> {
        self.tile_tokens.map(|t| (t > 0).then_some(t))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OffloadSection {
    /// Tiers that saved activations of offloaded layers move to, from ["host", "numa", "nvme"];
    /// empty keeps everything in place. Layers whose backward comes first (the last ones) go to
    /// the fastest tier (host, then numa, then nvme), tensor by tensor until its budget is used,
    /// then the next slower one (`planner::placement`; `train plan` prints the result).
    #[serde(default)]
    pub tiers: Vec<Tier>,
    /// Host RAM budget (page-locked on CUDA, reserved at start). Fastest tier, costs RAM.
    #[serde(default)]
    pub host_bytes: u64,
    /// NUMA node for the "numa" tier: a far socket's DRAM or a CXL expander (`train bench
    /// offload` lists the nodes and marks those without CPUs as far).
    #[serde(default)]
    pub numa_node: u32,
    /// Budget of the "numa" tier.
    #[serde(default)]
    pub numa_bytes: u64,
    /// Directory of the NVMe tier's file (on the fast disk; the file is unlinked at once).
    #[serde(default = "default_nvme_dir")]
    pub nvme_dir: PathBuf,
    /// Bytes reserved up front for the NVMe tier; a run that needs more stops with an error
    /// naming the slice.
    #[serde(default = "default_nvme_bytes")]
    pub nvme_bytes: u64,
    /// The last k layers keep their activations in place (their backward runs first).
    #[serde(default)]
    pub keep_last: usize,
    /// MEMO's α: for offloaded layers, the fraction of tokens whose token-local activations
    /// (norms, q/k/v, MLP) are stored; the rest are recomputed in backward from the layer input
    /// and attention output (which are always stored). Lower moves fewer bytes and costs compute.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Layers whose activations are read back ahead of the backward that needs them (more hides
    /// more I/O behind compute and holds more memory).
    #[serde(default = "default_one_usize")]
    pub lookahead: usize,
    /// Bytes of activations that may wait in memory for the I/O thread to write them; beyond it
    /// the step waits (more overlaps more I/O, and holds more memory).
    #[serde(default = "default_inflight")]
    pub max_inflight_bytes: u64,
    /// io_uring for the NVMe tier; false uses pread/pwrite.
    #[serde(default = "default_true")]
    pub io_uring: bool,
}

impl OffloadSection {
    /// Whether `tier` is among `tiers`.
    pub fn has(&self, tier: Tier) -> bool {
        self.tiers.contains(&tier)
    }

    /// The activation store's tiers and budgets (`cuda_device`: page-locked arenas and a copy
    /// stream for that device's tensors).
    /// The store of rank `rank` (each rank has its own tier budgets and NVMe file).
    pub fn store_config(&self, cuda_device: Option<usize>, rank: usize) -> offload::store::StoreConfig {
        offload::store::StoreConfig {
            host_bytes: if self.has(Tier::Host) { self.host_bytes } else { 0 },
            numa: self.has(Tier::Numa).then_some((self.numa_node, self.numa_bytes)),
            nvme: self.has(Tier::Nvme).then(|| offload::store::NvmeConfig { dir: self.nvme_dir.clone(), bytes: self.nvme_bytes, rank, io_uring: self.io_uring }),
            max_inflight: self.max_inflight_bytes,
            cuda_device,
        }
    }
}

impl Default for OffloadSection {
    fn default() -> Self {
        OffloadSection { tiers: Vec::new(), host_bytes: 0, numa_node: 0, numa_bytes: 0, nvme_dir: default_nvme_dir(), nvme_bytes: default_nvme_bytes(), keep_last: 0, alpha: 1.0, lookahead: 1, max_inflight_bytes: default_inflight(), io_uring: true }
    }
}

fn default_alpha() -> f64 {
    1.0
}
fn default_inflight() -> u64 {
    256 << 20
}
fn default_one_usize() -> usize {
    1
}
fn default_nvme_dir() -> PathBuf {
    std::env::temp_dir()
}
fn default_nvme_bytes() -> u64 {
    8 << 30
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run directory: resolved recipe, checkpoints, metrics, TensorBoard events, final export.
    pub dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
    /// Dtype of the weights and activations (float32, bfloat16, float16, float64).
    #[serde(default = "default_dtype")]
    pub dtype: Dtype,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model folder. Exactly one of `path` and `init`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A fresh model from an HF-style config (keys as in config.json; vocab_size is taken from
    /// the tokenizer). Needs `tokenizer = "synthetic"`.
    #[serde(default)]
    pub init: Option<toml::Table>,
    /// "synthetic": the built-in word-level tokenizer of the synthetic tasks.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Standard deviation of fresh weights (transformers' initializer_range).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL files (text, instruction/input/output, prompt/completion or messages lines).
    #[serde(default)]
    pub train: Vec<PathBuf>,
    /// Synthetic retrieval samples generated on the fly instead of files.
    #[serde(default)]
    pub synth: Option<SynthSection>,
    /// Documents longer than this are truncated.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// A micro-batch packs whole documents up to this many tokens (attention stays inside each
    /// document). Activation memory grows linearly with it.
    #[serde(default = "default_max_tokens")]
    pub tokens_per_batch: usize,
    #[serde(default = "default_true")]
    pub shuffle: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SynthSection {
    /// passkey | kv-recall
    pub task: Task,
    /// Sample length in words, per curriculum stage.
    pub words: Vec<usize>,
    /// Step at which each stage begins (same length as `words`, starting at 0).
    #[serde(default)]
    pub from_step: Vec<i64>,
    #[serde(default = "default_digits")]
    pub digits: usize,
    /// Draw each sample's length log-uniformly between the first stage's length and the current
    /// stage's, instead of using the current stage's alone (keeps shorter contexts in training).
    #[serde(default)]
    pub mix_shorter: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// full | lora
    #[serde(default = "default_mode")]
    pub mode: Mode,
    pub steps: i64,
    /// Micro-batches per optimizer step (their gradients add up; the loss is the mean over
    /// all their target tokens).
    #[serde(default = "default_one")]
    pub grad_accum: i64,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub warmup: i64,
    /// constant | linear | cosine
    #[serde(default = "default_schedule")]
    pub schedule: Decay,
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Tokens whose logits exist at once in the fused LM head + loss.
    #[serde(default = "default_loss_chunk")]
    pub loss_chunk: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: i64,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every N steps (0: only at the end).
    #[serde(default)]
    pub every: i64,
    /// Complete checkpoints kept; older ones are deleted after a new one is complete.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub every: i64,
    /// Held-out JSONL: its loss is reported as eval/loss.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Synthetic tasks: fresh samples scored by exact match of the whole answer.
    #[serde(default = "default_eval_samples")]
    pub samples: usize,
    /// Synthetic tasks: length in words of the eval samples (default: the last stage's).
    #[serde(default)]
    pub words: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default = "default_log_every")]
    pub every: i64,
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

fn default_device() -> DeviceChoice {
    DeviceChoice::Auto
}
fn default_dtype() -> Dtype {
    Dtype(tch::Kind::Float)
}
fn default_init_std() -> f64 {
    0.02
}
fn default_max_tokens() -> usize {
    4096
}
fn default_true() -> bool {
    true
}
fn default_digits() -> usize {
    5
}
fn default_mode() -> Mode {
    Mode::Full
}
fn default_one() -> i64 {
    1
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_schedule() -> Decay {
    Decay::Cosine
}
fn default_clip() -> f64 {
    1.0
}
fn default_loss_chunk() -> i64 {
    1024
}
fn default_targets() -> Vec<String> {
    [Proj::Q, Proj::K, Proj::V, Proj::O].map(|p| p.short().to_string()).to_vec()
}
fn default_keep() -> usize {
    2
}
fn default_eval_samples() -> usize {
    20
}
fn default_log_every() -> i64 {
    10
}
impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { every: 0, keep_last: default_keep() }
    }
}
impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every: 0, data: None, samples: default_eval_samples(), words: None }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        LogSection { every: default_log_every(), tensorboard: true }
    }
}

/// Sets `path` (dotted) in a TOML table to `raw`, parsed as a TOML value when it is one
/// (`3e-4`, `true`, `[1, 2]`, `"text"`) and taken as a string otherwise (`runs/x`).
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> std::result::Result<(), String> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| format!("override `{assignment}` is not key.path=value"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(format!("override `{assignment}`: bad key path"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("override `{path}`: `{p}` is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads a recipe file and applies overrides. Errors name the file, and the key and line
    /// where TOML knows them.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(TrainerError::io(path))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| TrainerError::config(path, e.to_string().trim_end().to_string()))?;
        for o in overrides {
            apply_override(&mut table, o).map_err(|msg| TrainerError::config(path, msg))?;
        }
        // Deserialize the source text when nothing was overridden, so errors carry line numbers.
        let recipe: Recipe = if overrides.is_empty() {
            toml::from_str(&text).map_err(|e| TrainerError::config(path, e.to_string().trim_end().to_string()))?
        } else {
            Recipe::deserialize(table).map_err(|e| TrainerError::config(path, format!("after overrides {overrides:?}: {e}")))?
        };
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// Checks what types alone cannot: ranges, choices, and keys that only make sense together.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Err(TrainerError::config(path, format!("`{key}`: {msg}")));
        let m = &self.model;
        match (&m.path, &m.init) {
            (Some(_), Some(_)) => return err("model", "give `path` or `init`, not both".into()),
            (None, None) => return err("model", "give `path` (an HF folder) or `init` (a fresh model)".into()),
            (None, Some(_)) if m.tokenizer.as_deref() != Some("synthetic") => {
                return err("model.tokenizer", "a fresh model (`init`) needs tokenizer = \"synthetic\"".into())
            }
            _ => {}
        }
        if let Some(t) = &m.tokenizer {
            if t != "synthetic" {
                return err("model.tokenizer", format!("\"{t}\": only \"synthetic\" is built in (an HF folder brings its own)"));
            }
        }
        if self.train.mode == Mode::Lora && self.lora.is_none() {
            return err("lora", "train.mode = \"lora\" needs a [lora] section (rank, alpha)".into());
        }
        if let Some(l) = &self.lora {
            if l.rank <= 0 || l.alpha <= 0.0 || !(0.0..1.0).contains(&l.dropout) {
                return err("lora", format!("rank {} and alpha {} must be positive and dropout {} in [0, 1)", l.rank, l.alpha, l.dropout));
            }
            for t in &l.targets {
                if Proj::from_short(t).is_none() {
                    return err("lora.targets", format!("`{t}` is not one of {:?}", Proj::short_names()));
                }
            }
        }
        let t = &self.train;
        if t.steps <= 0 || t.grad_accum <= 0 || t.loss_chunk <= 0 {
            return err("train", "steps, grad_accum and loss_chunk must be positive".into());
        }
        if !(t.lr > 0.0) || t.eps <= 0.0 || t.weight_decay < 0.0 || t.grad_clip < 0.0 || t.warmup < 0 {
            return err("train", format!("lr {} and eps must be positive; weight_decay, grad_clip, warmup not negative", t.lr));
        }
        if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return err("train.betas", format!("{:?} must lie in [0, 1)", t.betas));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return err("train.min_lr_ratio", format!("{} must lie in [0, 1]", t.min_lr_ratio));
        }
        if self.dist.timeout_seconds == 0 {
            return err("dist.timeout_seconds", "must be at least 1 (seconds the ranks wait for each other)".into());
        }
        if let Some(s) = &self.sparsity {
            if s.block_size <= 0 {
                return err("sparsity.block_size", format!("{} must be positive (tokens per block; the reference uses 64)", s.block_size));
            }
            if !(s.keep_ratio > 0.0 && s.keep_ratio <= 1.0) {
                return err("sparsity.keep_ratio", format!("{} must lie in (0, 1] (the fraction of each document's blocks kept)", s.keep_ratio));
            }
            if !(s.mlp_keep_ratio > 0.0 && s.mlp_keep_ratio <= 1.0) {
                return err("sparsity.mlp_keep_ratio", format!("{} must lie in (0, 1] (the fraction of the MLP's intermediate channels saved; 1: all)", s.mlp_keep_ratio));
            }
            let mlp_adapted = self.lora.as_ref().and_then(|l| l.targets.iter().find(|t| Proj::from_short(t).is_some_and(|p| Proj::MLP.contains(&p))));
            if let (true, Some(t)) = (s.mlp_keep_ratio < 1.0, mlp_adapted) {
                return err("sparsity.mlp_keep_ratio", format!("MLP channel sparsity with a LoRA adapter on `{t}` is not built: leave the MLP's projections out of lora.targets or set it to 1"));
            }
            // Built so far for whole-sequence layers on one process.
            for (key, on) in [("compute.tile_tokens", matches!(self.compute.fixed_tile(), Some(Some(_)))), ("dist.sequence_parallel", self.dist.sequence_parallel > 1)] {
                if on {
                    return err("sparsity", format!("with {key}: sparse layers do not run with it yet; remove one of them"));
                }
            }
        }
        if !(self.dist.bucket_cap_mb > 0.0 && self.dist.bucket_cap_mb.is_finite()) {
            return err("dist.bucket_cap_mb", format!("{}: must be a positive number of MiB (default 25)", self.dist.bucket_cap_mb));
        }
        if self.dist.sequence_parallel == 0 {
            return err("dist.sequence_parallel", "must be at least 1 (ranks one sequence is split over; 1: not split)".into());
        }
        let d = &self.data;
        match (&d.synth, d.train.is_empty()) {
            (Some(_), false) => return err("data", "give `train` files or [data.synth], not both".into()),
            (None, true) => return err("data.train", "no training data: list JSONL files or add [data.synth]".into()),
            _ => {}
        }
        if d.max_tokens < 2 || d.tokens_per_batch < 2 {
            return err("data", "max_tokens and tokens_per_batch must be at least 2".into());
        }
        if let Some(s) = &d.synth {
            if s.words.is_empty() || s.words.iter().any(|&w| w < 16) {
                return err("data.synth.words", "give at least one length, each ≥ 16 words".into());
            }
            let starts = if s.from_step.is_empty() && s.words.len() == 1 { vec![0] } else { s.from_step.clone() };
            if starts.len() != s.words.len() || starts.first() != Some(&0) || starts.windows(2).any(|w| w[0] >= w[1]) {
                return err("data.synth.from_step", "one rising start step per entry of `words`, the first 0".into());
            }
            if s.words.iter().any(|&w| w + 2 > d.tokens_per_batch) {
                return err("data.tokens_per_batch", format!("{} is shorter than a synthetic sample of {:?} words", d.tokens_per_batch, s.words));
            }
            if s.digits == 0 || s.digits > 32 {
                return err("data.synth.digits", format!("{} must lie in 1..=32", s.digits));
            }
        }
        if self.checkpoint.every < 0 || self.eval.every < 0 || self.log.every <= 0 {
            return err("checkpoint.every / eval.every / log.every", "must not be negative (log.every positive)".into());
        }
        let o = &self.offload;
        for (i, t) in o.tiers.iter().enumerate() {
            if *t == Tier::Keep || o.tiers[..i].contains(t) {
                return err("offload.tiers", format!("\"{}\": expected distinct names from host, numa, nvme", t.name()));
            }
        }
        if o.has(Tier::Host) && o.host_bytes == 0 {
            return err("offload.host_bytes", "the host tier needs a positive budget".into());
        }
        if o.has(Tier::Numa) && o.numa_bytes == 0 {
            return err("offload.numa_bytes", "the numa tier needs a positive budget".into());
        }
        if o.has(Tier::Nvme) && (o.nvme_bytes == 0 || !o.nvme_dir.is_dir()) {
            return err("offload", format!("nvme_dir {} must be an existing directory and nvme_bytes positive", o.nvme_dir.display()));
        }
        if !(0.0..=1.0).contains(&o.alpha) {
            return err("offload.alpha", format!("{} must lie in [0, 1]", o.alpha));
        }
        if let Some(t) = self.compute.tile_tokens.filter(|&t| t > MAX_TILE_TOKENS) {
            return err("compute.tile_tokens", format!("{t} is more than {MAX_TILE_TOKENS} tokens (0 runs the whole sequence at once)"));
        }
        let tiled = self.compute.tile_tokens.is_some_and(|t| t > 0);
        if o.alpha < 1.0 && !tiled && self.train.mode == Mode::Lora && self.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            return err("offload.alpha", "alpha < 1 recomputes adapted projections, which needs lora.dropout = 0 or compute.tile_tokens (tiles keep the dropout masks)".into());
        }
        if self.checkpoint.keep_last == 0 {
            return err("checkpoint.keep_last", "must be at least 1".into());
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}
