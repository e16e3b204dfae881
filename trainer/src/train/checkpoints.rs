//! Checkpoints of a run: `step_{N:08}/` holding the trained tensors (the whole model, or the
//! LoRA adapters in the PEFT layout), the optimizer moments, the trainer state (step, data
//! cursor, optimizer step count) and the resolved recipe.
//!
//! Crash safety: everything is written into `.tmp-step_{N}/`, each file fsynced, the directory
//! renamed to `step_{N:08}/`, the run directory fsynced, and only then the `DONE` marker written.
//! A directory without `DONE`, or whose files do not load, is skipped on resume with a warning.
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::weights::{write_safetensors, WeightFiles};
use crate::error::{Result, TrainerError};
use crate::model::Model;
use crate::train::optim::{AdamW, Moments};

pub const DONE: &str = "DONE";
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: i64,
    /// Training documents consumed so far (file data); the synthetic stream needs only `step`.
    pub cursor: u64,
    /// AdamW's update count (bias correction).
    pub optimizer_t: i64,
    pub seed: u64,
    /// Loss of the last step, for the log.
    pub loss: f64,
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(TrainerError::io(path))
}

pub fn step_dir(run_dir: &Path, step: i64) -> PathBuf {
    run_dir.join(format!("step_{step:08}"))
}

/// Writes a complete checkpoint for `state.step`; returns its directory.
pub fn save(run_dir: &Path, model: &Model, opt: &AdamW, state: &TrainerState, recipe_toml: &str, lora: Option<&crate::model::lora::LoraConfig>) -> Result<PathBuf> {
    let tmp = run_dir.join(format!(".tmp-step_{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainerError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainerError::io(&tmp))?;
    match lora {
        Some(cfg) => model.save_peft_adapter(&tmp, cfg, "")?,
        None => {
            let tensors: Vec<(String, Tensor)> = model.named_parameters().into_iter().map(|(n, t)| (n, t.shallow_clone())).collect();
            write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        }
    }
    let mut opt_tensors = Vec::new();
    for (name, m) in &opt.state {
        opt_tensors.push((format!("{name}::exp_avg"), m.m.shallow_clone()));
        opt_tensors.push((format!("{name}::exp_avg_sq"), m.v.shallow_clone()));
        if let Some(master) = &m.master {
            opt_tensors.push((format!("{name}::master"), master.shallow_clone()));
        }
    }
    write_safetensors(&tmp.join(OPTIMIZER_FILE), &opt_tensors)?;
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, serde_json::to_string_pretty(state).unwrap_or_default()).map_err(TrainerError::io(&state_path))?;
    let recipe_path = tmp.join("recipe.toml");
    std::fs::write(&recipe_path, recipe_toml).map_err(TrainerError::io(&recipe_path))?;
    for entry in std::fs::read_dir(&tmp).map_err(TrainerError::io(&tmp))? {
        let p = entry.map_err(TrainerError::io(&tmp))?.path();
        fsync(&p)?;
    }
    let dst = step_dir(run_dir, state.step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(TrainerError::io(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(TrainerError::io(&dst))?;
    fsync(run_dir)?;
    let done = dst.join(DONE);
    std::fs::write(&done, b"").map_err(TrainerError::io(&done))?;
    fsync(&done)?;
    fsync(&dst)?;
    Ok(dst)
}

/// Checkpoint directories `step_*` of a run, newest first.
pub fn list(run_dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("step_")?.parse::<i64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

/// Deletes complete checkpoints beyond the newest `keep`.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let complete: Vec<_> = list(run_dir).into_iter().filter(|(_, p)| p.join(DONE).exists()).collect();
    for (_, p) in complete.into_iter().skip(keep) {
        std::fs::remove_dir_all(&p).map_err(TrainerError::io(&p))?;
    }
    Ok(())
}

/// Loads a checkpoint into the model and optimizer. Any inconsistency is an error (the caller
/// decides to skip the checkpoint).
pub fn load(dir: &Path, model: &mut Model, opt: &mut AdamW) -> Result<TrainerState> {
    if !dir.join(DONE).exists() {
        return Err(TrainerError::Checkpoint { path: dir.to_path_buf(), msg: "incomplete (no DONE marker)".into() });
    }
    let sp = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).map_err(TrainerError::io(&sp))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainerError::Checkpoint { path: sp.clone(), msg: e.to_string() })?;
    let dev = model.device();
    let _guard = tch::no_grad_guard();
    // Read everything first, copy into the model only when all of it loaded.
    let mut loaded: Vec<(Tensor, Tensor)> = Vec::new();
    if model.full {
        let files = WeightFiles::open(dir)?;
        for (name, p) in model.named_parameters() {
            loaded.push((p.shallow_clone(), files.load(&name, &p.size(), p.kind(), dev)?));
        }
    } else {
        let files = WeightFiles::open_file(&dir.join("adapter_model.safetensors"))?;
        for (name, p) in model.named_adapters() {
            loaded.push((p.shallow_clone(), files.load(&format!("base_model.model.{name}"), &p.size(), p.kind(), dev)?));
        }
    }
    let of = WeightFiles::open_file(&dir.join(OPTIMIZER_FILE))?;
    let mut state_map = std::collections::BTreeMap::new();
    for (name, p) in model.trainable() {
        let acc = kernels::accum_kind(p.kind());
        let key = |s: &str| format!("{name}::{s}");
        if !of.location.contains_key(&key("exp_avg")) {
            continue; // a parameter that never had a gradient
        }
        let m = of.load(&key("exp_avg"), &p.size(), acc, dev)?;
        let v = of.load(&key("exp_avg_sq"), &p.size(), acc, dev)?;
        let master = if of.location.contains_key(&key("master")) { Some(of.load(&key("master"), &p.size(), acc, dev)?) } else { None };
        state_map.insert(name, Moments { m, v, master });
    }
    for (mut dst, src) in loaded {
        let _ = dst.copy_(&src);
    }
    opt.state = state_map;
    opt.t = state.optimizer_t;
    Ok(state)
}
