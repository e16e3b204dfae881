//! Training data: JSONL in four shapes, tokenized into examples with a per-token loss mask, and
//! packed into micro-batches of documents on one token axis.
//!
//! - `{"text": ...}`: every token after the first is a target.
//! - `{"instruction", "input"?, "output"}`: the Alpaca prompt; only the output is a target.
//! - `{"prompt", "completion"}`: only the completion is a target.
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template
//!   (`tokenizer_config.json` `chat_template`, or `chat_template.jinja`); only assistant turns
//!   are targets.
pub mod chat;
pub mod inspect;
pub mod synth;
pub mod source;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use kernels::cross_entropy::IGNORE_INDEX;
use serde_json::Value;
use tch::Tensor;
use tokenizers::Tokenizer;

use crate::error::{Result, TrainerError};
use crate::model::Batch;
pub use chat::{ChatTemplate, Conversation};

/// One tokenized document. `target[t]` says whether token t is predicted (its loss counts at
/// position t-1).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<i64>,
    pub target: Vec<bool>,
}

impl Example {
    pub fn targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Packs documents one after another into one micro-batch.
pub fn pack(examples: &[&Example]) -> Batch {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut doc_lens = Vec::new();
    for e in examples {
        for t in 0..e.ids.len() {
            labels.push(match e.ids.get(t + 1) {
                Some(&next) if e.target[t + 1] => next,
                _ => IGNORE_INDEX,
            });
        }
        ids.extend_from_slice(&e.ids);
        doc_lens.push(e.ids.len() as i64);
    }
    Batch { ids: Tensor::from_slice(&ids), labels: Tensor::from_slice(&labels), doc_lens }
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// What turns a JSON line into an example.
pub struct Encoder<'a> {
    pub tok: &'a Tokenizer,
    pub tok_path: PathBuf,
    pub chat: Option<ChatTemplate>,
    /// Appended after a text or completion (the model's first `eos_token_id`).
    pub eos: Option<i64>,
    /// Documents are truncated to this many tokens.
    pub max_tokens: usize,
}

fn enc(tok: &Tokenizer, text: &str, special: bool, path: &Path) -> Result<Vec<i64>> {
    let e = tok.encode(text, special).map_err(|e| TrainerError::Tokenizer { path: path.to_path_buf(), msg: format!("cannot encode: {e}") })?;
    Ok(e.get_ids().iter().map(|&i| i as i64).collect())
}

fn field<'v>(obj: &'v serde_json::Map<String, Value>, key: &str) -> std::result::Result<&'v str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, found {other}")),
        None => Err(format!("missing `{key}`")),
    }
}

/// A `messages` line as a conversation: its `tools`, `documents` and `chat_template_kwargs` too.
fn conversation(obj: &serde_json::Map<String, Value>) -> std::result::Result<Conversation, String> {
    let messages = obj.get("messages").and_then(|m| m.as_array()).ok_or("`messages` must be a list")?.clone();
    let kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(other) => return Err(format!("`chat_template_kwargs` must be an object, found {other}")),
    };
    let opt = |k: &str| obj.get(k).filter(|v| !v.is_null()).cloned();
    Ok(Conversation { messages, tools: opt("tools"), documents: opt("documents"), kwargs })
}

impl Encoder<'_> {
    /// Prompt (not trained on) followed by completion (trained on) and EOS, truncated.
    pub fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<Example> {
        Ok(self.truncate(self.prompt_completion_whole(prompt, completion)?))
    }

    fn prompt_completion_whole(&self, prompt: &str, completion: &str) -> Result<Example> {
        let p = enc(self.tok, prompt, true, &self.tok_path)?;
        let mut c = enc(self.tok, completion, false, &self.tok_path)?;
        c.extend(self.eos);
        let target = std::iter::repeat_n(false, p.len()).chain(std::iter::repeat_n(true, c.len())).collect();
        Ok(Example { ids: [p, c].concat(), target })
    }

    /// The first `max_tokens` tokens.
    pub fn truncate(&self, mut e: Example) -> Example {
        e.ids.truncate(self.max_tokens);
        e.target.truncate(self.max_tokens);
        e
    }

    /// One JSONL line. Errors are plain messages; the caller adds file and line.
    pub fn line(&self, line: &str) -> std::result::Result<Example, String> {
        self.trainable(self.line_whole(line)?)
    }

    /// A whole example cut to `max_tokens`; an error when nothing of it is left to train on.
    pub fn trainable(&self, whole: Example) -> std::result::Result<Example, String> {
        let e = self.truncate(whole);
        if e.ids.len() < 2 || e.targets() == 0 {
            return Err("no token to train on (empty text or completion, or truncated away by max_tokens)".into());
        }
        Ok(e)
    }

    /// One JSONL line before truncation to `max_tokens` (for `train data inspect`).
    pub fn line_whole(&self, line: &str) -> std::result::Result<Example, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        if obj.contains_key("messages") {
            let chat = self.chat.as_ref().ok_or("`messages` needs a chat template (tokenizer_config.json `chat_template` or chat_template.jinja)")?;
            chat.encode(self.tok, &conversation(obj)?)
        } else if obj.contains_key("instruction") {
            let instruction = field(obj, "instruction")?;
            let input = match obj.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s.as_str(),
                Some(other) => return Err(format!("`input` must be a string, found {other}")),
            };
            let prompt = if input.is_empty() {
                ALPACA_NO_INPUT.replace("{instruction}", instruction)
            } else {
                ALPACA_WITH_INPUT.replace("{instruction}", instruction).replace("{input}", input)
            };
            self.prompt_completion_whole(&prompt, field(obj, "output")?).map_err(|e| e.to_string())
        } else if obj.contains_key("prompt") {
            self.prompt_completion_whole(field(obj, "prompt")?, field(obj, "completion")?).map_err(|e| e.to_string())
        } else if obj.contains_key("text") {
            let mut ids = enc(self.tok, field(obj, "text")?, true, &self.tok_path).map_err(|e| e.to_string())?;
            ids.extend(self.eos);
            let target = (0..ids.len()).map(|i| i > 0).collect();
            Ok(Example { ids, target })
        } else {
            Err("expected one of: text; instruction/input/output; prompt/completion; messages".into())
        }
    }

    /// Every line of a JSONL file; a bad line is an error naming the file and line number.
    pub fn file(&self, path: &Path) -> Result<Vec<Example>> {
        let text = std::fs::read_to_string(path).map_err(TrainerError::io(path))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push(self.line(line).map_err(|msg| TrainerError::Data { path: path.to_path_buf(), line: i + 1, msg })?);
        }
        if out.is_empty() {
            return Err(TrainerError::Data { path: path.to_path_buf(), line: 0, msg: "no examples".into() });
        }
        Ok(out)
    }
}
