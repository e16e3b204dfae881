//! Memory over a whole run, not one iteration: the per-step peak resident set that `train run`
//! writes to its metrics stops growing after the first steps, and `train bench step` reports the
//! steady-state peak beside the first iteration's.
mod common;
use std::path::Path;

use common::*;
use serde_json::Value;

fn recipe() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/memory-check-cpu.toml").display().to_string()
}

/// The shipped memory-check recipe (8 layers, hidden 512) at 2048 tokens, 6 steps, every layer's
/// activations through the NVMe tier (the case whose resident set doubled with glibc's malloc).
#[test]
fn per_step_peak_rss_does_not_grow_after_the_second_step() {
    let dir = tmp_dir("steady-memory");
    let run = dir.join("run");
    let nvme = dir.join("nvme");
    std::fs::create_dir_all(&nvme).unwrap();
    let args = [
        "run".to_string(),
        "--recipe".into(),
        recipe(),
        format!("run.dir={}", run.display()),
        "data.tokens_per_batch=2048".into(),
        "data.max_tokens=2048".into(),
        "data.synth.words=[480]".into(),
        "train.steps=6".into(),
        "offload.tiers=[\"nvme\"]".into(),
        format!("offload.nvme_dir={}", nvme.display()),
        "offload.nvme_bytes=1073741824".into(),
        "offload.keep_last=0".into(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = train(&argv);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let peaks: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| v["memory/step_peak_rss_bytes"].as_f64().expect("memory/step_peak_rss_bytes in every step's metrics"))
        .collect();
    assert_eq!(peaks.len(), 6, "{text}");
    let run_peak = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()?["memory/host_peak_rss_bytes"].as_f64()).fold(0.0, f64::max);
    let gib = |b: f64| format!("{:.3} GiB", b / (1u64 << 30) as f64);
    println!("per-step peak RSS: {}", peaks.iter().map(|&b| gib(b)).collect::<Vec<_>>().join(", "));
    // Steps are 1-based in the words: step 2 is peaks[1], step 5 peaks[4].
    for s in 2..peaks.len() {
        assert!(peaks[s] <= 1.10 * peaks[1], "step {} peak {} grew more than 10% over step 2's {}", s + 1, gib(peaks[s]), gib(peaks[1]));
    }
    // The plan (the recipe's [plan] section, not applied) predicted that steady state: the device
    // peak (on CPU the whole process) within 10% of the largest step after the first.
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    let planned = plan["plan"]["device_peak"].as_f64().unwrap();
    let steady = peaks[1..].iter().cloned().fold(0.0, f64::max);
    println!("plan {} vs steady {} ({:.3})", gib(planned), gib(steady), steady / planned);
    assert!((steady / planned - 1.0).abs() <= 0.10, "steady peak {} vs the plan's {}", gib(steady), gib(planned));
    // The run's peak is the largest step's (the per-step reset keeps the process-wide figure).
    let max_step = peaks.iter().cloned().fold(0.0, f64::max);
    assert!(run_peak >= max_step, "run peak {} below a step's {}", gib(run_peak), gib(max_step));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_step_reports_first_and_steady_peaks() {
    let out = train(&["bench", "step", "--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--intermediate", "256", "--vocab", "256", "--tokens", "512", "--iters", "3", "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let per_iter = v["iter_peak_rss_bytes"].as_array().unwrap();
    assert_eq!(per_iter.len(), 4, "the first iteration and 3 more: {v}");
    let first = v["first_iter_peak_rss_bytes"].as_f64().unwrap();
    let steady = v["steady_peak_rss_bytes"].as_f64().unwrap();
    let later_max = per_iter[1..].iter().map(|x| x.as_f64().unwrap()).fold(0.0, f64::max);
    assert!(first > 0.0 && steady == later_max, "{v}");
    assert!(v["peak_rss_bytes"].as_f64().unwrap() >= steady.max(first), "{v}");
}
