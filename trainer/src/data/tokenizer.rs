//! `tokenizer.json` through the `tokenizers` crate (the same library transformers uses), plus a
//! builder for small word-level tokenizers that tests and synthetic tasks write themselves.
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{Result, TrainerError};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.exists() {
        return Err(TrainerError::Tokenizer { path, msg: "missing (strata reads the fast-tokenizer file tokenizer.json)".into() });
    }
    Tokenizer::from_file(&path).map_err(|e| TrainerError::Tokenizer { path, msg: format!("cannot load: {e}") })
}

/// Token ids of `text`, with the tokenizer's special tokens (BOS for Llama) as
/// `tokenizer(text)` in transformers adds them.
pub fn encode(tok: &Tokenizer, text: &str, path: &Path) -> Result<Vec<i64>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| TrainerError::Tokenizer { path: path.to_path_buf(), msg: format!("cannot encode: {e}") })?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

/// A whitespace-split word-level tokenizer in the `tokenizer.json` format. `vocab[0]` is the
/// unknown token; when `bos` is given, every encoded sequence starts with it.
pub fn word_level_json(vocab: &[&str], bos: Option<&str>) -> Value {
    let map: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
    let special: Vec<Value> = vocab
        .iter()
        .enumerate()
        .filter(|(_, w)| w.starts_with('<') && w.ends_with('>'))
        .map(|(i, w)| json!({"id": i, "content": w, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let post = match bos.and_then(|b| vocab.iter().position(|w| *w == b).map(|i| (b, i))) {
        Some((b, id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}
        }),
        None => Value::Null,
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": special,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": post,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": map, "unk_token": vocab.first().copied().unwrap_or("<unk>")}
    })
}
