//! `train data inspect`: what a recipe's data will train before a long run — the first examples
//! as the model sees them with the trained tokens marked, tokens and trained share per example,
//! truncation, and how documents pack into micro-batches.
use std::fmt::Write;
use std::path::Path;

use crate::data::source::{Source, Tokens};
use crate::data::{synth, ChatTemplate, Example};
use crate::error::{Result, TrainerError};
use crate::train::recipe::Recipe;

/// How trained tokens are marked: ANSI colour (a terminal) or `[[...]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marks {
    Colour,
    Brackets,
}

/// The tokenizer side of a recipe without loading any weight: the model folder's tokenizer and
/// chat template, or the built-in synthetic tokenizer.
fn tokens(recipe: &Recipe, recipe_path: &Path) -> Result<Tokens> {
    let (cfg, _) = crate::train::model_config(recipe, recipe_path)?;
    let eos = cfg.eos_token_ids.first().copied();
    match &recipe.model.path {
        Some(dir) => Ok(Tokens { tok: crate::data::tokenizer::load(dir)?, tok_path: dir.join(crate::data::tokenizer::TOKENIZER_FILE), eos, chat: ChatTemplate::load(dir)? }),
        None => {
            let tok = tokenizers::Tokenizer::from_bytes(synth::tokenizer_json().to_string().as_bytes())
                .map_err(|e| TrainerError::Tokenizer { path: "<synthetic>".into(), msg: e.to_string() })?;
            Ok(Tokens { tok, tok_path: "<synthetic tokenizer>".into(), eos, chat: None })
        }
    }
}

/// An example's text, runs of trained tokens marked. Each run's text is what decoding the tokens
/// up to its end adds to decoding those before it, so the marks do not change the text (no space
/// added between runs, no character split). The first token is never a target.
fn marked(tok: &tokenizers::Tokenizer, e: &Example, marks: Marks) -> String {
    let ids: Vec<u32> = e.ids.iter().map(|&x| x as u32).collect();
    let trained = |i: usize| i > 0 && e.target[i];
    let decode = |n: usize| tok.decode(&ids[..n], false).unwrap_or_default();
    let mut out = String::new();
    let mut prev = String::new();
    let mut i = 0;
    while i < ids.len() {
        let on = trained(i);
        let j = (i..ids.len()).find(|&j| trained(j) != on).unwrap_or(ids.len());
        let upto = decode(j);
        let text = match upto.strip_prefix(prev.as_str()) {
            Some(t) => t.to_string(),
            None => tok.decode(&ids[i..j], false).unwrap_or_default(),
        };
        // Whitespace around a trained run stays outside its marks.
        let core = text.trim();
        let (lead, trail) = (&text[..text.len() - text.trim_start().len()], &text[text.trim_end().len().max(text.len() - text.trim_start().len())..]);
        match (on && !core.is_empty(), marks) {
            (false, _) => out.push_str(&text),
            (true, Marks::Colour) => {
                let _ = write!(out, "{lead}\x1b[1;32m{core}\x1b[0m{trail}");
            }
            (true, Marks::Brackets) => {
                let _ = write!(out, "{lead}[[{core}]]{trail}");
            }
        }
        prev = upto;
        i = j;
    }
    out
}

fn stats(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    format!("min {min:.0}, mean {:.1}, max {max:.0}", v.iter().sum::<f64>() / v.len() as f64)
}

