//! The decoder (Llama / Qwen2 / Mistral) with parameter names equal to the Hugging Face ones.
//! The block itself — where activations are saved — is in [`crate::model::block`].
pub mod block;
pub mod config;
pub mod init;
pub mod layer;
pub mod lora;
pub mod predictor;
pub mod proj;
pub mod reference;
pub mod seq;
pub mod sparse;
pub mod stash;
pub mod tiled;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kernels::{cross_entropy, embedding, rmsnorm};
use tch::{Device, Kind, Tensor};

pub use layer::{Layer, Linear, LoraWeights};
use proj::Proj;
use crate::model::weights::WeightFiles;
use crate::model::config::ModelConfig;
use crate::error::{Result, TrainerError};
use crate::guard::{self, Phase};
use planner::placement::Placement;

/// One packed micro-batch: documents one after another on the token axis.
pub struct Batch {
    /// `[T]` int64
    pub ids: Tensor,
    /// `[T]` int64, shifted (label[t] is the target of token t), IGNORE_INDEX where not counted.
    pub labels: Tensor,
    /// Lengths of the packed documents, summing to T.
    pub doc_lens: Vec<i64>,
}

impl Batch {
    pub fn single(ids: Tensor, labels: Tensor) -> Batch {
        let t = ids.size()[0];
        Batch { ids, labels, doc_lens: vec![t] }
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    /// Full fine-tuning (every parameter trains) or LoRA (only adapters train).
    pub full: bool,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when the embeddings are tied (`lm_head` reads `embed_tokens`).
    pub lm_head: Option<Tensor>,
    /// Tokens per tile of a block's token-local ops ([`tiled`]); None: the whole sequence at once.
    pub tile_tokens: Option<i64>,
    /// Sequence parallelism: every training sequence is split over this group's ranks
    /// ([`seq`]), evaluation's too; None: this process computes whole sequences.
    pub seq: Option<Arc<seq::SeqParallel>>,
    /// Token sparsity ([`sparse`]): its layers attend over their informative token blocks only.
    pub sparsity: Option<Arc<sparse::Sparsity>>,
    /// Sparse layers rated by a predictor also rate exactly and report the predictor's recall
    /// ([`StepStats::recall`]): a second attention-sized product per sparse layer.
    pub measure_recall: bool,
}

/// Gradients keyed by HF parameter name.
pub type Grads = BTreeMap<String, Tensor>;

/// What one step held, measured on the tensors themselves.
#[derive(Debug, Default)]
pub struct StepStats {
    /// Bytes of every layer's [`block::BlockSaved`] together, at the end of forward (their peak):
    /// under token tiles the stored rows only (the others never exist whole), without tiles
    /// every row (the block saves them all before the store keeps its share).
    pub saved_bytes: usize,
    /// Token sparsity: each sparse layer's kept rows (`[K]` int64) and the tokens it had.
    pub kept: Vec<(usize, Tensor, i64)>,
    /// MLP channel sparsity: each such layer's kept channels (`[c]` int64).
    pub channels: Vec<(usize, Tensor)>,
    /// With [`Model::measure_recall`]: per sparse layer, the blocks of the exact scorer's
    /// choice its predictor chose too, and how many the exact scorer chose.
    pub recall: Vec<(usize, u64, u64)>,
}

/// Every parameter of the model with its HF name and shape, in checkpoint order. This one list
/// drives loading, saving, initialisation and the planner's inventory, so they cannot disagree.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for proj in Proj::ALL {
            let (o, i) = proj.shape(cfg);
            out.push((format!("{p}.{}.weight", proj.hf_name()), vec![o, i]));
            if proj.has_bias(cfg) {
                out.push((format!("{p}.{}.bias", proj.hf_name()), vec![o]));
            }
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    out
}

