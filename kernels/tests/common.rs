//! Helpers shared by the op tests.
#![allow(dead_code)]
use tch::{Device, Kind, Tensor};

pub const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// Max absolute difference divided by the reference's max magnitude.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shape mismatch");
    // The floor keeps an all-zero reference (dq at T = 1) from turning rounding noise into a huge ratio.
    let scale = want.abs().max().double_value(&[]).max(1e-3);
    (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]) / scale
}

#[track_caller]
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    println!("{name}: relative error {e:.3e}");
    assert!(e < tol, "{name}: relative error {e:e} ≥ {tol:e}");
}

/// A leaf tensor for the autograd reference.
pub fn leaf(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, F64).set_requires_grad(true)
}

pub fn detached(t: &Tensor) -> Tensor {
    t.detach().copy()
}

pub fn grad(t: &Tensor) -> Tensor {
    t.grad()
}