/// The report for `recipe_path` with `overrides`: the first `n` examples, then the statistics
/// of all of them (files) or of 16 micro-batches (synthetic data).
pub fn inspect(recipe_path: &Path, overrides: &[String], n: usize, marks: Marks) -> Result<String> {
    let recipe = Recipe::load(recipe_path, overrides)?;
    let t = tokens(&recipe, recipe_path)?;
    let d = &recipe.data;
    let cap = d.max_tokens.min(d.tokens_per_batch);
    let enc = t.encoder(cap);
    let mut out = String::new();
    let legend = match marks {
        Marks::Colour => "trained tokens in green",
        Marks::Brackets => "trained tokens in [[...]]",
    };
    let _ = writeln!(out, "{} ({legend}; documents cut at {cap} tokens = min(data.max_tokens, data.tokens_per_batch))", recipe_path.display());
    // Every document, whole and as trained.
    let mut docs: Vec<(String, Example, usize)> = Vec::new();
    for f in &d.train {
        let text = std::fs::read_to_string(f).map_err(TrainerError::io(f))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |msg| TrainerError::Data { path: f.clone(), line: i + 1, msg };
            let whole = enc.line_whole(line).map_err(bad)?;
            let len = whole.ids.len();
            docs.push((format!("{}:{}", f.display(), i + 1), enc.trainable(whole).map_err(bad)?, len));
        }
    }
    // The files' documents as `train run` packs them (encoded once, above).
    let source = if d.train.is_empty() {
        Source::from_recipe(&recipe, &t)?
    } else {
        Source::Files { examples: docs.iter().map(|(_, e, _)| e.clone()).collect(), shuffle: d.shuffle }
    };
    let mut batches = Vec::new();
    let mut cursor = 0u64;
    let budget = if d.train.is_empty() { 16 } else { usize::MAX };
    while batches.len() < budget && (d.train.is_empty() || cursor < docs.len() as u64) {
        batches.push(source.batch(d, recipe.run.seed, &t, 0, batches.len() as u64, &mut cursor)?);
    }
    if d.train.is_empty() {
        // Synthetic data: the documents of the first micro-batch.
        if let Some(b) = batches.first() {
            let ids: Vec<i64> = Vec::try_from(&b.ids).unwrap_or_default();
            let labels: Vec<i64> = Vec::try_from(&b.labels).unwrap_or_default();
            let mut at = 0usize;
            for (k, &len) in b.doc_lens.iter().enumerate() {
                let len = len as usize;
                let target = (0..len).map(|i| i > 0 && labels[at + i - 1] != kernels::cross_entropy::IGNORE_INDEX).collect();
                docs.push((format!("synthetic {} #{}", d.synth.as_ref().map_or("", |s| match s.task {
                    synth::Task::Passkey => "passkey",
                    synth::Task::KvRecall => "kv-recall",
                }), k + 1), Example { ids: ids[at..at + len].to_vec(), target }, len));
                at += len;
            }
        }
    }
    for (where_, e, _) in docs.iter().take(n) {
        let trained = e.targets();
        let _ = writeln!(out, "\n--- {where_}: {} tokens, {trained} trained ({:.1}%)", e.ids.len(), 100.0 * trained as f64 / e.ids.len().max(1) as f64);
        let _ = writeln!(out, "{}", marked(&t.tok, e, marks));
    }
    let lens: Vec<f64> = docs.iter().map(|(_, e, _)| e.ids.len() as f64).collect();
    let trained: usize = docs.iter().map(|(_, e, _)| e.targets()).sum();
    let tokens: usize = docs.iter().map(|(_, e, _)| e.ids.len()).sum();
    let cut: Vec<usize> = docs.iter().filter(|(_, e, whole)| *whole > e.ids.len()).map(|(_, e, whole)| whole - e.ids.len()).collect();
    let _ = writeln!(out, "\n{}", if d.train.is_empty() { "the first micro-batch's documents".to_string() } else { format!("{} documents from {} file(s)", docs.len(), d.train.len()) });
    let _ = writeln!(out, "tokens per document: {}; trained: {trained} of {tokens} tokens ({:.1}%)", stats(&lens), 100.0 * trained as f64 / tokens.max(1) as f64);
    let _ = writeln!(out, "truncated: {} documents, {} tokens lost", cut.len(), cut.iter().sum::<usize>());
    let per: Vec<f64> = batches.iter().map(|b| b.doc_lens.len() as f64).collect();
    let fill: Vec<f64> = batches.iter().map(|b| 100.0 * b.ids.size()[0] as f64 / d.tokens_per_batch as f64).collect();
    let _ = writeln!(
        out,
        "packing: {} micro-batches of up to {} tokens ({}); documents per micro-batch {}; fill % {}",
        batches.len(),
        d.tokens_per_batch,
        if d.train.is_empty() { "the first 16" } else { "until every document was packed once; a micro-batch continues into the next epoch when the data runs out" },
        stats(&per),
        stats(&fill)
    );
    Ok(out)
}
