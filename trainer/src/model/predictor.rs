//! The learned block scorer (LeMo / JENGA's predictor): per sparse layer, two small bias-free
//! ReLU MLPs over the layer's normed input, a query path and a key path, whose outputs' product
//! summed over head-wide slices predicts the exact scorer's block map
//! ([`crate::model::sparse::Scorer::Exact`]) without the second attention-sized product.
//!
//! A block's features for slice `s` are its tokens' columns `s·d .. (s+1)·d` of the normed
//! hidden state (`d` = head_dim), flattened token-major to `block · d` values (a document's
//! last, partial block padded with zeros). Each path maps them `block·d → width → rank`; the
//! predicted entry of query block `qb` and key block `kb ≤ qb` is `Σ_s ⟨Q[qb, s], K[kb, s]⟩`.
//! Fitted by `train predictor` ([`crate::train::predictor_fit`]) against the exact map, the
//! model frozen; saved as safetensors (`layers.{l}.{q,k}_path.{0,2}.weight`, as a PyTorch
//! `nn.Sequential(Linear, ReLU, Linear)` would name them).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};

/// `train predictor`'s default hidden width of each path (the reference's 128).
pub const DEFAULT_WIDTH: i64 = 128;
/// `train predictor`'s default output width per slice.
pub const DEFAULT_RANK: i64 = 128;

/// One path: `block·d → width` (ReLU) `→ rank`, no biases.
pub struct Mlp {
    /// `[width, block·d]`
    pub w1: Tensor,
    /// `[rank, width]`
    pub w2: Tensor,
}

impl Mlp {
    /// # Shapes
    /// - `x`: `[.., block·d]` → `[.., rank]`
    fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.w1.tr()).relu().matmul(&self.w2.tr())
    }
}

/// A layer's query and key paths.
pub struct Paths {
    pub q: Mlp,
    pub k: Mlp,
}

/// Predictors of the sparse layers of one model.
pub struct Predictor {
    /// The file it was read from or is written to (named in errors).
    pub path: PathBuf,
    /// Tokens per block.
    pub block: i64,
    /// Columns per slice of the hidden state (the model's head_dim).
    pub slice: i64,
    pub layers: BTreeMap<usize, Paths>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Predictor({}, layers {:?}, block {})", self.path.display(), self.layers.keys().collect::<Vec<_>>(), self.block)
    }
}

/// The names of one layer's four weights.
fn names(l: usize) -> [String; 4] {
    ["q_path.0", "q_path.2", "k_path.0", "k_path.2"].map(|p| format!("layers.{l}.{p}.weight"))
}

impl Predictor {
    /// Fresh paths for `layers` (PyTorch's `nn.Linear` initialization: U(±1/√fan_in)), float32
    /// (float64 for a float64 model), trainable (they carry gradients).
    pub fn new(path: &Path, layers: &[usize], block: i64, slice: i64, width: i64, rank: i64, (kind, device): (Kind, Device)) -> Predictor {
        let kind = kernels::accum_kind(kind);
        let linear = |out: i64, inp: i64| {
            let b = 1.0 / (inp as f64).sqrt();
            (Tensor::rand([out, inp], (kind, device)) * (2.0 * b) - b).set_requires_grad(true)
        };
        let mlp = || Mlp { w1: linear(width, block * slice), w2: linear(rank, width) };
        let layers = layers.iter().map(|&l| (l, Paths { q: mlp(), k: mlp() })).collect();
        Predictor { path: path.to_path_buf(), block, slice, layers }
    }

