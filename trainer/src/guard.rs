//! libtorch failures as errors. tch's infallible ops panic when libtorch throws (a CUDA
//! out-of-memory most often, a CPU allocation refused, a kernel's argument check); the training
//! step runs under [`run`], which turns such a panic — and an error libtorch returned through the
//! fallible API — into [`TrainerError::Torch`] naming the phase and layer the step was in, so the
//! binary prints one `error:` line and exits 1 instead of a backtrace and exit 101.
//!
//! The model and the loop say where they are with [`enter`] (a thread-local, one store per layer).
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use crate::error::{Result, TrainerError};

/// Where in a step the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Data,
    Forward,
    Loss,
    Backward,
    Optimizer,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer step",
        }
    }
}

thread_local! {
    static WHERE: Cell<(Phase, Option<usize>)> = const { Cell::new((Phase::Data, None)) };
    /// Inside [`run`]: a panic is caught and reported as an error, so the hook stays quiet.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The location of the last panic caught inside [`run`].
    static LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records that the step is now in `phase` (of `layer`).
pub fn enter(phase: Phase, layer: Option<usize>) {
    WHERE.with(|w| w.set((phase, layer)));
}

/// Where the step was when it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub phase: Phase,
    pub layer: Option<usize>,
    /// libtorch's message (its first paragraph, without the C++ backtrace).
    pub message: String,
    /// A panic that did not come from libtorch: a bug in strata (the message has its location).
    pub internal: bool,
}

impl Failure {
    /// A CUDA out-of-memory or a refused CPU allocation.
    pub fn is_out_of_memory(&self) -> bool {
        let m = self.message.to_ascii_lowercase();
        m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("cannot allocate memory")
    }

    /// "the backward of layer 5", "the loss".
    pub fn place(&self) -> String {
        match self.layer {
            Some(l) => format!("the {} of layer {l}", self.phase.name()),
            None => format!("the {}", self.phase.name()),
        }
    }
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) {
                LOCATION.with(|l| *l.borrow_mut() = info.location().map(|l| l.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// libtorch's words out of a panic payload: tch panics with
/// ``called `Result::unwrap()` on an `Err` value: Torch("…")``, the text Debug-escaped. None when
/// the panic did not come from libtorch.
fn torch_message(payload: &(dyn std::any::Any + Send)) -> (String, bool) {
    let raw = payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic without a message".into());
    match (raw.find("Torch(\""), raw.rfind("\")")) {
        (Some(a), Some(b)) if b > a + 7 => (first_paragraph(&raw[a + 7..b].replace("\\n", "\n").replace("\\\"", "\"").replace("\\'", "'")), true),
        _ => (raw, false),
    }
}

/// The message without libtorch's C++ frames.
fn first_paragraph(text: &str) -> String {
    let cut = ["Exception raised from", "\nframe #"].iter().filter_map(|m| text.find(m)).min().unwrap_or(text.len());
    text[..cut].trim().to_string()
}

/// Runs one step's work; a libtorch failure inside it (a panic of tch's infallible API or a
/// kernel error) comes back as [`TrainerError::Torch`] with where it happened. Other errors pass
/// through unchanged.
pub fn run<T>(work: impl FnOnce() -> Result<T>) -> std::result::Result<Result<T>, Failure> {
    install_hook();
    enter(Phase::Data, None);
    let was = GUARDED.with(|g| g.replace(true));
    // AssertUnwindSafe: after a failure the caller only reports and returns; it reads none of the
    // state the step was mutating (the model's parameters are not updated before the optimizer
    // phase, which is the last).
    let r = catch_unwind(AssertUnwindSafe(work));
    GUARDED.with(|g| g.set(was));
    let (phase, layer) = WHERE.with(|w| w.get());
    match r {
        Ok(Err(TrainerError::Kernel(e))) => Err(Failure { phase, layer, message: first_paragraph(&e.to_string()), internal: false }),
        Ok(r) => Ok(r),
        Err(payload) => {
            let (message, torch) = torch_message(payload.as_ref());
            let message = match (torch, LOCATION.with(|l| l.borrow_mut().take())) {
                (false, Some(at)) => format!("{message} (at {at})"),
                _ => message,
            };
            Err(Failure { phase, layer, message, internal: !torch })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_panic_becomes_a_failure_with_its_phase_and_layer() {
        let r: std::result::Result<Result<()>, Failure> = run(|| {
            enter(Phase::Backward, Some(3));
            let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
            let _ = a.matmul(&a); // [2, 3] @ [2, 3]: libtorch throws
            Ok(())
        });
        let f = r.unwrap_err();
        assert_eq!((f.phase, f.layer), (Phase::Backward, Some(3)));
        assert!(f.message.contains("cannot be multiplied") && !f.message.contains("frame #"), "{}", f.message);
        assert!(!f.message.contains("Torch(") && !f.is_out_of_memory() && !f.internal, "{}", f.message);
        assert_eq!(f.place(), "the backward of layer 3");
        // A panic of our own is an internal error with its location.
        let bug: std::result::Result<Result<()>, Failure> = run(|| {
            let v: Vec<u8> = Vec::new();
            let _ = v[std::hint::black_box(3)];
            Ok(())
        });
        let f = bug.unwrap_err();
        assert!(f.internal && f.message.contains("guard.rs"), "{}", f.message);
        // Outside the guard the next call starts clean.
        let ok: std::result::Result<Result<u8>, Failure> = run(|| Ok(7));
        assert_eq!(ok.unwrap().unwrap(), 7);
    }
}
