//! Synthetic long-context retrieval tasks: passkey (a number hidden in repeated filler text at a
//! chosen depth) and key-value recall (many `key … value …` pairs, one asked for). Each sample is
//! a prompt and a completion; only the completion is trained on and scored.
//!
//! Lengths are counted in words of [`VOCAB`]; with the built-in word-level tokenizer
//! ([`tokenizer_json`]) a word is one token (plus BOS). Real tokenizers give more tokens per word.
use serde_json::Value;

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Passkey,
    KvRecall,
}

impl Task {
    pub fn parse(s: &str) -> Option<Task> {
        match s {
            "passkey" => Some(Task::Passkey),
            "kv-recall" => Some(Task::KvRecall),
            _ => None,
        }
    }
}

/// The classic passkey filler ("The grass is green. The sky is blue. ..."), as words.
const FILLER: &str = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .";

/// Every word the tasks use. Index 0 is the unknown token, 1 BOS, 2 EOS.
pub const VOCAB: &[&str] = &[
    "<unk>", "<s>", "</s>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", "?", "the", "grass", "is", "green", "sky", "blue",
    "sun", "yellow", "here", "we", "go", "there", "and", "back", "again", "pass", "key", "remember", "it", "what", "value", "of", ":",
];

/// A word-level `tokenizer.json` over [`VOCAB`] that prepends BOS.
pub fn tokenizer_json() -> Value {
    crate::data::tokenizer::word_level_json(VOCAB, Some("<s>"))
}

pub struct Sample {
    pub prompt: String,
    pub completion: String,
}

fn digits(rng: &mut Rng, n: usize) -> String {
    (0..n).map(|_| rng.below(10).to_string()).collect::<Vec<_>>().join(" ")
}

/// A pass key of `n` digits, no digit twice while n ≤ 10: every digit of the key then says
/// unambiguously where in the key it stands, so copying it needs one induction step per digit.
/// (Chance of guessing a 5-digit key stays 1 / 30240.)
fn distinct_digits(rng: &mut Rng, n: usize) -> String {
    if n > 10 {
        return digits(rng, n);
    }
    let mut pool: Vec<usize> = (0..10).collect();
    rng.shuffle(&mut pool);
    pool[..n].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" ")
}

/// Filler words, cycling through the filler sentence from a random sentence start.
fn filler(rng: &mut Rng, words: usize) -> Vec<&'static str> {
    let f: Vec<&str> = FILLER.split(' ').collect();
    let starts: Vec<usize> = (0..f.len()).filter(|&i| i == 0 || f[i - 1] == ".").collect();
    let mut i = starts[rng.below(starts.len())];
    (0..words)
        .map(|_| {
            let w = f[i % f.len()];
            i += 1;
            w
        })
        .collect()
}

/// One sample of about `words` words. `depth` in [0, 1] places the needle (None: uniform).
pub fn sample(task: Task, rng: &mut Rng, words: usize, depth: Option<f64>, n_digits: usize) -> Sample {
    match task {
        Task::Passkey => {
            let key = distinct_digits(rng, n_digits);
            // The colon appears only after "pass key", in the needle and at the end of the question,
            // so the answer is "whatever followed the earlier colon" (an induction pattern),
            // however much filler lies between.
            let needle = format!("remember it . the pass key : {key} .");
            let question = "what is the pass key ? the pass key :";
            let fixed = needle.split(' ').count() + question.split(' ').count();
            let fill = filler(rng, words.saturating_sub(fixed));
            let at = (depth.unwrap_or_else(|| rng.unit()).clamp(0.0, 1.0) * fill.len() as f64) as usize;
            // Keep whole sentences: move the needle to the next sentence boundary.
            let at = (at..fill.len()).find(|&i| i == 0 || fill[i - 1] == ".").unwrap_or(fill.len());
            let mut words: Vec<&str> = fill[..at].to_vec();
            words.extend(needle.split(' '));
            words.extend(&fill[at..]);
            words.extend(question.split(' '));
            Sample { prompt: words.join(" "), completion: key }
        }
        Task::KvRecall => {
            // "key 3 1 4 value 1 5 9 2 ." pairs; the question names one key.
            let pair_words = 3 + n_digits + 3;
            let n = (words.saturating_sub(8) / pair_words).max(1);
            let mut keys: Vec<String> = Vec::with_capacity(n);
            let mut parts = Vec::with_capacity(n);
            let mut values = Vec::with_capacity(n);
            while keys.len() < n {
                let k = digits(rng, 3);
                if keys.contains(&k) && keys.len() < 1000 {
                    continue;
                }
                let v = digits(rng, n_digits);
                parts.push(format!("key {k} value {v} ."));
                keys.push(k);
                values.push(v);
            }
            let pick = match depth {
                Some(d) => ((d.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1),
                None => rng.below(n),
            };
            let prompt = format!("{} what is the value of key {} ? value", parts.join(" "), keys[pick]);
            Sample { prompt, completion: values[pick].clone() }
        }
    }
}
