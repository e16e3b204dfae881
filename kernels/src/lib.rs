//! Ops with an explicit forward and backward on libtorch tensors.
//!
//! Every op is a pair: `forward(..) -> (output, Saved)` and `backward(grad_out, &Saved, ..)`.
//! `Saved` is a plain struct of named tensors, so whoever calls the op decides where those
//! tensors live between forward and backward (kept, swapped to a lower tier, dropped and
//! recomputed). libtorch autograd is never relied on for training; it is the reference in tests.
//!
//! Layout convention: activations are token-major, `[T, ...]`, with micro-batches packed into
//! the one token axis, so a token range is one contiguous slice.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod error;
pub mod gather;
pub mod linear;
pub mod lora;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub use error::KernelError;

/// The dtype that reductions and softmax statistics use for a given compute dtype:
/// float64 stays float64 (the tests' reference precision); everything else accumulates in float32,
/// as Hugging Face does for RMSNorm and the loss.
pub fn accum_kind(kind: tch::Kind) -> tch::Kind {
    match kind {
        tch::Kind::Double => tch::Kind::Double,
        _ => tch::Kind::Float,
    }
}
