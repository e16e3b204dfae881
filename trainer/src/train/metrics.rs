//! `metrics.jsonl` (one JSON record per line, appended; a resumed run repeats the steps after
//! its checkpoint, readers take a step's last record) and the same scalars as TensorBoard events.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Result, TrainerError};
use crate::train::step::StepOutcome;
use crate::train::tensorboard::EventWriter;

pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
    tb: Option<EventWriter>,
}

impl Metrics {
    /// Opens `metrics.jsonl` for appending (and `tb/` when `tensorboard`).
    pub fn open(run_dir: &Path, tensorboard: bool) -> Result<Metrics> {
        let tb = if tensorboard { Some(EventWriter::create(&run_dir.join("tb"))?) } else { None };
        let path = run_dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(TrainerError::io(&path))?;
        // A killed run may have left half a line: end it, so the next record starts clean.
        let last_byte = {
            let mut f = std::fs::File::open(&path).map_err(TrainerError::io(&path))?;
            let mut b = [b'\n'];
            if f.seek(SeekFrom::End(-1)).is_ok() {
                f.read_exact(&mut b).map_err(TrainerError::io(&path))?;
            }
            b[0]
        };
        if last_byte != b'\n' {
            file.write_all(b"\n").map_err(TrainerError::io(&path))?;
        }
        Ok(Metrics { file, path, tb })
    }

    /// Appends one record; its `a/b` keys with numbers also go to TensorBoard at its `step`.
    pub fn emit(&mut self, v: Value) -> Result<()> {
        // One write per record, so a kill leaves whole lines or one partial last line.
        self.file.write_all(format!("{v}\n").as_bytes()).map_err(TrainerError::io(&self.path))?;
        if let (Some(w), Some(obj)) = (self.tb.as_mut(), v.as_object()) {
            let step = obj.get("step").and_then(|s| s.as_i64()).unwrap_or(0);
            let scalars: Vec<(&str, f64)> = obj.iter().filter(|(k, _)| k.contains('/')).filter_map(|(k, v)| v.as_f64().map(|f| (k.as_str(), f))).collect();
            w.scalars(step, &scalars)?;
        }
        Ok(())
    }
}

/// The record of one optimizer step: training scalars, the step's and the run's peak resident
/// set, and with offload tiers each tier's peak and the bytes and time the store moved.
pub fn step_record(step: i64, o: &StepOutcome, store: &offload::store::ActivationStore) -> Value {
    let mut m = json!({
        "step": step, "train/loss": o.loss, "train/lr": o.lr, "train/grad_norm": o.grad_norm,
        "train/tokens_per_sec": o.tokens as f64 / o.seconds, "train/tokens": o.tokens,
        "memory/activations_bytes": o.saved_peak as f64,
    });
    // The step's own peak (from the step's start to its optimizer update) and the run's.
    if let Some(rss) = o.step_peak_rss {
        m["memory/step_peak_rss_bytes"] = json!(rss as f64);
    }
    if let Some(rss) = crate::memory::peak_rss_bytes() {
        m["memory/host_peak_rss_bytes"] = json!(rss as f64);
    }
    // CUDA: what libtorch's caching allocator handed to tensors and held from the driver, at
    // their peaks in the step (torch.cuda.max_memory_allocated / max_memory_reserved).
    if let Some(c) = &o.cuda_memory {
        m["memory/cuda_step_peak_allocated_bytes"] = json!(c.allocated_peak as f64);
        m["memory/cuda_step_peak_reserved_bytes"] = json!(c.reserved_peak as f64);
        m["memory/cuda_reserved_bytes"] = json!(c.reserved as f64);
    }
    // Token sparsity: the tokens each sparse layer kept (rank 0's micro-batches).
    for (l, f) in &o.kept {
        m[format!("sparsity/kept_fraction_layer{l}")] = json!(f);
    }
    if !o.kept.is_empty() {
        m["sparsity/kept_fraction"] = json!(o.kept.iter().map(|(_, f)| f).sum::<f64>() / o.kept.len() as f64);
    }
    // The predictor's recall of the exact scorer's choice, on the steps that measure it.
    for (l, r) in &o.recall {
        m[format!("sparsity/predictor_recall_layer{l}")] = json!(r);
    }
    if !o.recall.is_empty() {
        m["sparsity/predictor_recall"] = json!(o.recall.iter().map(|(_, r)| r).sum::<f64>() / o.recall.len() as f64);
    }
    // Rank 0's exchanges (every rank of a sequence-parallel group sends as much).
    if let Some((bytes, secs)) = o.all_to_all {
        m["dist/all_to_all_bytes"] = json!(bytes as f64);
        m["dist/all_to_all_seconds"] = json!(secs);
    }
    if store.has_tiers() {
        let st = store.stats();
        for (tier, _) in store.capacities() {
            let peak = match tier {
                offload::store::Tier::Host => st.host_peak_bytes,
                offload::store::Tier::Numa => st.numa_peak_bytes,
                _ => st.nvme_peak_bytes,
            };
            m[format!("memory/{}_peak_bytes", tier.name())] = json!(peak as f64);
        }
        m["offload/written_bytes"] = json!(st.written_bytes as f64);
        m["offload/read_bytes"] = json!(st.read_bytes as f64);
        m["offload/io_seconds"] = json!(st.write_seconds + st.read_seconds);
        m["offload/stall_seconds"] = json!(st.stall_seconds);
        m["offload/spilled_bytes"] = json!(st.spilled_bytes as f64);
    }
    m
}
