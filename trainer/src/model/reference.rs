//! The slow reference: the same decoder written with plain differentiable libtorch ops (naive
//! attention with an explicit [T, T] mask, full [T, V] logits) and differentiated by libtorch
//! autograd. Tests compare the explicit forward/backward against it; never used for training.
use std::collections::BTreeMap;

use kernels::cross_entropy::IGNORE_INDEX;
use tch::{Kind, Tensor};

use crate::model::{Batch, Grads, Model};

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let acc = kernels::accum_kind(x.kind());
    let xf = x.to_kind(acc);
    w * (&xf * (xf.square().mean_dim(-1, true, None) + eps).rsqrt()).to_kind(x.kind())
}

fn lin(p: &BTreeMap<String, Tensor>, lora_scale: &BTreeMap<String, f64>, name: &str, x: &Tensor) -> Tensor {
    let mut y = x.matmul(&p[&format!("{name}.weight")].tr());
    if let Some(b) = p.get(&format!("{name}.bias")) {
        y = y + b;
    }
    if let (Some(a), Some(b)) = (p.get(&format!("{name}.lora_A.weight")), p.get(&format!("{name}.lora_B.weight"))) {
        y = y + x.matmul(&a.tr()).matmul(&b.tr()) * lora_scale[name];
    }
    y
}

fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let rot = Tensor::cat(&[x.narrow(2, half, half).neg(), x.narrow(2, 0, half)], 2);
    x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)
}

/// Mean loss over the counted tokens and the gradient of every trainable tensor (all
/// parameters, or the LoRA adapters; LoRA dropout is not modelled), by autograd. Packed
/// documents get positions restarting at 0 and a block-diagonal causal mask.
pub fn loss_and_grads(model: &Model, batch: &Batch) -> (f64, Grads) {
    loss_and_grads_kept(model, batch, &[])
}

/// [`loss_and_grads`] with token sparsity: in each layer of `kept` (layer, `[K]` ascending rows),
/// attention runs on those rows only (their original positions, documents apart, causal among
/// them) and its output is added into those rows of the residual; every other row's is zero.
pub fn loss_and_grads_kept(model: &Model, batch: &Batch, kept: &[(usize, Tensor)]) -> (f64, Grads) {
    loss_and_grads_sparse(model, batch, kept, &[])
}

