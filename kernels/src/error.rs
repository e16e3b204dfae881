use thiserror::Error;

/// Errors an op reports instead of panicking: shapes that do not fit together and libtorch
/// failures (an attention kernel that does not support the device or dtype, say).
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: libtorch error: {source}")]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },
}

impl KernelError {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Shape { op, msg: msg.into() }
    }
    pub fn torch(op: &'static str) -> impl FnOnce(tch::TchError) -> Self {
        move |source| KernelError::Torch { op, source }
    }
}
