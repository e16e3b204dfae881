//! The planner's inventory of a training step, taken from the code that allocates the tensors:
//! one decoder block's forward runs at two token counts on zero-cost weights (stride-0 views of
//! one scalar) and every tensor it saves is measured, so the saved-activation figures are those
//! of [`block::forward`] itself; weights come from [`param_specs`], gradients and optimizer state
//! from the optimizer's rules (float32 moments, float32 masters beside bf16/fp16 weights).
//! The backward's working buffers (level-1 layout) follow [`block::backward`]'s op order.
use std::collections::BTreeMap;

use planner::inventory::{ChannelCols, Group, Inventory, LayerFlops, OpBuffer, Rows, Sparse, SparseRows, TensorClass};
use tch::{Device, Kind, Tensor};

use crate::model::block::{self, name};
use crate::model::config::ModelConfig;
use crate::error::{Result, TrainerError};
use crate::model::lora::LoraConfig;
use crate::model::proj::Proj;
use crate::model::sparse::{Scorer, Sparsity};
use crate::model::{param_specs, Model};

/// Token counts of the two probes (multiples of 64, so padded kernel outputs stay linear).
const PROBE_T: [i64; 2] = [64, 128];

fn kind_name(k: Kind) -> String {
    format!("{k:?}").to_lowercase()
}

