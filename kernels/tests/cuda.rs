//! The same ops on CUDA (float32 and bfloat16) against the float64 CPU reference. Skips with a
//! message when libtorch sees no GPU; `scripts/gpu-check.sh` runs it on a GPU machine.
mod common;
use common::*;
use kernels::{attention, cross_entropy, rmsnorm};
use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        println!("SKIPPED: no CUDA device visible to libtorch");
        None
    }
}

#[test]
fn cuda_attention_matches_cpu_float64() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(11);
    for (t, h, kv, d) in [(37, 4, 2, 64), (300, 8, 2, 128), (1, 4, 1, 64), (1000, 4, 4, 64)] {
        let cfg = attention::AttnConfig { heads: h, kv_heads: kv, head_dim: d, scale: 1.0 / (d as f64).sqrt(), sliding_window: None };
        let (q, k, v) = (Tensor::randn([t, h, d], F64), Tensor::randn([t, kv, d], F64), Tensor::randn([t, kv, d], F64));
        let g = Tensor::randn([t, h, d], F64);
        let (out_ref, saved_ref) = attention::forward(&q, &k, &v, &cfg).unwrap();
        let (dq_ref, dk_ref, dv_ref) = attention::backward(&g, &saved_ref, &cfg).unwrap();
        for (kind, tol) in [(Kind::Float, 2e-3), (Kind::BFloat16, 5e-2)] {
            let c = |x: &Tensor| x.to_kind(kind).to_device(dev);
            let (out, saved) = attention::forward(&c(&q), &c(&k), &c(&v), &cfg).unwrap();
            let (dq, dk, dv) = attention::backward(&c(&g), &saved, &cfg).unwrap();
            let tag = format!("cuda {kind:?} T={t} H={h} KV={kv} D={d}");
            assert_close(&format!("{tag} out"), &out.to_device(Device::Cpu), &out_ref, tol);
            assert_close(&format!("{tag} lse"), &saved.lse.narrow(1, 0, t).to_device(Device::Cpu), &saved_ref.lse, tol);
            assert_close(&format!("{tag} dq"), &dq.to_device(Device::Cpu), &dq_ref, tol);
            assert_close(&format!("{tag} dk"), &dk.to_device(Device::Cpu), &dk_ref, tol);
            assert_close(&format!("{tag} dv"), &dv.to_device(Device::Cpu), &dv_ref, tol);
        }
    }
}

#[test]
fn cuda_norm_and_loss_match_cpu_float64() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(12);
    let (t, d, v) = (257, 128, 1000);
    let x = Tensor::randn([t, d], F64);
    let w = Tensor::randn([d], F64);
    let g = Tensor::randn([t, d], F64);
    let (y_ref, s_ref) = rmsnorm::forward(&x, &w, 1e-5);
    let (dx_ref, dw_ref) = rmsnorm::backward(&g, &s_ref, &w, true);
    let c = |x: &Tensor| x.to_kind(Kind::Float).to_device(dev);
    let (y, s) = rmsnorm::forward(&c(&x), &c(&w), 1e-5);
    let (dx, dw) = rmsnorm::backward(&c(&g), &s, &c(&w), true);
    assert_close("cuda rmsnorm y", &y.to_device(Device::Cpu), &y_ref, 1e-5);
    assert_close("cuda rmsnorm dx", &dx.to_device(Device::Cpu), &dx_ref, 1e-5);
    assert_close("cuda rmsnorm dw", &dw.unwrap().to_device(Device::Cpu), &dw_ref.unwrap(), 1e-5);

    let head = Tensor::randn([v, d], F64) * 0.1;
    let labels = Tensor::randint(v, [t], (Kind::Int64, Device::Cpu));
    let (l_ref, s_ref) = cross_entropy::forward(&x, &head, &labels, 64);
    let (dh_ref, dw_ref) = cross_entropy::backward(1.0 / l_ref.count as f64, &s_ref, &head, true);
    let (l, s) = cross_entropy::forward(&c(&x), &c(&head), &labels.to_device(dev), 64);
    let (dh, dw) = cross_entropy::backward(1.0 / l.count as f64, &s, &c(&head), true);
    assert_close("cuda ce sum", &l.sum.to_device(Device::Cpu), &l_ref.sum, 1e-5);
    assert_close("cuda ce dh", &dh.to_device(Device::Cpu), &dh_ref, 1e-4);
    assert_close("cuda ce dw", &dw.unwrap().to_device(Device::Cpu), &dw_ref.unwrap(), 1e-4);
}

#[test]
fn cuda_packed_attention_matches_cpu_float64() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(13);
    let cu = [0i64, 40, 41, 100, 333];
    let t = 333;
    let cfg = attention::AttnConfig { heads: 8, kv_heads: 2, head_dim: 128, scale: 1.0 / (128f64).sqrt(), sliding_window: None };
    let (q, k, v) = (Tensor::randn([t, 8, 128], F64), Tensor::randn([t, 2, 128], F64), Tensor::randn([t, 2, 128], F64));
    let g = Tensor::randn([t, 8, 128], F64);
    let (out_ref, s_ref) = attention::forward_packed(&q, &k, &v, &cfg, &cu).unwrap();
    let (dq_ref, dk_ref, dv_ref) = attention::backward_packed(&g, &s_ref, &cfg, &cu).unwrap();
    let c = |x: &Tensor| x.to_kind(Kind::Float).to_device(dev);
    let (out, s) = attention::forward_packed(&c(&q), &c(&k), &c(&v), &cfg, &cu).unwrap();
    let (dq, dk, dv) = attention::backward_packed(&c(&g), &s, &cfg, &cu).unwrap();
    let cpu = |x: &Tensor| x.to_device(Device::Cpu);
    assert_close("cuda packed out", &cpu(&out), &out_ref, 2e-3);
    assert_close("cuda packed dq", &cpu(&dq), &dq_ref, 2e-3);
    assert_close("cuda packed dk", &cpu(&dk), &dk_ref, 2e-3);
    assert_close("cuda packed dv", &cpu(&dv), &dv_ref, 2e-3);
}
