//! Every op's explicit backward against libtorch autograd on fresh random float64 inputs.
//! Sizes are deliberately odd: T not a multiple of any block, kv_heads < heads, head_dim 64 and 128.
mod common;
use common::*;
use kernels::{attention, cross_entropy, embedding, gather, linear, lora, rmsnorm, rope, swiglu};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-9;

#[test]
fn rmsnorm_matches_autograd() {
    tch::manual_seed(1);
    for (t, d) in [(37, 96), (1, 64), (130, 128)] {
        let x = leaf(&[t, d]);
        let w = leaf(&[d]);
        let eps = 1e-5;
        let y_ref = &w * (&x * (x.square().mean_dim(-1, true, None) + eps).rsqrt());
        let g = Tensor::randn([t, d], F64);
        (&y_ref * &g).sum(Kind::Double).backward();
        let (y, saved) = rmsnorm::forward(&detached(&x), &detached(&w), eps);
        let (dx, dw) = rmsnorm::backward(&g, &saved, &detached(&w), true);
        assert_close("rmsnorm y", &y, &y_ref, TOL);
        assert_close("rmsnorm dx", &dx, &grad(&x), TOL);
        assert_close("rmsnorm dw", &dw.unwrap(), &grad(&w), TOL);
    }
}

#[test]
fn gathered_rows_and_their_sum_back_match_autograd() {
    tch::manual_seed(11);
    let (t, d) = (37, 6);
    let idx = Tensor::from_slice(&[0i64, 3, 4, 17, 36]);
    let x = leaf(&[t, d]);
    let y = leaf(&[5, d]);
    // z = x + scatter(y) + scatter(rows(x)): both ops and both gradient paths at once.
    let z_ref = x.index_add(0, &idx, &y).index_add(0, &idx, &x.index_select(0, &idx));
    let g = Tensor::randn([t, d], F64);
    (&z_ref * &g).sum(Kind::Double).backward();
    let (xd, yd) = (detached(&x), detached(&y));
    let z = gather::add_rows(&gather::add_rows(&xd, &idx, &yd), &idx, &gather::rows(&xd, &idx));
    assert_close("add_rows(rows)", &z, &z_ref, TOL);
    // dz/dx = g + rows_backward(rows(g)); dz/dy = rows(g).
    let dx = &g + gather::rows_backward(&gather::rows(&g, &idx), &idx, t);
    assert_close("dx", &dx, &grad(&x), TOL);
    assert_close("dy", &gather::rows(&g, &idx), &grad(&y), TOL);
}

#[test]
fn linear_matches_autograd_with_and_without_bias() {
    tch::manual_seed(2);
    for bias in [false, true] {
        let (t, i, o) = (37, 48, 80);
        let x = leaf(&[t, i]);
        let w = leaf(&[o, i]);
        let b = leaf(&[o]);
        let mut y_ref = x.matmul(&w.tr());
        if bias {
            y_ref = y_ref + &b;
        }
        let g = Tensor::randn([t, o], F64);
        (&y_ref * &g).sum(Kind::Double).backward();
        let bd = detached(&b);
        let (y, saved) = linear::forward(&detached(&x), &detached(&w), bias.then_some(&bd));
        let gr = linear::backward(&g, &saved, &detached(&w), true, bias);
        assert_close("linear y", &y, &y_ref, TOL);
        assert_close("linear dx", &gr.x, &grad(&x), TOL);
        assert_close("linear dw", &gr.weight.unwrap(), &grad(&w), TOL);
        if bias {
            assert_close("linear db", &gr.bias.unwrap(), &grad(&b), TOL);
        }
        let frozen = linear::backward(&g, &saved, &detached(&w), false, false);
        assert!(frozen.weight.is_none() && frozen.bias.is_none());
    }
}

#[test]
fn embedding_matches_autograd_with_repeated_ids() {
    tch::manual_seed(3);
    let (v, d) = (50, 24);
    let w = leaf(&[v, d]);
    let ids = Tensor::from_slice(&[3i64, 7, 3, 49, 0, 3, 12]);
    let y_ref = w.index_select(0, &ids);
    let g = Tensor::randn([7, d], F64);
    (&y_ref * &g).sum(Kind::Double).backward();
    let (y, saved) = embedding::forward(&detached(&w), &ids);
    assert_close("embedding y", &y, &y_ref, TOL);
    assert_close("embedding dw", &embedding::backward(&g, &saved, v), &grad(&w), TOL);
}

#[test]
fn swiglu_matches_autograd() {
    tch::manual_seed(4);
    let gate = leaf(&[37, 88]);
    let up = leaf(&[37, 88]);
    let y_ref = gate.silu() * &up;
    let g = Tensor::randn([37, 88], F64);
    (&y_ref * &g).sum(Kind::Double).backward();
    let (y, saved) = swiglu::forward(&detached(&gate), &detached(&up));
    let (dg, du) = swiglu::backward(&g, &saved);
    assert_close("swiglu y", &y, &y_ref, TOL);
    assert_close("swiglu dgate", &dg, &grad(&gate), TOL);
    assert_close("swiglu dup", &du, &grad(&up), TOL);
}

