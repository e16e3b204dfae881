//! The slow reference: the same decoder written with plain differentiable libtorch ops (naive
//! attention with an explicit [T, T] mask, full [T, V] logits) and differentiated by libtorch
//! autograd. Tests compare the explicit forward/backward against it; never used for training.
use std::collections::BTreeMap;

use kernels::cross_entropy::IGNORE_INDEX;
use tch::{Kind, Tensor};

use crate::model::{Grads, Model};

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let acc = kernels::accum_kind(x.kind());
    let xf = x.to_kind(acc);
    w * (&xf * (xf.square().mean_dim(-1, true, None) + eps).rsqrt()).to_kind(x.kind())
}

fn lin(p: &BTreeMap<String, Tensor>, name: &str, x: &Tensor) -> Tensor {
    let y = x.matmul(&p[&format!("{name}.weight")].tr());
    match p.get(&format!("{name}.bias")) {
        Some(b) => y + b,
        None => y,
    }
}

fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let rot = Tensor::cat(&[x.narrow(2, half, half).neg(), x.narrow(2, 0, half)], 2);
    x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)
}

/// Mean loss over the counted tokens and the gradient of every parameter, by autograd.
pub fn loss_and_grads(model: &Model, ids: &Tensor, labels: &Tensor) -> (f64, Grads) {
    let cfg = &model.cfg;
    let dev = model.device();
    let p: BTreeMap<String, Tensor> =
        model.named_parameters().into_iter().map(|(n, t)| (n, t.detach().copy().set_requires_grad(true))).collect();
    let (ids, labels) = (ids.to_device(dev), labels.to_device(dev));
    let t = ids.size()[0];
    let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let pos = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu));
    let (cos, sin) = cfg.rope.cos_sin(&pos, model.kind(), dev);
    let i = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(1);
    let j = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0);

    let mut x = p["model.embed_tokens.weight"].index_select(0, &ids);
    for l in 0..cfg.num_layers as usize {
        let pre = format!("model.layers.{l}");
        let n1 = rms(&x, &p[&format!("{pre}.input_layernorm.weight")], cfg.rms_norm_eps);
        let q = rotary(&lin(&p, &format!("{pre}.self_attn.q_proj"), &n1).view([t, h, hd]), &cos, &sin);
        let k = rotary(&lin(&p, &format!("{pre}.self_attn.k_proj"), &n1).view([t, kv, hd]), &cos, &sin);
        let v = lin(&p, &format!("{pre}.self_attn.v_proj"), &n1).view([t, kv, hd]);
        let k = k.repeat_interleave_self_int(h / kv, 1, None);
        let v = v.repeat_interleave_self_int(h / kv, 1, None);
        let scores = q.transpose(0, 1).matmul(&k.permute([1, 2, 0])) / (hd as f64).sqrt(); // [H, T, T]
        let mut allowed = j.le_tensor(&i);
        if let Some(w) = cfg.sliding_window[l] {
            allowed = allowed.logical_and(&(&i - &j).lt(w));
        }
        let probs = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).softmax(-1, scores.kind());
        let o = probs.matmul(&v.transpose(0, 1)).transpose(0, 1).reshape([t, h * hd]);
        let hres = &x + lin(&p, &format!("{pre}.self_attn.o_proj"), &o);
        let n2 = rms(&hres, &p[&format!("{pre}.post_attention_layernorm.weight")], cfg.rms_norm_eps);
        let act = lin(&p, &format!("{pre}.mlp.gate_proj"), &n2).silu() * lin(&p, &format!("{pre}.mlp.up_proj"), &n2);
        x = hres + lin(&p, &format!("{pre}.mlp.down_proj"), &act);
    }
    let hfin = rms(&x, &p["model.norm.weight"], cfg.rms_norm_eps);
    let head = p.get("lm_head.weight").unwrap_or(&p["model.embed_tokens.weight"]);
    let logits = hfin.matmul(&head.tr()).to_kind(kernels::accum_kind(model.kind()));
    let loss = logits.log_softmax(-1, logits.kind()).nll_loss_nd(&labels, None::<Tensor>, tch::Reduction::Mean, IGNORE_INDEX);
    loss.backward();
    let grads = p.iter().map(|(n, t)| (n.clone(), t.grad())).collect();
    (loss.double_value(&[]), grads)
}
