//! `train eval`: mean next-token loss and perplexity of a model over a JSONL file of `{"text"}`.
use std::io::BufRead;
use std::path::{Path, PathBuf};

use kernels::cross_entropy::IGNORE_INDEX;
use serde::Deserialize;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Result, TrainerError};
use crate::model::{Batch, Model};

#[derive(Debug, Clone)]
pub struct EvalResult {
    pub file: PathBuf,
    /// Mean loss over every predicted token of every line.
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: i64,
    /// Lines that held at least two tokens.
    pub sequences: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextLine {
    text: String,
}

/// Inputs and shifted labels of one tokenized document: label[t] = id[t+1], the last ignored.
pub fn shifted(ids: &[i64]) -> (Tensor, Tensor) {
    let mut labels: Vec<i64> = ids.iter().skip(1).copied().collect();
    labels.push(IGNORE_INDEX);
    (Tensor::from_slice(ids), Tensor::from_slice(&labels))
}

/// Evaluates one JSONL file. Each line must be `{"text": "..."}`; a line that is not is an error
/// naming the file and line. `max_tokens` truncates each document.
pub fn eval_file(model: &Model, tok: &Tokenizer, tok_path: &Path, file: &Path, max_tokens: Option<usize>, ce_chunk: i64) -> Result<EvalResult> {
    let f = std::fs::File::open(file).map_err(TrainerError::io(file))?;
    let mut sum = 0.0f64;
    let mut tokens = 0i64;
    let mut sequences = 0usize;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(TrainerError::io(file))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: TextLine = serde_json::from_str(&line).map_err(|e| TrainerError::Data {
            path: file.to_path_buf(),
            line: lineno,
            msg: format!("expected {{\"text\": \"...\"}}: {e}"),
        })?;
        let mut ids = crate::data::tokenizer::encode(tok, &parsed.text, tok_path)?;
        if let Some(m) = max_tokens {
            ids.truncate(m);
        }
        if ids.len() < 2 {
            continue;
        }
        let (x, y) = shifted(&ids);
        let l = model.loss(&Batch::single(x, y), ce_chunk).map_err(|e| match e {
            TrainerError::Device(msg) => TrainerError::Data { path: file.to_path_buf(), line: lineno, msg },
            other => other,
        })?;
        sum += l.sum.to_kind(Kind::Double).double_value(&[]);
        tokens += l.count;
        sequences += 1;
    }
    if tokens == 0 {
        return Err(TrainerError::Data { path: file.to_path_buf(), line: 0, msg: "no line has two or more tokens to predict".into() });
    }
    let loss = sum / tokens as f64;
    Ok(EvalResult { file: file.to_path_buf(), loss, perplexity: loss.exp(), tokens, sequences })
}