fn all_scalings() -> Vec<rope::RopeScaling> {
    use rope::RopeScaling::*;
    vec![
        Default,
        Linear { factor: 4.0 },
        Dynamic { factor: 2.0, max_position_embeddings: 16 },
        Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32 },
        Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        },
    ]
}

#[test]
fn rope_backward_is_the_transpose_for_every_scaling() {
    tch::manual_seed(5);
    for scaling in all_scalings() {
        for hd in [64, 128] {
            let cfg = rope::RopeConfig { head_dim: hd, theta: 10000.0, scaling: scaling.clone() };
            let t = 37;
            let pos = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu));
            let (cos, sin) = cfg.cos_sin(&pos, Kind::Double, tch::Device::Cpu);
            let x = leaf(&[t, 3, hd]);
            let y_ref = rope::forward(&x, &cos, &sin);
            let g = Tensor::randn([t, 3, hd], F64);
            (&y_ref * &g).sum(Kind::Double).backward();
            let dx = rope::backward(&g, &cos, &sin);
            assert_close(&format!("rope dx {scaling:?} hd={hd}"), &dx, &grad(&x), TOL);
            // A rotation (times YaRN's attention factor) keeps each pair's norm.
            let (_, att) = cfg.inv_freq(t);
            let y = rope::forward(&detached(&x), &cos, &sin);
            let ratio = y.square().sum(Kind::Double).double_value(&[]) / x.square().sum(Kind::Double).double_value(&[]);
            assert!((ratio - att * att).abs() < 1e-9, "{scaling:?}: norm ratio {ratio} vs {}", att * att);
        }
    }
}

/// Naive attention with an explicit [T, T] mask: the independent reference.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: i64, scale: f64, window: Option<i64>) -> (Tensor, Tensor) {
    let t = q.size()[0];
    let k = k.repeat_interleave_self_int(n_rep, 1, None);
    let v = v.repeat_interleave_self_int(n_rep, 1, None);
    let scores = q.transpose(0, 1).matmul(&k.permute([1, 2, 0])) * scale; // [H, T, T]
    let i = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu)).unsqueeze(1);
    let j = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    let mut allowed = j.le_tensor(&i);
    if let Some(w) = window {
        allowed = allowed.logical_and(&(&i - &j).lt(w));
    }
    let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let lse = scores.logsumexp([2], false); // [H, T]
    let out = scores.softmax(-1, Kind::Double).matmul(&v.transpose(0, 1)).transpose(0, 1); // [T, H, D]
    (out, lse)
}

#[test]
fn attention_matches_autograd_gqa_odd_lengths() {
    tch::manual_seed(6);
    for (t, h, kv, d, window) in [(37, 4, 2, 64, None), (70, 6, 2, 128, None), (1, 4, 1, 64, None), (53, 4, 4, 64, Some(16))] {
        let cfg = attention::AttnConfig { heads: h, kv_heads: kv, head_dim: d, scale: 1.0 / (d as f64).sqrt(), sliding_window: window };
        let q = leaf(&[t, h, d]);
        let k = leaf(&[t, kv, d]);
        let v = leaf(&[t, kv, d]);
        let (out_ref, lse_ref) = naive_attention(&q, &k, &v, h / kv, cfg.scale, window);
        let g = Tensor::randn([t, h, d], F64);
        (&out_ref * &g).sum(Kind::Double).backward();
        let (out, saved) = attention::forward(&detached(&q), &detached(&k), &detached(&v), &cfg).unwrap();
        let tag = format!("attention T={t} H={h} KV={kv} D={d} window={window:?}");
        assert_close(&format!("{tag} out"), &out, &out_ref, TOL);
        assert_close(&format!("{tag} lse"), &saved.lse.narrow(1, 0, t), &lse_ref, TOL);
        let (dq, dk, dv) = attention::backward(&g, &saved, &cfg).unwrap();
        assert_close(&format!("{tag} dq"), &dq, &grad(&q), TOL);
        assert_close(&format!("{tag} dk"), &dk, &grad(&k), TOL);
        assert_close(&format!("{tag} dv"), &dv, &grad(&v), TOL);
    }
}

#[test]
fn attention_rejects_mismatched_shapes() {
    let cfg = attention::AttnConfig { heads: 4, kv_heads: 3, head_dim: 8, scale: 1.0, sliding_window: None };
    let q = Tensor::zeros([5, 4, 8], F64);
    let k = Tensor::zeros([5, 3, 8], F64);
    let err = attention::forward(&q, &k, &k, &cfg).err().expect("must fail");
    assert!(err.to_string().contains("not a multiple"), "{err}");
}