/// [`loss_and_grads_kept`] with MLP channel sparsity: in each layer of `channels` (layer, `[c]`
/// channels) the MLP's value is the dense one, and its gradient flows through those channels only
/// (`dense.detach() + part − part.detach()`, `part` the down projection of the kept channels).
pub fn loss_and_grads_sparse(model: &Model, batch: &Batch, kept: &[(usize, Tensor)], channels: &[(usize, Tensor)]) -> (f64, Grads) {
    let cfg = &model.cfg;
    let dev = model.device();
    let trainable: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    let p: BTreeMap<String, Tensor> = model
        .named_parameters()
        .into_iter()
        .chain(model.named_adapters())
        .map(|(n, t)| {
            let leaf = t.detach().copy().set_requires_grad(trainable.contains(&n));
            (n, leaf)
        })
        .collect();
    let mut lora_scale = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for (name, lin) in layer.projections() {
            if let Some(ad) = &lin.lora {
                lora_scale.insert(format!("model.layers.{l}.{name}"), ad.scale);
            }
        }
    }
    let lin = |name: &str, x: &Tensor| lin(&p, &lora_scale, name, x);
    let (ids, labels) = (batch.ids.to_device(dev), batch.labels.to_device(dev));
    let t = ids.size()[0];
    let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let pos: Vec<i64> = batch.doc_lens.iter().flat_map(|&n| 0..n).collect();
    let doc: Vec<i64> = batch.doc_lens.iter().enumerate().flat_map(|(d, &n)| std::iter::repeat_n(d as i64, n as usize)).collect();
    let (cos, sin) = cfg.rope.cos_sin(&Tensor::from_slice(&pos), model.kind(), dev);
    let doc = Tensor::from_slice(&doc).to_device(dev);
    let i = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(1);
    let j = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0);

    let mut x = p["model.embed_tokens.weight"].index_select(0, &ids);
    for l in 0..cfg.num_layers as usize {
        let pre = format!("model.layers.{l}");
        let n1 = rms(&x, &p[&format!("{pre}.input_layernorm.weight")], cfg.rms_norm_eps);
        let q = rotary(&lin(&format!("{pre}.self_attn.q_proj"), &n1).view([t, h, hd]), &cos, &sin);
        let k = rotary(&lin(&format!("{pre}.self_attn.k_proj"), &n1).view([t, kv, hd]), &cos, &sin);
        let v = lin(&format!("{pre}.self_attn.v_proj"), &n1).view([t, kv, hd]);
        let k = k.repeat_interleave_self_int(h / kv, 1, None);
        let v = v.repeat_interleave_self_int(h / kv, 1, None);
        // A sparse layer: the kept rows only (k is the whole sequence's row count otherwise).
        let rows = kept.iter().find(|(m, _)| *m == l).map(|(_, r)| r.to_device(dev));
        let pick = |z: &Tensor| rows.as_ref().map_or(z.shallow_clone(), |r| z.index_select(0, r));
        let (q, k, v) = (pick(&q), pick(&k), pick(&v));
        let (ik, jk, dk) = (pick(&i.squeeze_dim(1)).unsqueeze(1), pick(&j.squeeze_dim(0)).unsqueeze(0), pick(&doc));
        let same = dk.unsqueeze(1).eq_tensor(&dk.unsqueeze(0));
        let n = q.size()[0];
        let scores = q.transpose(0, 1).matmul(&k.permute([1, 2, 0])) / (hd as f64).sqrt(); // [H, n, n]
        let mut allowed = jk.le_tensor(&ik).logical_and(&same);
        if let Some(w) = cfg.sliding_window[l] {
            allowed = allowed.logical_and(&(&ik - &jk).lt(w));
        }
        let probs = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).softmax(-1, scores.kind());
        let o = probs.matmul(&v.transpose(0, 1)).transpose(0, 1).reshape([n, h * hd]);
        let out = lin(&format!("{pre}.self_attn.o_proj"), &o);
        let hres = match &rows {
            Some(r) => x.index_add(0, r, &out),
            None => &x + out,
        };
        let n2 = rms(&hres, &p[&format!("{pre}.post_attention_layernorm.weight")], cfg.rms_norm_eps);
        let (gate, up) = (lin(&format!("{pre}.mlp.gate_proj"), &n2), lin(&format!("{pre}.mlp.up_proj"), &n2));
        let dense = lin(&format!("{pre}.mlp.down_proj"), &(gate.silu() * &up));
        x = match channels.iter().find(|(m, _)| *m == l) {
            None => hres + dense,
            Some((_, c)) => {
                let c = c.to_device(dev);
                let act_c = gate.index_select(1, &c).silu() * up.index_select(1, &c);
                let mut part = act_c.matmul(&p[&format!("{pre}.mlp.down_proj.weight")].index_select(1, &c).tr());
                if let Some(b) = p.get(&format!("{pre}.mlp.down_proj.bias")) {
                    part = part + b;
                }
                hres + dense.detach() + &part - part.detach()
            }
        };
    }
    let hfin = rms(&x, &p["model.norm.weight"], cfg.rms_norm_eps);
    let head = p.get("lm_head.weight").unwrap_or(&p["model.embed_tokens.weight"]);
    let logits = hfin.matmul(&head.tr()).to_kind(kernels::accum_kind(model.kind()));
    let loss = logits.log_softmax(-1, logits.kind()).nll_loss_nd(&labels, None::<Tensor>, tch::Reduction::Mean, IGNORE_INDEX);
    loss.backward();
    let grads = p.iter().filter(|(n, _)| trainable.contains(n)).map(|(n, t)| (n.clone(), t.grad())).collect();
    (loss.double_value(&[]), grads)
}