/// `[64, 8, 128]` at T=64 and `[128, 8, 128]` at T=128 → `[T, 8, 128]`.
fn shape_formula(a: &[i64], b: &[i64]) -> String {
    let dims: Vec<String> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x == y {
                x.to_string()
            } else if x % PROBE_T[0] == 0 && x / PROBE_T[0] == y / PROBE_T[1] && x / PROBE_T[0] != 1 {
                format!("T·{}", x / PROBE_T[0])
            } else {
                "T".into()
            }
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// A saved tensor as a probe measured it: name, shape, dtype, bytes.
type Measured = (String, Vec<i64>, Kind, u64);

/// One block of `cfg` on zero-cost weights (stride-0 views of one scalar), whose forward
/// [`Probe::saved`] measures.
struct Probe {
    one: ModelConfig,
    model: Model,
    kind: Kind,
    device: Device,
    full: bool,
}

impl Probe {
    /// A sharded layer (`kv_copies` > 1, [`block::Layout::Sharded`]) saves per local token what a
    /// whole-sequence layer with `kv_heads × kv_copies` KV heads saves (its q, k, v and logsumexp
    /// hold every token of 1/P of those heads): it is probed as that layer.
    fn new(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, kv_copies: i64) -> Result<Probe> {
        let mut one = cfg.clone();
        one.num_layers = 1;
        one.num_kv_heads *= kv_copies;
        one.vocab_size = 8; // the block never touches the embedding
        let zero = Tensor::zeros([1], (kind, device));
        let one_t = Tensor::ones([1], (kind, device));
        let named: BTreeMap<String, Tensor> = param_specs(&one)
            .into_iter()
            .map(|(n, shape)| {
                // Norm weights 1, everything else 0; stride-0 views cost no memory.
                let base = if n.ends_with("norm.weight") { &one_t } else { &zero };
                let view = base.view(vec![1; shape.len()].as_slice()).expand(&shape, false);
                (n, view)
            })
            .collect();
        let mut model = Model::from_named(one.clone(), named)?;
        if let Some(l) = lora {
            model.attach_lora(l, 0)?;
        }
        Ok(Probe { one, model, kind, device, full: lora.is_none() })
    }

    /// The tensors the block saves over one document of `t` tokens (`sparsity`: as its layer 0).
    fn saved(&self, t: i64, sparsity: Option<&Sparsity>) -> Result<Vec<Measured>> {
        let _guard = tch::no_grad_guard();
        let mut ctx = block::Context::new(&self.one, &[t], self.kind, self.device);
        ctx.train = true;
        ctx.full = self.full;
        ctx.sparsity = sparsity.map(|s| std::sync::Arc::new(s.clone()));
        let x = Tensor::zeros([t, self.one.hidden_size], (self.kind, self.device));
        let (_, saved) = block::forward(&self.model.layers[0], &x, &ctx, 0)?;
        Ok(saved.named().into_iter().map(|(n, t)| (n, t.size(), t.kind(), (t.numel() * t.kind().elt_size_in_bytes()) as u64)).collect())
    }
}

/// One block's saved tensors at T = 64 and 128, measured on `device` (see [`Probe::new`] for
/// `kv_copies`).
fn probe_saved(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, layout: block::Layout, kv_copies: i64) -> Result<Vec<TensorClass>> {
    let probe = Probe::new(cfg, kind, lora, device, kv_copies)?;
    let at = PROBE_T.iter().map(|&t| probe.saved(t, None)).collect::<Result<Vec<_>>>()?;
    let dt = (PROBE_T[1] - PROBE_T[0]) as u64;
    Ok(at[0]
        .iter()
        .zip(&at[1])
        .map(|((name, s0, k, b0), (_, s1, _, b1))| {
            let per_token = (b1 - b0) / dt;
            TensorClass {
                group: Group::Saved,
                name: name.clone(),
                shape: shape_formula(s0, s1),
                dtype: kind_name(*k),
                count: 1,
                fixed_bytes: b0 - per_token * PROBE_T[0] as u64,
                per_token_bytes: per_token,
                recomputable: block::recomputable(name, layout),
                sliced: layout.tiled() && !crate::model::tiled::read_whole(name, layout),
                in_sparse: SparseRows::All,
                recomputable_in_sparse: block::recomputable(name, block::Layout::Sparse),
                in_channel_layers: ChannelCols::Same,
            }
        })
        .collect())
}

/// The learned scorer's weights, resident for the whole run: the fitted file's when it exists,
/// else those `train predictor` makes by default for the recipe's sparse layers.
pub fn predictor_weights(s: &crate::train::recipe::SparsitySection, run_dir: &std::path::Path, cfg: &ModelConfig, kind: Kind) -> Result<TensorClass> {
    use crate::model::predictor::{Predictor, DEFAULT_RANK, DEFAULT_WIDTH};
    let acc = kernels::accum_kind(kind);
    let path = s.predictor_path(run_dir);
    let sparse = s.layers.resolve("sparsity.layers", cfg.num_layers as usize).map_err(TrainerError::Device)?;
    let keyed = |e: String| TrainerError::Device(format!("`sparsity.predictor`: {e}"));
    let (numel, layers, note) = if path.is_file() {
        // The run would refuse a file that does not serve it: so does the plan.
        let p = Predictor::load(&path, cfg.head_dim, kind, Device::Cpu).map_err(|e| keyed(e.to_string()))?;
        p.check(&sparse, s.block_size).map_err(keyed)?;
        (p.parameters().iter().map(|(_, t)| t.numel() as u64).sum::<u64>(), p.layers.len() as u64, "fitted")
    } else {
        let layers = sparse.len() as u64;
        let per_path = (DEFAULT_WIDTH * s.block_size * cfg.head_dim + DEFAULT_RANK * DEFAULT_WIDTH) as u64;
        (2 * per_path * layers, layers, "not fitted yet: train predictor's default widths")
    };
    let per_layer = (numel / layers.max(1)) as i64;
    Ok(fixed_class(Group::Weights, format!("predictor {} ({note})", path.display()), &[per_layer], acc.elt_size_in_bytes() as u64, layers, kind_name(acc)))
}

/// A job of several processes sums gradients across ranks ([`crate::world::World::start_sum`]):
/// the small gradients of one hand-over (a layer's, or the embedding's, head's and final norm's)
/// are copied into buckets of up to `cap` bytes (`dist.bucket_cap_mb`), larger ones are summed in
/// place. One bucket is the copy beside the gradients; counted for the whole step (it lives while
/// a layer's gradients are handed over in the last micro-batch's backward). None: nothing small.
pub fn all_reduce_bucket(statics: &[TensorClass], layers: u64, cap: u64) -> Option<TensorClass> {
    let small: Vec<&TensorClass> = statics.iter().filter(|c| c.group == Group::Grads && c.fixed_bytes < cap).collect();
    let per_layer: u64 = small.iter().filter(|c| c.count == layers).map(|c| c.fixed_bytes).sum();
    let others: u64 = small.iter().filter(|c| c.count != layers).map(|c| c.fixed_bytes * c.count).sum();
    let bytes = per_layer.max(others).min(cap);
    (bytes > 0).then(|| fixed_class(Group::Grads, "all-reduce bucket: small gradients flattened".into(), &[bytes as i64], 1, 1, "bytes".into()))
}

/// `count` tensors of `shape` whose bytes do not depend on the tokens.
fn fixed_class(group: Group, name: String, shape: &[i64], elt: u64, count: u64, dtype: String) -> TensorClass {
    TensorClass {
        group,
        name,
        shape: format!("{shape:?}"),
        dtype,
        count,
        fixed_bytes: shape.iter().product::<i64>() as u64 * elt,
        per_token_bytes: 0,
        recomputable: false,
        sliced: false,
        in_sparse: SparseRows::All,
        recomputable_in_sparse: false,
        in_channel_layers: ChannelCols::Same,
    }
}

/// `inv` with token sparsity `s`: which saved tensors hold the kept tokens only in a sparse
/// layer, measured by running the block as one (whole sequence: sparse layers run no tiles);
/// what MEMO's split may recompute there is [`block::recomputable`] of [`block::Layout::Sparse`].
///
/// The probe's weights are zero, so every block rates alike and a document of 2·64 tokens in
/// blocks of 64 keeping half keeps its first block: K = 64 of T = 128. A tensor as large as the
/// dense block's (`inv`'s, a whole-sequence inventory) at T = 64 holds the kept rows; one the
/// dense block does not save (the kept row indices) is measured at K = 64 and 128.
pub fn with_sparsity(mut inv: Inventory, cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, s: &Sparsity) -> Result<Inventory> {
    if inv.tile_tokens.is_some() {
        return Err(TrainerError::Device("token sparsity with token tiles is not built yet (sparse layers run whole sequences)".into()));
    }
    let device = if matches!(device, Device::Cuda(_)) && !tch::Cuda::is_available() { Device::Cpu } else { device };
    let probe = Probe::new(cfg, kind, lora, device, 1)?;
    // Which scorer rated the blocks does not change what is saved (and a predictor is fitted for
    // the model's own layers and blocks, not the probe's).
    let rule = Sparsity::attention_only(PROBE_T[0], 0.5, vec![0], Scorer::Exact, false);
    let sparse: Vec<Vec<Measured>> = [2 * PROBE_T[0], 4 * PROBE_T[0]].iter().map(|&t| probe.saved(t, Some(&rule))).collect::<Result<_>>()?;
    let bytes_in = |v: &[Measured], n: &str| v.iter().find(|m| m.0 == n).map(|m| m.3);
    let internal = |n: &str| TrainerError::Device(format!("internal: the sparse block's `{n}` holds neither every token's rows nor the kept ones"));
    let mut only_sparse = Vec::new();
    for (n, shape, k, b) in &sparse[0] {
        match inv.saved.iter_mut().find(|c| &c.name == n) {
            Some(c) => {
                c.in_sparse = match *b {
                    b if b == c.bytes(2 * PROBE_T[0] as u64) => SparseRows::All,
                    b if b == c.bytes(PROBE_T[0] as u64) => SparseRows::Kept,
                    _ => return Err(internal(n)),
                }
            }
            None => {
                let b2 = bytes_in(&sparse[1], n).ok_or_else(|| internal(n))?;
                let per_token = b2.checked_sub(*b).ok_or_else(|| internal(n))? / PROBE_T[0] as u64;
                let shape = shape.iter().map(|&d| if d == PROBE_T[0] { "K".to_string() } else { d.to_string() }).collect::<Vec<_>>().join(", ");
                only_sparse.push(TensorClass {
                    group: Group::Saved,
                    name: n.clone(),
                    shape: format!("[{shape}]"),
                    dtype: kind_name(*k),
                    count: 1,
                    fixed_bytes: b - per_token * PROBE_T[0] as u64,
                    per_token_bytes: per_token,
                    recomputable: false,
                    sliced: false,
                    in_sparse: SparseRows::OnlySparse,
                    recomputable_in_sparse: false,
                    in_channel_layers: ChannelCols::Same,
                });
            }
        }
    }
    inv.saved.extend(only_sparse);
    if s.mlp_keep < 1.0 && !s.mlp_layers.is_empty() {
        with_mlp_channels(&mut inv, &probe, s.mlp_keep)?;
        // Sparse inventories are whole-sequence ones: their buffers again, with the channels.
        let c = Some(crate::model::sparse::kept_channels(cfg.intermediate_size, s.mlp_keep) as u64);
        inv.backward = backward_buffers(cfg, kind, lora, &inv.saved, c);
        inv.forward = forward_buffers(cfg, kind, lora, c);
    }
    inv.sparse = Some(Sparse { layers: s.layers.clone(), block: s.block as u64, keep: s.keep, mlp_layers: s.mlp_layers.clone(), mlp_keep: s.mlp_keep });
    Ok(inv)
}

/// Marks the saved tensors a layer with MLP channel sparsity (keeping `keep` of the channels)
/// changes, measured by running `probe`'s block as one at two lengths: those whose bytes differ
/// from `inv`'s hold the kept channels' columns, one the dense block does not save (the channel
/// indices) exists in such layers only.
fn with_mlp_channels(inv: &mut Inventory, probe: &Probe, keep: f64) -> Result<()> {
    let rule = Sparsity { mlp_keep: keep, mlp_layers: vec![0], ..Sparsity::attention_only(PROBE_T[0], 1.0, vec![], Scorer::Exact, false) };
    let at: Vec<Vec<Measured>> = PROBE_T.iter().map(|&t| probe.saved(t, Some(&rule))).collect::<Result<_>>()?;
    let dt = (PROBE_T[1] - PROBE_T[0]) as u64;
    let internal = |n: &str| TrainerError::Device(format!("internal: the channel-sparse block's `{n}` does not scale with the tokens"));
    let mut only = Vec::new();
    for ((n, s0, k, b0), (_, s1, _, b1)) in at[0].iter().zip(&at[1]) {
        let per_token = b1.checked_sub(*b0).ok_or_else(|| internal(n))? / dt;
        match inv.saved.iter_mut().find(|c| &c.name == n) {
            Some(c) if c.bytes(PROBE_T[0] as u64) == *b0 && c.bytes(PROBE_T[1] as u64) == *b1 => {}
            Some(c) if c.fixed_bytes + per_token * PROBE_T[0] as u64 == *b0 => c.in_channel_layers = ChannelCols::Kept { shape: shape_formula(s0, s1), per_token_bytes: per_token },
            Some(_) => return Err(internal(n)),
            None if per_token == 0 => only.push(TensorClass {
                group: Group::Saved,
                name: n.clone(),
                shape: format!("{s0:?}"),
                dtype: kind_name(*k),
                count: 1,
                fixed_bytes: *b0,
                per_token_bytes: 0,
                recomputable: false,
                sliced: false,
                in_sparse: SparseRows::All,
                recomputable_in_sparse: false,
                in_channel_layers: ChannelCols::Only,
            }),
            None => return Err(internal(n)),
        }
    }
    inv.saved.extend(only);
    Ok(())
}

/// Classes of the weights, gradients and optimizer state (token-independent).
fn statics(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>) -> Vec<TensorClass> {
    let e = kind.elt_size_in_bytes() as u64;
    let acc = kernels::accum_kind(kind);
    let a = acc.elt_size_in_bytes() as u64;
    // Group per-layer parameters by their name without the layer index.
    let mut classes: BTreeMap<String, (Vec<i64>, u64)> = BTreeMap::new();
    for (n, shape) in param_specs(cfg) {
        let key = n.split('.').map(|p| if p.parse::<u64>().is_ok() { "*" } else { p }).collect::<Vec<_>>().join(".");
        classes.entry(key).or_insert((shape, 0)).1 += 1;
    }
    let class = fixed_class;
    let mut v = Vec::new();
    for (name, (shape, count)) in &classes {
        v.push(class(Group::Weights, name.clone(), shape, e, *count, kind_name(kind)));
    }
    // What trains: every weight, or the adapters (float32 A [r, in] and B [out, r]).
    let trained: Vec<(String, Vec<i64>, u64, Kind)> = match lora {
        None => classes.iter().map(|(n, (s, c))| (n.clone(), s.clone(), *c, kind)).collect(),
        Some(l) => classes
            .iter()
            .filter(|(n, (s, _))| s.len() == 2 && l.targets.iter().any(|t| n.contains(&format!(".{t}."))))
            .flat_map(|(n, (s, c))| {
                let base = n.trim_end_matches(".weight");
                [(format!("{base}.lora_A.weight"), vec![l.rank, s[1]], *c, Kind::Float), (format!("{base}.lora_B.weight"), vec![s[0], l.rank], *c, Kind::Float)]
            })
            .collect(),
    };
    for (n, s, c, k) in &trained {
        let pe = k.elt_size_in_bytes() as u64;
        v.push(class(Group::Grads, format!("grad {n}"), s, pe, *c, kind_name(*k)));
        let pa = kernels::accum_kind(*k);
        v.push(class(Group::Optimizer, format!("adam m+v {n}"), s, 2 * pa.elt_size_in_bytes() as u64, *c, kind_name(pa)));
        if pa != *k {
            v.push(class(Group::Optimizer, format!("master {n}"), s, a, *c, kind_name(acc)));
        }
    }
    v
}

/// A per-token buffer of one layer's op sequence, live over ops `start..=end`.
fn op_buf(name: &str, shape: String, per_token: u64, start: u32, end: u32) -> OpBuffer {
    OpBuffer { name: name.into(), shape, fixed_bytes: 0, per_token_bytes: per_token, start, end, rows: Rows::Tokens, sliced: false, in_channel_layers: ChannelCols::Same }
}

/// A buffer of `rows` rows (see [`Rows`]) live over ops `start..=end`.
fn rows_buf(rows: Rows, name: &str, shape: String, per_token: u64, start: u32, end: u32) -> OpBuffer {
    OpBuffer { rows, ..op_buf(name, shape, per_token, start, end) }
}

/// The widest LoRA term (float32, then cast) among the adapted projections of `projs`, per token.
fn widest_lora_term(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, projs: &[Proj]) -> u64 {
    let Some(l) = lora else { return 0 };
    let e = kind.elt_size_in_bytes() as u64;
    let per_elt = 4 + if e == 4 { 0 } else { e };
    projs.iter().filter(|p| l.targets.iter().any(|t| t == p.short())).map(|p| p.shape(cfg).0.max(p.shape(cfg).1) as u64 * per_elt).max().unwrap_or(0)
}

/// One layer's backward under token tiles, in [`crate::model::tiled::backward`]'s order: slot 0
/// the saved tensors read whole (K, V, the logsumexp), slot 1 the tiles, last to first (MLP,
/// post-norm, o_proj, the tile's queries' attention backward, its share of the input gradient
/// through q, K and V). Whole: the residual gradient, K, V and their gradients; an offloaded
/// layer's other saved tensors come two tiles at a time (`sliced`), a kept layer's stay whole.
fn tiled_backward_buffers(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, saved: &[TensorClass]) -> Vec<OpBuffer> {
    let e = kind.elt_size_in_bytes() as u64;
    let acc = kernels::accum_kind(kind).elt_size_in_bytes() as u64;
    let (d, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (qd, kvd) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let group = qd / (cfg.num_kv_heads as u64).max(1);
    let mut v = vec![
        op_buf("dy, then dh, then dx (one buffer, added to in place)", format!("[T, {d}]"), d * e, 0, 1),
        op_buf("d k, d v summed over query tiles (accumulation dtype)", format!("[T, {}]", 2 * kvd), 2 * kvd * acc, 1, 1),
        // A tile's queries against the keys before it: one kv group's key gradients over them.
        op_buf("d k, d v of one kv group over a tile's keys (kernel outputs)", format!("2 × [T, {group}]"), 2 * group * e, 1, 1),
        // The MLP's moment (gate, up, d act, d gate, d up, one SwiGLU temporary, h, x_mlp), the
        // attention's (q, d out, d q and its RoPE temporaries, x_attn) and the input gradient's
        // (d q, the tile's d k and d v and their RoPE backward, x_attn, d x_attn, d x) never
        // coexist; the largest is counted.
        rows_buf(
            Rows::Tile,
            "tile: MLP backward (gate, up, d act, d gate, d up, temporary, h, x_mlp), the queries' attention backward or the q/k/v share",
            format!("[tile, max(6 × {i} + 2 × {d}, 5 × {qd} + {d}, {qd} + 4 × {d} + 4 × {kvd})]"),
            (6 * i + 2 * d).max(5 * qd + d).max(qd + 4 * d + 4 * kvd) * e + acc + widest_lora_term(cfg, kind, lora, &Proj::ALL),
            1,
            1,
        ),
        // Full fine-tuning: the layer's weight gradients summed over tiles in the accumulation
        // dtype (below float32 they would lose bits at every add; in float32 the sum is the
        // gradient itself), beside one tile's.
        OpBuffer {
            fixed_bytes: if lora.is_none() { (d * qd + 2 * d * kvd + qd * d + 3 * d * i + 2 * d) * (if acc > e { acc } else { 0 } + e) } else { 0 },
            ..op_buf("weight gradients: the sum over tiles and one tile's", "[layer parameters]".into(), 0, 0, 1)
        },
    ];
    for c in saved {
        let rows = if c.recomputable { Rows::Stored } else { Rows::Tokens };
        v.push(OpBuffer { name: format!("saved {}", c.name), shape: c.shape.clone(), fixed_bytes: c.fixed_bytes, per_token_bytes: c.per_token_bytes, start: 0, end: 1, rows, sliced: c.sliced, in_channel_layers: ChannelCols::Same });
    }
    v
}

/// One layer's forward transients under token tiles ([`crate::model::tiled::forward`]): slot 1
/// the pre-attention tiles writing q, k, v whole, slot 2 attention, slot 3 the post-attention
/// tiles writing the block output.
fn tiled_forward_buffers(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>) -> Vec<OpBuffer> {
    let e = kind.elt_size_in_bytes() as u64;
    let acc = kernels::accum_kind(kind).elt_size_in_bytes() as u64;
    let (d, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (qd, kvd) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let group = qd / (cfg.num_kv_heads as u64).max(1);
    // LoRA dropout: each keep-mask is drawn whole (as the untiled pass draws it, so the draws
    // match) from a `[T, in]` tensor of the working dtype before it becomes the saved bool mask.
    let widest_masked_input = lora
        .filter(|l| l.dropout > 0.0)
        .map_or(0, |l| Proj::ALL.iter().filter(|p| l.targets.iter().any(|t| t == p.short())).map(|p| p.shape(cfg).1 as u64).max().unwrap_or(0));
    vec![
        op_buf("LoRA dropout keep-mask being drawn (working dtype)", format!("[T, {widest_masked_input}]"), widest_masked_input * e, 0, 0),
        // The stored rows of q are their own copy once rows are dropped; the whole q goes after
        // attention (K and V are saved whole).
        rows_buf(Rows::Rebuilt, "q whole (attention's input) beyond its stored rows", format!("[T, {qd}]"), qd * e, 1, 2),
        op_buf("attention output of one kv group (kernel output)", format!("[T, {group}]"), group * e, 2, 2),
        op_buf("block output", format!("[T, {d}]"), d * e, 3, 3),
        rows_buf(Rows::Tile, "pre-attention tile: x_attn, q, k, v, RoPE temporaries", format!("[tile, {d} + 3 × {qd} + 2 × {kvd}]"), (d + 3 * qd + 2 * kvd) * e + acc + widest_lora_term(cfg, kind, lora, &[Proj::Q, Proj::K, Proj::V]), 1, 1),
        rows_buf(Rows::Tile, "post-attention tile: h, x_mlp, gate, up, act, down output, block output", format!("[tile, 4 × {d} + 3 × {i}]"), (4 * d + 3 * i) * e + acc + widest_lora_term(cfg, kind, lora, &[Proj::O, Proj::Gate, Proj::Up, Proj::Down]), 3, 3),
    ]
}

/// LoRA's low-rank terms (computed in the adapter's float32, then cast to the working dtype) of
/// the adapted projections among `ops`: (projection names, width of the term, op slot).
fn lora_terms(kind: Kind, lora: Option<&LoraConfig>, what: &str, ops: &[(&[Proj], u64, u32)]) -> Vec<OpBuffer> {
    let Some(l) = lora else { return Vec::new() };
    let e = kind.elt_size_in_bytes() as u64;
    let per_elt = 4 + if e == 4 { 0 } else { e };
    ops.iter()
        .filter(|(projs, _, _)| projs.iter().any(|p| l.targets.iter().any(|t| t == p.short())))
        .map(|(projs, dim, slot)| {
            let names: Vec<&str> = projs.iter().map(|p| p.short()).collect();
            op_buf(&format!("LoRA term of the {what} ({})", names.join("/")), format!("[T, {dim}]"), dim * per_elt, *slot, *slot)
        })
        .collect()
}

/// The first op of [`backward_buffers`] after a whole-sequence layer backward asked for the next
/// layers' saved tensors ([`block::backward`]'s `mlp_done`, once `d h` exists and `dy` and the
/// post-norm's gradient are gone): o_proj's backward, the first of the attention's ops.
pub const PREFETCH_AT_OP: u32 = 6;

/// One layer's backward buffers in [`block::backward`]'s op order (slots 1..=11: down, swiglu,
/// gate/up, post-norm, residual, o_proj, attention, RoPE, q/k/v, input norm, residual), and each
/// saved tensor until the op that consumes it.
///
/// `channels`: with MLP channel sparsity, the channels its layers keep (their MLP gradients span
/// those only, and their saved tensors are as `saved` has them there).
fn backward_buffers(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, saved: &[TensorClass], channels: Option<u64>) -> Vec<OpBuffer> {
    let e = kind.elt_size_in_bytes() as u64;
    let (d, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (qd, kvd) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let buf = op_buf;
    // An MLP gradient `[T, I]`: `[T, c]` in a layer with MLP channel sparsity.
    let mlp = |name: &str, start: u32, end: u32| OpBuffer {
        in_channel_layers: channels.map_or(ChannelCols::Same, |c| ChannelCols::Kept { shape: format!("[T, {c}]"), per_token_bytes: c * e }),
        ..op_buf(name, format!("[T, {i}]"), i * e, start, end)
    };
    let mut v = vec![
        buf("dy", format!("[T, {d}]"), d * e, 0, 5),
        mlp("d act", 1, 2),
        mlp("d gate", 2, 3),
        // σ(gate) and silu'(gate) while the SwiGLU gradients are formed: σ is gone before d gate
        // exists, so one tensor beyond the two results at any moment.
        mlp("SwiGLU backward temporaries", 2, 2),
        mlp("d up", 2, 3),
        buf("d x_mlp", format!("[T, {d}]"), d * e, 3, 4),
        buf("d h (norm)", format!("[T, {d}]"), d * e, 4, 5),
        buf("d h", format!("[T, {d}]"), d * e, 5, 11),
        buf("d attn_out", format!("[T, {qd}]"), qd * e, 6, 7),
        buf("d q", format!("[T, {qd}]"), qd * e, 7, 8),
        buf("d k", format!("[T, {kvd}]"), kvd * e, 7, 8),
        buf("d v", format!("[T, {kvd}]"), kvd * e, 7, 9),
        buf("d q (rope)", format!("[T, {qd}]"), qd * e, 8, 9),
        buf("RoPE backward temporaries", format!("2 × [T, {qd}]"), 2 * qd * e, 8, 8),
        buf("d k (rope)", format!("[T, {kvd}]"), kvd * e, 8, 9),
        buf("d x_attn", format!("[T, {d}]"), d * e, 9, 10),
        buf("d x (norm)", format!("[T, {d}]"), d * e, 10, 11),
        buf("dx", format!("[T, {d}]"), d * e, 11, 11),
    ];
    // Attention runs one kernel call per kv head: the call's gradients for that group's query
    // heads (q, and k and v before they are summed into the kv head) exist for one group at a
    // time; k and v are broadcast views, never copied.
    let group = qd / (cfg.num_kv_heads as u64).max(1);
    v.push(buf("d q, d k, d v of one kv group (kernel outputs)", format!("3 × [T, {group}]"), 3 * group * e, 7, 7));
    // LoRA: an adapted projection's input gradient gets its low-rank term added in place, so
    // that term exists beside it for the op.
    v.extend(lora_terms(kind, lora, "d input", &[(&[Proj::Down], i, 1), (&[Proj::Gate, Proj::Up], d, 3), (&[Proj::O], qd, 6), (&[Proj::Q, Proj::K, Proj::V], d, 9)]));
    for c in saved {
        // A LoRA tensor is named `lora_…:{HF name of its projection}`.
        let proj = c.name.split(':').nth(1).and_then(|n| Proj::ALL.into_iter().find(|p| p.hf_name() == n));
        let end = match (c.name.as_str(), proj) {
            (name::ACT, _) => 1,
            (name::GATE | name::UP, _) => 2,
            (name::X_MLP, _) => 3,
            (name::H | name::RSTD_MLP, _) => 4,
            (name::X_ATTN, _) => 9,
            (name::X | name::RSTD_ATTN, _) => 10,
            (_, Some(Proj::Down)) => 1,
            (_, Some(Proj::Gate | Proj::Up)) => 3,
            (_, Some(Proj::O)) => 6,
            (_, Some(Proj::Q | Proj::K | Proj::V)) => 9,
            _ => 7, // q, k, v, attention output, logsumexp, RNG state
        };
        v.push(OpBuffer { name: format!("saved {}", c.name), shape: c.shape.clone(), fixed_bytes: c.fixed_bytes, per_token_bytes: c.per_token_bytes, start: 0, end, rows: Rows::Tokens, sliced: false, in_channel_layers: c.in_channel_layers.clone() });
    }
    v
}

/// One layer's forward transients (what is not saved) in [`block::forward`]'s op order: q and k
/// before RoPE, one kv group's attention output, the o_proj output, the down_proj
/// output and the block output (the next layer's input). Their best-fit peak per token is the
/// forward's working set in the level-2 layout.
///
/// `channels`: with MLP channel sparsity, whose layers hold gate, up and act over every channel
/// (saved whole elsewhere) until the kept channels' columns are taken.
fn forward_buffers(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, channels: Option<u64>) -> Vec<OpBuffer> {
    let e = kind.elt_size_in_bytes() as u64;
    let d = cfg.hidden_size as u64;
    let (qd, kvd) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let buf = op_buf;
    let mut v = vec![
        buf("q before RoPE", format!("[T, {qd}]"), qd * e, 1, 2),
        buf("k before RoPE", format!("[T, {kvd}]"), kvd * e, 1, 2),
        // x·cos and rotate_half(x)·sin (and the rotation's halves) beside q's input and output.
        buf("RoPE temporaries", format!("2 × [T, {qd}]"), 2 * qd * e, 2, 2),
        buf("o_proj output", format!("[T, {d}]"), d * e, 4, 4),
        buf("down_proj output", format!("[T, {d}]"), d * e, 6, 7),
        buf("block output", format!("[T, {d}]"), d * e, 7, 7),
    ];
    // One kv group's attention output from the kernel, before it is written into the saved one.
    let group = qd / (cfg.num_kv_heads as u64).max(1);
    v.push(buf("attention output of one kv group (kernel output)", format!("[T, {group}]"), group * e, 3, 3));
    // LoRA: an adapted projection's low-rank term exists beside its output until it is added in
    // place.
    let i = cfg.intermediate_size as u64;
    v.extend(lora_terms(kind, lora, "output", &[(&[Proj::Q, Proj::K, Proj::V], qd, 1), (&[Proj::O], d, 4), (&[Proj::Gate, Proj::Up], i, 5), (&[Proj::Down], d, 6)]));
    if channels.is_some() {
        v.push(OpBuffer { in_channel_layers: ChannelCols::Only, ..op_buf("gate, up, act over every channel (before the kept columns are taken)", format!("3 × [T, {i}]"), 3 * i * e, 5, 7) });
    }
    v
}

/// The inventory for `cfg` trained in `kind` (LoRA when `lora` is set); saved tensors measured
/// on `device` (the CPU where CUDA is absent).
pub fn build(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, ce_chunk: i64) -> Result<Inventory> {
    build_tiled(cfg, kind, lora, device, ce_chunk, None)
}

/// The inventory of `model` as it runs (its dtype, device, token tiles and sequence-parallel
/// group: then per rank, per token of its shard), LoRA per `lora`.
pub fn of_model(model: &Model, lora: Option<&LoraConfig>, ce_chunk: i64) -> Result<Inventory> {
    let inv = match &model.seq {
        Some(g) => build_sharded(&model.cfg, model.kind(), lora, model.device(), ce_chunk, model.tile_tokens.map(|t| t as u64), g.size as i64)?,
        None => build_tiled(&model.cfg, model.kind(), lora, model.device(), ce_chunk, model.tile_tokens.map(|t| t as u64))?,
    };
    match &model.sparsity {
        Some(s) => with_sparsity(inv, &model.cfg, model.kind(), lora, model.device(), s),
        None => Ok(inv),
    }
}

/// [`build`] for blocks run over token tiles of `tile` tokens (None: the whole sequence).
pub fn build_tiled(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, ce_chunk: i64, tile: Option<u64>) -> Result<Inventory> {
    build_with(cfg, kind, lora, device, ce_chunk, tile, 1)
}

/// [`build_tiled`] for one rank of a sequence split over `sp` ranks: per token of its shard.
pub fn build_sharded(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, ce_chunk: i64, tile: Option<u64>, sp: i64) -> Result<Inventory> {
    build_with(cfg, kind, lora, device, ce_chunk, tile, sp)
}

fn build_with(cfg: &ModelConfig, kind: Kind, lora: Option<&LoraConfig>, device: Device, ce_chunk: i64, tile: Option<u64>, sp: i64) -> Result<Inventory> {
    let device = if matches!(device, Device::Cuda(_)) && !tch::Cuda::is_available() { Device::Cpu } else { device };
    let kv_copies = match sp {
        p if p > 1 => crate::model::seq::kv_copies(cfg.num_heads, cfg.num_kv_heads, p).map_err(|e| TrainerError::Dist(format!("sequence parallel over {p}: {e}")))?,
        _ => 1,
    };
    let layout = match (tile, sp > 1) {
        (Some(_), true) => block::Layout::ShardedTiled,
        (None, true) => block::Layout::Sharded,
        (Some(_), false) => block::Layout::Tiled,
        (None, false) => block::Layout::Whole,
    };
    let saved = probe_saved(cfg, kind, lora, device, layout, kv_copies)?;
    let e = kind.elt_size_in_bytes() as u64;
    let (d, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let (qd, kvd, i) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64, cfg.intermediate_size as u64);
    let head = vec![
        // The final hidden state and its norm, then the gradients of both (the loss's, then the
        // norm's, which the last layer's backward takes over).
        TensorClass { group: Group::Head, name: "final norm: input, output and their gradients".into(), shape: format!("4 × [T, {d}]"), dtype: kind_name(kind), count: 1, fixed_bytes: 0, per_token_bytes: 4 * d * e, recomputable: false, sliced: false, in_sparse: SparseRows::All, recomputable_in_sparse: false, in_channel_layers: ChannelCols::Same },
        TensorClass { shape: format!("2 × [{ce_chunk}, {v}]"), ..fixed_class(Group::Head, "loss: logits chunk and its gradient".into(), &[2, ce_chunk, v as i64], 4, 1, "float32".into()) },
        TensorClass { group: Group::Head, name: "loss: logsumexp per token".into(), shape: "[T]".into(), dtype: "float32".into(), count: 1, fixed_bytes: 0, per_token_bytes: 4, recomputable: false, sliced: false, in_sparse: SparseRows::All, recomputable_in_sparse: false, in_channel_layers: ChannelCols::Same },
        TensorClass {
            group: Group::Context,
            name: "RoPE tables cos, sin".into(),
            shape: format!("2 × [T, {}]", cfg.head_dim),
            dtype: kind_name(kind),
            count: 1,
            fixed_bytes: 0,
            per_token_bytes: 2 * cfg.head_dim as u64 * e,
            recomputable: false,
            sliced: false,
            in_sparse: SparseRows::All,
            recomputable_in_sparse: false,
            in_channel_layers: ChannelCols::Same,
        },
    ];
    let (mut backward, mut forward) = match tile {
        None => (backward_buffers(cfg, kind, lora, &saved, None), forward_buffers(cfg, kind, lora, None)),
        Some(_) => (tiled_backward_buffers(cfg, kind, lora, &saved), tiled_forward_buffers(cfg, kind, lora)),
    };
    if layout.sharded() {
        // The all-to-alls around attention (block::attend): a tensor in one layout, its copy
        // ordered for the exchange and what comes back, the widest being q's and the output's;
        // backward also holds the output gradient and the output in the heads' layout. Slots:
        // attention's in block::forward / backward and in the tiled forward; the tiled backward's
        // one slot of tiles also holds the whole attention output gradient and, after the
        // attention backward, q, K and V's gradients for the second pass (tiled::backward_sharded).
        let (fwd_slot, bwd_slot) = if layout.tiled() { (2, 1) } else { (3, 7) };
        forward.push(op_buf("all-to-all: tensor, send copy, received", format!("3 × [T, {qd}]"), 3 * qd * e, fwd_slot, fwd_slot));
        backward.push(op_buf("output and its gradient in the heads' layout", format!("2 × [T, {qd}]"), 2 * qd * e, bwd_slot, bwd_slot));
        backward.push(op_buf("all-to-all: send copy, received", format!("2 × [T, {qd}]"), 2 * qd * e, bwd_slot, bwd_slot));
        if layout.tiled() {
            let kvd_copies = kvd * kv_copies as u64;
            backward.push(op_buf("d attention output, whole; then d q, d k, d v whole", format!("[T, {qd} + 2 × {kvd_copies}]"), (qd + 2 * kvd_copies) * e, 1, 1));
        }
    }
    let proj_params = d * qd + 2 * d * kvd + qd * d + 3 * d * i;
    Ok(Inventory {
        model: format!("{:?}: {} layers, hidden {d}, {} heads ({} kv), intermediate {i}, vocab {v}{}", cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, match sp {
            p if p > 1 => format!("; one of {p} ranks splitting each sequence: T is its shard, attention over all {p}·T tokens with {} of the heads{}", cfg.num_heads / p, if kv_copies > 1 { format!(" (KV heads repeated ×{kv_copies} to divide)") } else { String::new() }),
            _ => String::new(),
        }),
        layers: cfg.num_layers as usize,
        dtype: kind_name(kind),
        probed_on: format!("{device:?}"),
        statics: statics(cfg, kind, lora),
        saved,
        head,
        tile_tokens: tile,
        prefetch_at_op: PREFETCH_AT_OP,
        forward,
        backward,
        flops: LayerFlops { linear_per_token: 2.0 * proj_params as f64, attention_per_pair: 4.0 * qd as f64 * sp.max(1) as f64, linear_backward_ratio: if lora.is_some() { 1.0 } else { 2.0 } },
        head_flops_per_token: 2.0 * (d * v) as f64,
        sparse: None,
    })
}