#[test]
fn lora_matches_autograd_with_dropout() {
    tch::manual_seed(7);
    let (t, i, o, r) = (37, 40, 56, 8);
    for dropout in [0.0, 0.25] {
        let x = leaf(&[t, i]);
        let w = detached(&Tensor::randn([o, i], F64));
        let b = detached(&Tensor::randn([o], F64));
        let a = leaf(&[r, i]);
        let bb = leaf(&[o, r]);
        let (ad_a, ad_b) = (detached(&a), detached(&bb));
        let ad = lora::Adapter { a: &ad_a, b: &ad_b, scale: 16.0 / r as f64, dropout };
        let (y, saved) = lora::forward(&detached(&x), &w, Some(&b), &ad, true);
        let xd = match &saved.keep {
            Some(k) => &x * k.to_kind(Kind::Double) / (1.0 - dropout),
            None => x.shallow_clone(),
        };
        assert_eq!(saved.keep.is_some(), dropout > 0.0);
        let y_ref = x.matmul(&w.tr()) + &b + xd.matmul(&a.tr()).matmul(&bb.tr()) * ad.scale;
        let g = Tensor::randn([t, o], F64);
        (&y_ref * &g).sum(Kind::Double).backward();
        let gr = lora::backward(&g, &saved, &w, &ad);
        assert_close("lora y", &y, &y_ref, TOL);
        assert_close("lora dx", &gr.x, &grad(&x), TOL);
        assert_close("lora dA", &gr.a, &grad(&a), TOL);
        assert_close("lora dB", &gr.b, &grad(&bb), TOL);
    }
}

#[test]
fn chunked_cross_entropy_matches_full_logits() {
    tch::manual_seed(8);
    let (t, d, v) = (45, 32, 97);
    let h = leaf(&[t, d]);
    let w = leaf(&[v, d]);
    let mut labels: Vec<i64> = (0..t).map(|i| (i * 31 + 5) % v).collect();
    for i in [0, 1, 2, 17, 44] {
        labels[i as usize] = cross_entropy::IGNORE_INDEX;
    }
    let labels = Tensor::from_slice(&labels);
    let logp = h.matmul(&w.tr()).log_softmax(-1, Kind::Double);
    let nll_ref = logp.nll_loss_nd(&labels, None::<Tensor>, tch::Reduction::Sum, cross_entropy::IGNORE_INDEX);
    let count_ref = labels.ne(-100).sum(Kind::Int64).int64_value(&[]);
    (&nll_ref / count_ref as f64).backward();
    for chunk in [1, 7, 16, 45, 1000] {
        let (loss, saved) = cross_entropy::forward(&detached(&h), &detached(&w), &labels, chunk);
        assert_eq!(loss.count, count_ref);
        assert_close(&format!("ce sum chunk={chunk}"), &loss.sum, &nll_ref, TOL);
        let (dh, dw) = cross_entropy::backward(1.0 / loss.count as f64, &saved, &detached(&w), true);
        assert_close(&format!("ce dh chunk={chunk}"), &dh, &grad(&h), TOL);
        assert_close(&format!("ce dw chunk={chunk}"), &dw.unwrap(), &grad(&w), TOL);
    }
}

#[test]
fn packed_attention_confines_each_document() {
    tch::manual_seed(9);
    let (h, kv, d) = (4, 2, 64);
    let cu = [0i64, 5, 6, 23, 40];
    let t = *cu.last().unwrap();
    let cfg = attention::AttnConfig { heads: h, kv_heads: kv, head_dim: d, scale: 0.125, sliding_window: None };
    let q = leaf(&[t, h, d]);
    let k = leaf(&[t, kv, d]);
    let v = leaf(&[t, kv, d]);
    // Reference: each document attended on its own by the naive kernel.
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for w in cu.windows(2) {
        let (s, n) = (w[0], w[1] - w[0]);
        let (o, l) = naive_attention(&q.narrow(0, s, n), &k.narrow(0, s, n), &v.narrow(0, s, n), h / kv, cfg.scale, None);
        outs.push(o);
        lses.push(l);
    }
    let out_ref = Tensor::cat(&outs, 0);
    let lse_ref = Tensor::cat(&lses, 1);
    let g = Tensor::randn([t, h, d], F64);
    (&out_ref * &g).sum(Kind::Double).backward();
    let (out, saved) = attention::forward_packed(&detached(&q), &detached(&k), &detached(&v), &cfg, &cu).unwrap();
    assert_close("packed out", &out, &out_ref, TOL);
    assert_close("packed lse", &saved.lse, &lse_ref, TOL);
    let (dq, dk, dv) = attention::backward_packed(&g, &saved, &cfg, &cu).unwrap();
    assert_close("packed dq", &dq, &grad(&q), TOL);
    assert_close("packed dk", &dk, &grad(&k), TOL);
    assert_close("packed dv", &dv, &grad(&v), TOL);
    let bad = attention::forward_packed(&detached(&q), &detached(&k), &detached(&v), &cfg, &[0, 7, 7, t]);
    assert!(bad.err().unwrap().to_string().contains("rise strictly"));
}