impl Model {
    /// Builds the model from a name → tensor map that holds exactly [`param_specs`].
    pub fn from_named(cfg: ModelConfig, mut named: BTreeMap<String, Tensor>) -> Result<Model> {
        let mut take = |n: String| named.remove(&n).ok_or_else(|| TrainerError::Device(format!("internal: parameter `{n}` missing")));
        let embed_tokens = take("model.embed_tokens.weight".into())?;
        let mut layers = Vec::new();
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |proj: Proj| -> Result<Linear> {
                let weight = take(format!("{p}.{}.weight", proj.hf_name()))?;
                let bias = if proj.has_bias(&cfg) { Some(take(format!("{p}.{}.bias", proj.hf_name()))?) } else { None };
                Ok(Linear { weight, bias, lora: None })
            };
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = [lin(Proj::Q)?, lin(Proj::K)?, lin(Proj::V)?, lin(Proj::O)?, lin(Proj::Gate)?, lin(Proj::Up)?, lin(Proj::Down)?];
            layers.push(Layer {
                input_layernorm: take(format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: take(format!("{p}.post_attention_layernorm.weight"))?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = take("model.norm.weight".into())?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(take("lm_head.weight".into())?) };
        Ok(Model { cfg, full: true, embed_tokens, layers, norm, lm_head, tile_tokens: None, seq: None, sparsity: None, measure_recall: false })
    }

    /// Loads the weights of an HF folder, converting them to `kind` on `device`. Returns the
    /// names of tensors in the files that the model does not use (for a warning).
    pub fn load(dir: &Path, cfg: ModelConfig, kind: Kind, device: Device) -> Result<(Model, Vec<String>)> {
        let files = WeightFiles::open(dir)?;
        let specs = param_specs(&cfg);
        let mut named = BTreeMap::new();
        for (name, shape) in &specs {
            named.insert(name.clone(), files.load(name, shape, kind, device)?);
        }
        let unused: Vec<String> = files
            .names()
            .filter(|n| !named.contains_key(*n))
            // Old checkpoints store RoPE tables; tied models may still carry lm_head.
            .filter(|n| !n.ends_with("rotary_emb.inv_freq") && !(cfg.tie_word_embeddings && n.as_str() == "lm_head.weight"))
            .cloned()
            .collect();
        Ok((Model::from_named(cfg, named)?, unused))
    }

    /// Parameters with their HF names, in [`param_specs`] order.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, lin) in layer.projections() {
                out.push((format!("{p}.{name}.weight"), &lin.weight));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b));
                }
            }
            out.push((format!("{p}.input_layernorm.weight"), &layer.input_layernorm));
            out.push((format!("{p}.post_attention_layernorm.weight"), &layer.post_attention_layernorm));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// LoRA adapter tensors with their PEFT names (`model.layers.{i}.self_attn.q_proj.lora_A.weight`).
    pub fn named_adapters(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, lin) in layer.projections() {
                if let Some(ad) = &lin.lora {
                    out.push((format!("model.layers.{l}.{name}.lora_A.weight"), &ad.a));
                    out.push((format!("model.layers.{l}.{name}.lora_B.weight"), &ad.b));
                }
            }
        }
        out
    }

    /// What the optimizer updates: every parameter (full) or the adapters (LoRA).
    pub fn trainable(&self) -> Vec<(String, &Tensor)> {
        if self.full {
            self.named_parameters()
        } else {
            self.named_adapters()
        }
    }

    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn check_ids(&self, ids: &Tensor, what: &str) -> Result<()> {
        if ids.numel() == 0 {
            return Ok(());
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            return Err(TrainerError::Device(format!(
                "{what} out of range: [{lo}, {hi}] for vocab_size {} (does the tokenizer belong to this model?)",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// How the training forward runs a block.
    pub fn layout(&self) -> block::Layout {
        match (self.tile_tokens, &self.seq) {
            (Some(_), Some(_)) => block::Layout::ShardedTiled,
            (None, Some(_)) => block::Layout::Sharded,
            (Some(_), None) => block::Layout::Tiled,
            (None, None) => block::Layout::Whole,
        }
    }

    /// How layer `l` runs: as [`Model::layout`] says, or as a sparse layer.
    pub fn layer_layout(&self, l: usize) -> block::Layout {
        match &self.sparsity {
            Some(s) if s.is_sparse(l) => block::Layout::Sparse,
            _ => self.layout(),
        }
    }

    /// The training pass's tokens, labels and context: the whole batch, or under sequence
    /// parallelism this rank's shard of it padded to divide over the group (the padding a
    /// document of its own whose labels are ignored).
    fn training_inputs(&self, batch: &Batch, dev: Device) -> Result<(Tensor, Tensor, block::Context)> {
        if self.sparsity.is_some() && (self.tile_tokens.is_some() || self.seq.is_some()) {
            return Err(TrainerError::Device("token sparsity with token tiles or sequence parallelism is not built yet (sparse layers run whole sequences on one process)".into()));
        }
        let Some(sp) = &self.seq else {
            let mut ctx = block::Context::new(&self.cfg, &batch.doc_lens, self.kind(), dev);
            ctx.sparsity = self.sparsity.clone();
            ctx.target_blocks = self.sparsity.as_ref().filter(|s| s.target_queries).map(|s| sparse::target_weights(&batch.labels, &ctx.cu_seqlens, s.block)).transpose()?;
            return Ok((batch.ids.to_device(dev), batch.labels.to_device(dev), ctx));
        };
        let t = batch.ids.size()[0];
        let shard = sp.shard(t);
        let pad = shard.padded - t;
        let mut doc_lens = batch.doc_lens.clone();
        if pad > 0 {
            doc_lens.push(pad);
        }
        let ctx = block::Context::new(&self.cfg, &doc_lens, self.kind(), dev).sharded(sp.clone()).map_err(TrainerError::Dist)?;
        // Rows of the padded sequence: this rank's real tokens, then (the last ranks) padding.
        let rows = |full: &Tensor, fill: i64| {
            let real = (t - shard.start).clamp(0, shard.tokens);
            let mine = full.narrow(0, shard.start.min(t), real);
            let padding = Tensor::full([shard.tokens - real], fill, (Kind::Int64, full.device()));
            Tensor::cat(&[mine, padding], 0).to_device(dev)
        };
        Ok((rows(&batch.ids, 0), rows(&batch.labels, cross_entropy::IGNORE_INDEX), ctx))
    }

    /// One block's forward: over token tiles keeping `split` rows of the recomputable tensors
    /// ([`tiled::forward`]), or whole (every row saved; the store keeps its share).
    fn forward_block(&self, layer: &Layer, x: &Tensor, ctx: &block::Context, l: usize, split: i64) -> Result<(Tensor, block::BlockSaved)> {
        match self.tile_tokens {
            Some(tile) => tiled::forward(layer, x, ctx, l, tile, split),
            None => block::forward(layer, x, ctx, l),
        }
    }

    /// Mean-able loss of one sequence, without keeping activations (evaluation).
    ///
    /// # Shapes
    /// - `ids`, `labels`: `[T]` int64; labels already shifted (label[t] is the target of token t)
    pub fn loss(&self, batch: &Batch, ce_chunk: i64) -> Result<cross_entropy::LossSum> {
        let (h, labels) = self.final_hidden(batch)?;
        self.whole_loss(cross_entropy::forward(&h, self.lm_head_weight(), &labels, ce_chunk).0)
    }

    /// The loss and the greedy next-token prediction at every position (`[T]` int64) from one
    /// forward (evaluation of answer-bearing tasks).
    pub fn loss_and_argmax(&self, batch: &Batch, ce_chunk: i64) -> Result<(cross_entropy::LossSum, Tensor)> {
        let (h, labels) = self.final_hidden(batch)?;
        let w = self.lm_head_weight();
        let loss = self.whole_loss(cross_entropy::forward(&h, w, &labels, ce_chunk).0)?;
        let argmax = cross_entropy::argmax(&h, w, ce_chunk);
        let argmax = match &self.seq {
            // Every rank's predictions in token order, the padding cut.
            Some(sp) => sp.gather_tokens(&argmax)?.narrow(0, 0, batch.ids.size()[0]),
            None => argmax,
        };
        Ok((loss, argmax))
    }

    /// Hidden states after the final norm and the labels, without keeping activations: of the
    /// whole batch, or under sequence parallelism of this rank's shard (every rank of the group
    /// evaluates the same batch in step).
    ///
    /// Every layer attends densely here: token sparsity saves the training pass's memory, and the
    /// model it trains is the one a user exports and runs dense (as with LeMo); scoring that model
    /// sparse would also read the labels when blocks are rated by the targets' queries.
    fn final_hidden(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        self.check_ids(&batch.ids, "token ids")?;
        let _guard = tch::no_grad_guard();
        let (ids, labels, mut ctx) = self.training_inputs(batch, self.device())?;
        ctx.sparsity = None;
        ctx.target_blocks = None;
        let mut x = embedding::forward(&self.embed_tokens, &ids).0;
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.forward_block(layer, &x, &ctx, l, 0)?.0;
        }
        Ok((rmsnorm::forward(&x, &self.norm, self.cfg.rms_norm_eps).0, labels))
    }

    /// A dense forward without gradients over one batch (every layer whole, nothing placed) that
    /// shows each layer's saved tensors to `visit` as it goes: what the predictor is fitted on.
    pub fn visit_layers(&self, batch: &Batch, visit: &mut dyn FnMut(usize, &block::BlockSaved, &block::Context) -> Result<()>) -> Result<()> {
        self.check_ids(&batch.ids, "token ids")?;
        let _guard = tch::no_grad_guard();
        let dev = self.device();
        let ctx = block::Context::new(&self.cfg, &batch.doc_lens, self.kind(), dev);
        let mut x = embedding::forward(&self.embed_tokens, &batch.ids.to_device(dev)).0;
        for (l, layer) in self.layers.iter().enumerate() {
            let (y, saved) = block::forward(layer, &x, &ctx, l)?;
            visit(l, &saved, &ctx)?;
            x = y;
        }
        Ok(())
    }

    /// A loss over this rank's tokens made the whole sequence's (summed over the group).
    fn whole_loss(&self, l: cross_entropy::LossSum) -> Result<cross_entropy::LossSum> {
        let Some(sp) = &self.seq else { return Ok(l) };
        let sum = sp.sum_f64(l.sum.to_device(Device::Cpu).to_kind(Kind::Double).double_value(&[]))?;
        Ok(cross_entropy::LossSum { sum: Tensor::from(sum), count: sp.sum_i64(l.count)? })
    }

    /// One forward and explicit backward over a sequence; the objective is the mean loss over the
    /// counted tokens. Every layer's saved activations live in [`block::BlockSaved`] between the passes.
    ///
    /// `grad_scale` is d(objective)/d(loss sum): `1/count` for this batch's mean, or
    /// `1/count_of_the_whole_step` under gradient accumulation. Only trainable tensors get
    /// gradients (LoRA: the adapters).
    pub fn forward_backward(&self, batch: &Batch, grad_scale: Option<f64>, ce_chunk: i64) -> Result<(cross_entropy::LossSum, Grads, StepStats)> {
        let mut store = offload::store::ActivationStore::resident();
        let keep = Placement::resident(self.layers.len(), batch.ids.size()[0] as u64);
        self.forward_backward_with(batch, grad_scale, ce_chunk, &mut store, &keep)
    }

    /// [`Model::forward_backward`] with every layer's saved activations handed to `store` between
    /// the passes, where `placement` says: a kept layer's tensors stay, an offloaded layer stores
    /// `stored_rows(α, T)` rows of its recomputable tensors (recomputing the rest in backward) and
    /// puts each tensor in its tier.
    pub fn forward_backward_with(
        &self,
        batch: &Batch,
        grad_scale: Option<f64>,
        ce_chunk: i64,
        store: &mut offload::store::ActivationStore,
        placement: &Placement,
    ) -> Result<(cross_entropy::LossSum, Grads, StepStats)> {
        let mut grads = Grads::new();
        let (loss, stats) = self.forward_backward_hooked(batch, grad_scale, ce_chunk, store, placement, &mut |g| {
            grads.extend(g);
            Ok(())
        })?;
        Ok((loss, grads, stats))
    }

    /// [`Model::forward_backward_with`] handing the gradients to `done` as soon as they are
    /// final: the final norm's first, then each layer's after its backward (last layer first),
    /// then the embedding's and the LM head's. Data parallelism starts summing a layer's
    /// gradients across ranks there, while the layers below still run backward.
    pub fn forward_backward_hooked(
        &self,
        batch: &Batch,
        grad_scale: Option<f64>,
        ce_chunk: i64,
        store: &mut offload::store::ActivationStore,
        placement: &Placement,
        done: &mut dyn FnMut(Grads) -> Result<()>,
    ) -> Result<(cross_entropy::LossSum, StepStats)> {
        self.check_ids(&batch.ids, "token ids")?;
        let _guard = tch::no_grad_guard();
        let dev = self.device();
        let (ids, labels, mut ctx) = self.training_inputs(batch, dev)?;
        ctx.train = true;
        ctx.full = self.full;
        ctx.recall = self.measure_recall.then(Default::default);
        let (mut x, emb_saved) = embedding::forward(&self.embed_tokens, &ids);
        let n_layers = self.layers.len();
        let t_all = ids.size()[0];
        if placement.layers.len() != n_layers {
            return Err(TrainerError::Device(format!("internal: a placement for {} layers given to a model of {n_layers}", placement.layers.len())));
        }
        // Tokens whose recomputable tensors are stored; the rest are recomputed. At least two rows
        // are recomputed when any are (see block::recompute_tail on bit-identity). Tiles save
        // the dropout masks and recompute with them; the whole-sequence recompute cannot.
        let split = |l: usize| planner::inventory::stored_rows(placement.alpha(l), t_all);
        if self.tile_tokens.is_none()
            && (0..n_layers).any(|l| split(l) < t_all)
            && self.layers.iter().any(|l| l.projections().iter().any(|(_, p)| p.lora.as_ref().is_some_and(|a| a.dropout > 0.0)))
        {
            return Err(TrainerError::Device("offload.alpha < 1 recomputes adapted projections: set lora.dropout = 0 or compute.tile_tokens".into()));
        }
        let mut stashed = Vec::with_capacity(n_layers);
        let mut saved_bytes = 0;
        let (mut kept, mut channels) = (Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            guard::enter(Phase::Forward, Some(l));
            let (y, s) = self.forward_block(layer, &x, &ctx, l, split(l))?;
            saved_bytes += s.bytes();
            if let Some(k) = &s.kept {
                kept.push((l, k.shallow_clone(), t_all));
            }
            if let Some(c) = &s.channels {
                channels.push((l, c.shallow_clone()));
            }
            stashed.push(stash::put(store, placement, l, s, t_all, self.layer_layout(l))?);
            x = y;
        }
        let recall = match ctx.recall.take().map(|m| m.into_inner()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => return Err(TrainerError::Device("internal: the recall record was poisoned".into())),
            None => Vec::new(),
        };
        let stats = StepStats { saved_bytes, kept, channels, recall };
        guard::enter(Phase::Loss, None);
        let (h, norm_saved) = rmsnorm::forward(&x, &self.norm, self.cfg.rms_norm_eps);
        let (loss, ce_saved) = cross_entropy::forward(&h, self.lm_head_weight(), &labels, ce_chunk);

        let scale = match (grad_scale, &self.seq) {
            (Some(s), _) => s,
            (None, seq) => {
                // The mean over the whole sequence's counted tokens, whichever rank holds them.
                let count = match seq {
                    Some(sp) => sp.sum_i64(loss.count)?,
                    None => loss.count,
                };
                if count > 0 { 1.0 / count as f64 } else { 0.0 }
            }
        };
        let (dh, dhead) = cross_entropy::backward(scale, &ce_saved, self.lm_head_weight(), self.full);
        drop(ce_saved);
        let (mut dx, dnorm) = rmsnorm::backward(&dh, &norm_saved, &self.norm, self.full);
        // The head's tensors end here, before the first layer's backward (as the plan has them).
        drop((dh, norm_saved, x, h));
        if let Some(g) = dnorm {
            done(Grads::from([("model.norm.weight".to_string(), g)]))?;
        }
        for (l, layer) in self.layers.iter().enumerate().rev() {
            guard::enter(Phase::Backward, Some(l));
            // The next layers' activations are asked for now, so that their reads overlap this
            // backward: after this layer's own (under tiles, after its first tile's rows).
            let ahead: Vec<(usize, Vec<String>)> = (l.saturating_sub(placement.lookahead)..l).rev().map(|a| (a, stashed[a].read_whole())).collect();
            store.prefetch(l, &stashed[l].read_whole())?;
            let (d, g) = match self.tile_tokens {
                Some(tile) if self.seq.is_some() => tiled::backward_sharded(layer, dx, store, l, &stashed[l], tile, &ahead, &ctx)?,
                Some(tile) => {
                    let reader = stash::TileReader::new(store, l, &stashed[l], tiled::backward_order(&ctx.cu_seqlens, tile), &ahead, tiled::Pass::All)?;
                    tiled::backward(layer, dx, reader, &ctx, l)?
                }
                None => {
                    let saved = stash::take(store, layer, l, &stashed[l], &ctx, t_all)?;
                    block::backward(layer, dx, saved, &ctx, l, &mut || {
                        for (a, names) in &ahead {
                            store.prefetch(*a, names)?;
                        }
                        Ok(())
                    })?
                }
            };
            done(g.into_iter().map(|(name, t)| (format!("model.layers.{l}.{name}"), t)).collect())?;
            dx = d;
        }
        guard::enter(Phase::Backward, None);
        if self.full {
            let mut grads = Grads::new();
            let mut demb = embedding::backward(&dx, &emb_saved, self.cfg.vocab_size);
            if let Some(dhead) = dhead {
                if self.lm_head.is_some() {
                    grads.insert("lm_head.weight".into(), dhead);
                } else {
                    demb += dhead;
                }
            }
            grads.insert("model.embed_tokens.weight".into(), demb);
            done(grads)?;
        }
        Ok((loss, stats))
    }
}
