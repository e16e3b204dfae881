use std::path::PathBuf;

use thiserror::Error;

/// Every error a user's input can cause in the trainer: each names the file and, where there is
/// one, the key, tensor or line.
#[derive(Debug, Error)]
pub enum TrainerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}:{line}: {msg}")]
    Data { path: PathBuf, line: usize, msg: String },
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error(transparent)]
    Offload(#[from] offload::OffloadError),
    #[error("rank {rank}: {source}")]
    Collective {
        rank: usize,
        #[source]
        source: dist::DistError,
    },
    #[error("{0}")]
    Device(String),
    /// The job's processes: their environment, the rendezvous, a collective.
    #[error("{0}")]
    Dist(String),
    /// libtorch failed inside a step (see [`crate::guard`]).
    #[error("libtorch failed in {place}: {message}{context}")]
    Torch { place: String, message: String, context: String },
}

impl TrainerError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainerError::Io { path, source }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        TrainerError::Config { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, TrainerError>;
