//! Where a run's micro-batches come from: JSONL files (encoded once, packed in order or
//! shuffled per epoch) or synthetic retrieval samples (a pure function of seed and batch index,
//! so a resumed run draws what the uninterrupted one drew).
use std::path::PathBuf;

use tokenizers::Tokenizer;

use crate::data::synth::{self, Task};
use crate::data::{pack, ChatTemplate, Encoder, Example};
use crate::error::Result;
use crate::model::Batch;
use crate::rng::Rng;
use crate::train::recipe::{DataSection, Recipe};

/// The tokenizer side of a run: what turns documents into token ids.
pub struct Tokens {
    pub tok: Tokenizer,
    pub tok_path: PathBuf,
    pub eos: Option<i64>,
    pub chat: Option<ChatTemplate>,
}

impl Tokens {
    pub fn encoder(&self, max_tokens: usize) -> Encoder<'_> {
        Encoder { tok: &self.tok, tok_path: self.tok_path.clone(), chat: self.chat.clone(), eos: self.eos, max_tokens }
    }
}

/// Where training documents come from.
pub enum Source {
    Files { examples: Vec<Example>, shuffle: bool },
    Synth { task: Task, words: Vec<usize>, from_step: Vec<i64>, digits: usize, mix_shorter: bool },
}

/// One synthetic sample, encoded.
pub fn synth_example(enc: &Encoder, task: Task, rng: &mut Rng, words: usize, digits: usize) -> Result<Example> {
    let s = synth::sample(task, rng, words, None, digits);
    enc.prompt_completion(&s.prompt, &s.completion)
}

/// Tokens of a batch that carry loss.
pub fn count_targets(b: &Batch) -> i64 {
    b.labels.ne(kernels::cross_entropy::IGNORE_INDEX).sum(tch::Kind::Int64).int64_value(&[])
}

impl Source {
    /// The recipe's training data: its files encoded (documents truncated to
    /// `min(max_tokens, tokens_per_batch)`), or its synthetic task.
    pub fn from_recipe(recipe: &Recipe, tokens: &Tokens) -> Result<Source> {
        let d = &recipe.data;
        Ok(match &d.synth {
            Some(s) => Source::Synth {
                task: s.task,
                words: s.words.clone(),
                from_step: if s.from_step.is_empty() { vec![0] } else { s.from_step.clone() },
                digits: s.digits,
                mix_shorter: s.mix_shorter,
            },
            None => {
                let enc = tokens.encoder(d.max_tokens.min(d.tokens_per_batch));
                let mut examples = Vec::new();
                for f in &d.train {
                    examples.extend(enc.file(f)?);
                }
                Source::Files { examples, shuffle: d.shuffle }
            }
        })
    }

    /// How many documents file data holds (None: synthetic samples, new for every index).
    pub fn documents(&self) -> Option<usize> {
        match self {
            Source::Files { examples, .. } => Some(examples.len()),
            _ => None,
        }
    }

    /// Moves `cursor` past the micro-batch [`Source::batch`] would build next, without building
    /// it: what a rank does for the micro-batches the other ranks compute. File data packs by the
    /// documents' lengths alone; synthetic data is a pure function of the index (nothing to do).
    pub fn skip(&self, data: &DataSection, seed: u64, cursor: &mut u64) {
        if let Source::Files { examples, shuffle } = self {
            pick_files(examples, *shuffle, seed, data.tokens_per_batch, cursor);
        }
    }

    /// The micro-batch number `index` of the run (step · grad_accum + micro). File data advances
    /// `cursor`; synthetic data is a pure function of (seed, index).
    pub fn batch(&self, data: &DataSection, seed: u64, tokens: &Tokens, step: i64, index: u64, cursor: &mut u64) -> Result<Batch> {
        let budget = data.tokens_per_batch;
        match self {
            Source::Files { examples, shuffle } => Ok(pack(&pick_files(examples, *shuffle, seed, budget, cursor))),
            Source::Synth { task, words, from_step, digits, mix_shorter } => {
                let stage = from_step.iter().rposition(|&s| s <= step).unwrap_or(0);
                let (lo, hi) = (words[0] as f64, words[stage] as f64);
                let enc = tokens.encoder(budget);
                let mut rng = Rng::derive(seed, 1, index);
                let mut picked = Vec::new();
                let mut used = 0;
                loop {
                    // Mixed lengths: log-uniform between the first stage's and this stage's, so
                    // every length seen so far keeps being trained as the context grows.
                    let w = if *mix_shorter { (lo * (hi / lo).powf(rng.unit())).round() as usize } else { hi as usize };
                    let e = synth_example(&enc, *task, &mut rng, w, *digits)?;
                    if !picked.is_empty() && used + e.ids.len() > budget {
                        break;
                    }
                    used += e.ids.len();
                    picked.push(e);
                }
                Ok(pack(&picked.iter().collect::<Vec<_>>()))
            }
        }
    }
}

/// The documents of the next micro-batch of file data from `cursor` on (advanced past them): in
/// the epoch's order (shuffled by `seed` and the epoch), packed up to `budget` tokens, at least one.
fn pick_files<'a>(examples: &'a [Example], shuffle: bool, seed: u64, budget: usize, cursor: &mut u64) -> Vec<&'a Example> {
    let n = examples.len() as u64;
    let order = |epoch: u64| -> Vec<usize> {
        let mut v: Vec<usize> = (0..examples.len()).collect();
        if shuffle {
            Rng::derive(seed, 3, epoch).shuffle(&mut v);
        }
        v
    };
    let mut picked: Vec<&'a Example> = Vec::new();
    let mut used = 0usize;
    let mut epoch = u64::MAX;
    let mut perm = Vec::new();
    loop {
        if *cursor / n != epoch {
            epoch = *cursor / n;
            perm = order(epoch);
        }
        let e = &examples[perm[(*cursor % n) as usize]];
        if !picked.is_empty() && used + e.ids.len() > budget {
            break;
        }
        used += e.ids.len();
        picked.push(e);
        *cursor += 1;
        if used >= budget {
            break;
        }
    }
    picked
}
