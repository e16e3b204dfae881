//! Evaluation during and after a run: held-out loss, and for answer-bearing synthetic tasks the
//! exact-match accuracy of the whole answer.
use tch::{Device, Kind};

use crate::data::source::{synth_example, Tokens};
use crate::data::{pack, Example};
use crate::error::Result;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::metrics::Metrics;
use crate::train::progress::Progress;
use crate::train::recipe::Recipe;

/// Scores of a model on answer-bearing examples.
#[derive(Debug, Clone, Copy)]
pub struct EvalScores {
    /// Mean loss over every target token.
    pub loss: f64,
    /// Fraction of examples whose whole answer is right (teacher-forced argmax over the answer
    /// equals greedy decoding exactly when every answer token is right).
    pub exact: f64,
    /// Fraction of answer tokens predicted right.
    pub token: f64,
}

pub fn eval_synth(model: &Model, examples: &[Example], eos: Option<i64>, chunk: i64) -> Result<EvalScores> {
    let mut correct = 0usize;
    let (mut tok_ok, mut tok_n) = (0usize, 0usize);
    let mut loss_sum = 0.0;
    let mut count = 0i64;
    // A few samples per forward: packed attention keeps them apart.
    for group in examples.chunks(8) {
        let refs: Vec<&Example> = group.iter().collect();
        let b = pack(&refs);
        let (l, pred) = model.loss_and_argmax(&b, chunk)?;
        loss_sum += l.sum.to_device(Device::Cpu).to_kind(Kind::Double).double_value(&[]);
        count += l.count;
        let pred: Vec<i64> = Vec::<i64>::try_from(pred.to_device(Device::Cpu)).unwrap_or_default();
        let mut off = 0usize;
        for e in group {
            let answer: Vec<usize> = (1..e.ids.len()).filter(|&t| e.target[t] && Some(e.ids[t]) != eos).collect();
            let right = answer.iter().filter(|&&t| pred.get(off + t - 1) == Some(&e.ids[t])).count();
            correct += (right == answer.len()) as usize;
            tok_ok += right;
            tok_n += answer.len();
            off += e.ids.len();
        }
    }
    Ok(EvalScores {
        loss: loss_sum / count.max(1) as f64,
        exact: correct as f64 / examples.len().max(1) as f64,
        token: tok_ok as f64 / tok_n.max(1) as f64,
    })
}

/// The evaluation sets of a run, fixed for its whole length.
pub struct EvalSets {
    /// Fresh synthetic samples (a synthetic-task run).
    synth: Option<Vec<Example>>,
    /// The recipe's `eval.data` file.
    file: Option<Vec<Example>>,
    eos: Option<i64>,
    loss_chunk: i64,
}

impl EvalSets {
    pub fn from_recipe(recipe: &Recipe, tokens: &Tokens) -> Result<EvalSets> {
        let synth = match &recipe.data.synth {
            Some(s) => {
                let words = recipe.eval.words.unwrap_or(*s.words.last().unwrap_or(&128));
                let enc = tokens.encoder(usize::MAX);
                let mut v = Vec::new();
                for i in 0..recipe.eval.samples {
                    let mut rng = Rng::derive(recipe.run.seed, 2, i as u64);
                    v.push(synth_example(&enc, s.task, &mut rng, words, s.digits)?);
                }
                Some(v)
            }
            None => None,
        };
        let cap = recipe.data.max_tokens.min(recipe.data.tokens_per_batch);
        let file = match &recipe.eval.data {
            Some(p) => Some(tokens.encoder(cap).file(p)?),
            None => None,
        };
        Ok(EvalSets { synth, file, eos: tokens.eos, loss_chunk: recipe.train.loss_chunk })
    }

    /// No evaluation (the ranks of a job other than 0).
    pub fn none() -> EvalSets {
        EvalSets { synth: None, file: None, eos: None, loss_chunk: 1 }
    }

    pub fn is_empty(&self) -> bool {
        self.synth.is_none() && self.file.is_none()
    }

    /// Scores the model, prints a line and records `eval/*` metrics (the rank that writes them);
    /// returns (loss, exact-match accuracy) where there are such sets.
    pub fn run(&self, model: &Model, step: i64, metrics: Option<&mut Metrics>, progress: &Progress) -> Result<(Option<f64>, Option<f64>)> {
        let mut loss = None;
        let mut scores = None;
        if let Some(ex) = &self.synth {
            let s = eval_synth(model, ex, self.eos, self.loss_chunk)?;
            loss = Some(s.loss);
            scores = Some(s);
        }
        if let Some(ex) = &self.file {
            loss = Some(eval_synth(model, ex, None, self.loss_chunk)?.loss);
        }
        if let Some(l) = loss {
            let mut v = serde_json::json!({"step": step, "eval/loss": l});
            if let Some(s) = scores {
                v["eval/accuracy"] = serde_json::json!(s.exact);
                v["eval/token_accuracy"] = serde_json::json!(s.token);
            }
            let Some(metrics) = metrics else { return Ok((loss, scores.map(|s| s.exact))) };
            progress.println(&format!(
                "eval step {step}: loss {l:.4}{}",
                scores.map(|s| format!(" exact-match accuracy {:.1}% (answer tokens {:.1}%)", 100.0 * s.exact, 100.0 * s.token)).unwrap_or_default()
            ));
            metrics.emit(v)?;
        }
        Ok((loss, scores.map(|s| s.exact)))
    }
}