    /// Every weight by its file name.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (&l, p) in &self.layers {
            let [a, b, c, d] = names(l);
            out.extend([(a, &p.q.w1), (b, &p.q.w2), (c, &p.k.w1), (d, &p.k.w2)]);
        }
        out
    }

    pub fn save(&self) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.parameters().into_iter().map(|(n, t)| (n, t.detach())).collect();
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
        }
        crate::model::weights::write_safetensors(&self.path, &tensors)
    }

    /// Reads a predictor for blocks of `slice`-wide slices (the model's head_dim), in `kind`'s
    /// accumulation precision on `device`, without gradients.
    pub fn load(path: &Path, slice: i64, kind: Kind, device: Device) -> Result<Predictor> {
        if !path.is_file() {
            return Err(TrainerError::Checkpoint { path: path.to_path_buf(), msg: "no predictor file here: fit one with `train predictor --recipe R`".into() });
        }
        let files = crate::model::weights::WeightFiles::open_file(path)?;
        let bad = |msg: String| TrainerError::Checkpoint { path: path.to_path_buf(), msg };
        let mut found: Vec<usize> = Vec::new();
        for n in files.names() {
            let l = n.strip_prefix("layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            match l {
                Some(l) if names(l).contains(n) => found.push(l),
                _ => return Err(bad(format!("unexpected tensor `{n}` (a predictor holds layers.{{l}}.{{q,k}}_path.{{0,2}}.weight)"))),
            }
        }
        found.dedup();
        let acc = kernels::accum_kind(kind);
        let (mut layers, mut block) = (BTreeMap::new(), None);
        for l in found {
            let [a, b, c, d] = names(l);
            let w = |n: &str| files.load_any(n, acc, device);
            let (qa, qb, ka, kb) = (w(&a)?, w(&b)?, w(&c)?, w(&d)?);
            if [&qa, &qb, &ka, &kb].iter().any(|t| t.dim() != 2) {
                return Err(bad(format!("layer {l}: every path weight is a matrix ({:?}, {:?}, {:?}, {:?})", qa.size(), qb.size(), ka.size(), kb.size())));
            }
            let (width, inp, rank) = (qa.size()[0], qa.size()[1], qb.size()[0]);
            if qb.size() != [rank, width] || ka.size() != [width, inp] || kb.size() != [rank, width] {
                return Err(bad(format!("layer {l}: the paths' shapes disagree ({:?}, {:?}, {:?}, {:?})", qa.size(), qb.size(), ka.size(), kb.size())));
            }
            if inp % slice != 0 {
                return Err(bad(format!("layer {l}: {inp} inputs are not whole blocks of {slice}-wide slices (the model's head_dim)")));
            }
            if *block.get_or_insert(inp / slice) != inp / slice {
                return Err(bad(format!("layer {l}: blocks of {} tokens where other layers have {}", inp / slice, block.unwrap_or(0))));
            }
            layers.insert(l, Paths { q: Mlp { w1: qa, w2: qb }, k: Mlp { w1: ka, w2: kb } });
        }
        let block = block.ok_or_else(|| bad("holds no layer".into()))?;
        Ok(Predictor { path: path.to_path_buf(), block, slice, layers })
    }

    /// Whether this predictor serves a recipe's sparse `layers` with blocks of `block` tokens;
    /// the error says what differs.
    pub fn check(&self, layers: &[usize], block: i64) -> std::result::Result<(), String> {
        if block != self.block {
            return Err(format!("{} was fitted for blocks of {} tokens, not sparsity.block_size = {block}: fit it again", self.path.display(), self.block));
        }
        match layers.iter().find(|l| !self.layers.contains_key(l)) {
            Some(l) => Err(format!("{} has no predictor for sparse layer {l} (it has layers {:?}): fit it again for these sparsity.layers", self.path.display(), self.layers.keys().collect::<Vec<_>>())),
            None => Ok(()),
        }
    }

    /// The predicted causal block map of one document (zero above the diagonal), with gradients
    /// to the paths when they carry them.
    ///
    /// # Shapes
    /// - `x_norm`: `[n, hidden]` the layer's normed input → `[nb, nb]`, `nb = ⌈n / block⌉`
    pub fn map(&self, layer: usize, x_norm: &Tensor) -> Result<Tensor> {
        let p = self.layers.get(&layer).ok_or_else(|| TrainerError::Device(format!("{}: no predictor for layer {layer}", self.path.display())))?;
        let f = features(x_norm, self.block, self.slice).to_kind(p.q.w1.kind());
        let nb = f.size()[0];
        let (q, k) = (p.q.forward(&f).reshape([nb, -1]), p.k.forward(&f).reshape([nb, -1])); // [nb, S·rank]
        Ok(q.matmul(&k.tr()).tril(0))
    }
}

/// Block features of one document.
///
/// # Shapes
/// - `x`: `[n, S·d]` → `[nb, S, block·d]`
pub fn features(x: &Tensor, block: i64, slice: i64) -> Tensor {
    let (n, hidden) = (x.size()[0], x.size()[1]);
    let nb = (n + block - 1) / block;
    let s = hidden / slice;
    x.constant_pad_nd([0, 0, 0, nb * block - n]) // [nb·block, S·d]
        .view([nb, block, s, slice])
        .permute([0, 2, 1, 3]) // [nb, S, block, d]
        .reshape([nb, s, block * slice])
}
