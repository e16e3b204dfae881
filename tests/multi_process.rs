//! Several processes of one job on 127.0.0.1 (Gloo), driven the way users launch them: torchrun
//! from `.venv` runs the `train` binary unchanged. Data parallelism over 2 ranks with
//! grad_accum 1 equals one process with grad_accum 2 over the same micro-batches; bad job
//! environments are clear errors.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;
use tch::Tensor;

fn recipe(dir: &Path, model: &Path, data: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[run]
dir = "{run}"
seed = 3
device = "cpu"
dtype = "float64"

[model]
path = "{model}"

[data]
train = ["{data}"]
tokens_per_batch = 96
max_tokens = 48

[train]
steps = 5
lr = 3e-3
warmup = 2
grad_accum = 1

[checkpoint]
every = 5

[log]
every = 1
tensorboard = false
{extra}"#,
        run = dir.join("unused").display(),
        model = model.display(),
        data = data.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(run: &Path) -> Vec<f64> {
    losses_by_step(run).into_values().collect()
}


/// The trained tensors of the last checkpoint (the model, or LoRA's adapter).
fn weights(run: &Path) -> Vec<(String, Tensor)> {
    weights_at(run, 5)
}

fn weights_at(run: &Path, step: i64) -> Vec<(String, Tensor)> {
    let dir = run.join(format!("step_{step:08}"));
    let file = ["model.safetensors", "adapter_model.safetensors"].into_iter().map(|f| dir.join(f)).find(|p| p.exists()).expect("a checkpoint");
    let mut w = Tensor::read_safetensors(file).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn torchrun() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Two runs trained alike: their 5 steps' losses and their final weights within 1e-12 relative
/// (float64: sums over ranks and over micro-batches differ in order only).
fn assert_same_training(tag: &str, one: &Path, other: &Path) {
    let (a, b) = (losses(one), losses(other));
    assert_eq!(a.len(), 5, "{a:?}");
    assert_eq!(a.len(), b.len());
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-12 * x.abs(), "{tag} step {}: loss {x} (one process) vs {y}", s + 1);
    }
    let (wa, wb) = (weights(one), weights(other));
    assert_eq!(wa.len(), wb.len());
    for ((n, x), (m, y)) in wa.iter().zip(&wb) {
        assert_eq!(n, m);
        let d = (x - y).abs().max().double_value(&[]);
        let scale = x.abs().max().double_value(&[]).max(1e-30);
        assert!(d <= 1e-12 * scale, "{tag} {n}: weights differ by {d:e} (max |w| {scale:e})");
    }
}

/// Two runs' held-out losses (every 2 of 5 steps and the last): within 1e-12.
fn assert_same_eval(tag: &str, one: &Path, other: &Path) {
    let (a, b) = (eval_losses(one), eval_losses(other));
    assert_eq!(a.len(), 3, "{tag}: {a:?}");
    assert_eq!(b.len(), a.len(), "{tag}: {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-12 * x.abs(), "{tag}: eval loss {x} (one process) vs {y}");
    }
}

/// A run's eval/loss records in order.
fn eval_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("eval/loss")?.as_f64()).collect()
}

/// `train run` of `recipe` into `run_dir` as `n` ranks under torchrun.
fn torchrun_job(n: usize, recipe: &Path, run_dir: &Path, overrides: &[&str]) -> std::process::Output {
    Command::new(torchrun())
        .args(["--no-python", "--nnodes", "1", "--nproc-per-node", &n.to_string(), "--rdzv-backend", "c10d", "--rdzv-endpoint", &format!("127.0.0.1:{}", free_port()), env!("CARGO_BIN_EXE_train"), "run", "--recipe"])
        .arg(recipe)
        .arg(format!("run.dir={}", run_dir.display()))
        .args(overrides)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// The same steps, once as one process with grad_accum 2, once as 2 ranks under torchrun.
fn one_vs_two(dir: &Path, tag: &str, extra: &str, overrides: &[&str]) {
    let (model, data) = tiny_llama_and_texts(dir);
    let r = recipe(dir, &model, &data, extra);
    let (one, two) = (dir.join(format!("{tag}-one")), dir.join(format!("{tag}-two")));
    let mut args = vec!["run".to_string(), "--recipe".into(), r.display().to_string(), format!("run.dir={}", one.display()), "train.grad_accum=2".into()];
    args.extend(overrides.iter().map(|s| s.to_string()));
    let out = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = torchrun_job(2, &r, &two, overrides);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun: {stderr}");
    // The built-in launcher: the same job without Python.
    let three = dir.join(format!("{tag}-launch"));
    let mut args = vec!["launch".to_string(), "--nproc-per-node".into(), "2".into(), "--".into(), "run".into(), "--recipe".into(), r.display().to_string(), format!("run.dir={}", three.display())];
    args.extend(overrides.iter().map(|s| s.to_string()));
    let out = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train launch: {stderr}");
    assert!(stderr.contains("[rank 0] step 5/5") && !stderr.contains("[rank 1] step"), "rank 0 alone reports steps: {stderr}");
    assert_eq!(losses(&three), losses(&two), "{tag}: train launch and torchrun run the same job");
    assert!(weights(&three).iter().zip(weights(&two)).all(|((_, x), (_, y))| x.equal(&y)), "{tag}: train launch and torchrun end with the same weights");
    assert_same_training(tag, &one, &two);
    // Rank 0 alone wrote the run's files: one metrics file, one line per step.
    assert_eq!(losses(&two).len(), 5);
    println!("{tag}: 2 ranks × grad_accum 1 == 1 process × grad_accum 2 over 5 steps: losses {:?}", losses(&two));
}

#[test]
fn data_parallel_ranks_equal_one_process_with_their_micro_batches() {
    let dir = tmp_dir("multi-process-dp");
    one_vs_two(&dir, "full", "", &[]);
    // Buckets of 2 KiB: the projections' gradients are summed alone and in place, the norms'
    // flattened together (the default 25 MiB puts each layer's in one bucket).
    one_vs_two(&dir, "full-small-buckets", "", &["dist.bucket_cap_mb=0.002"]);
    let lora = "\n[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.1\ntargets = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
    one_vs_two(&dir, "lora", lora, &["train.mode=lora"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// One sequence split over 2 ranks (torchrun, `dist.sequence_parallel = 2`) trains as one process
/// on whole sequences; 4 ranks as 2 data-parallel × 2 sequence-parallel (`train launch`) as one
/// process with grad_accum 2. Full fine-tuning and LoRA, whole blocks and token tiles; the sharded
/// runs offload to host and NVMe with α 0.5 (each rank its own store and NVMe file).
#[test]
fn sequence_parallel_ranks_equal_one_process() {
    let dir = tmp_dir("multi-process-sp");
    let (model, data) = tiny_llama_and_texts(&dir);
    let lora = "\n[lora]\nrank = 4\nalpha = 8.0\ndropout = 0.0\ntargets = [\"q_proj\", \"k_proj\", \"o_proj\", \"down_proj\"]\n";
    let nvme_dir = format!("offload.nvme_dir={}", dir.display());
    let offload = ["offload.tiers=[\"host\",\"nvme\"]", "offload.host_bytes=40000", "offload.nvme_bytes=67108864", "offload.alpha=0.5", &nvme_dir];
    // Held-out loss every 2 steps: under sequence parallelism the group evaluates, each rank its
    // shard, rank 0 reports.
    let eval = format!("eval.data={}", data.display());
    for (tag, extra, mode) in [("full", "", None), ("lora", lora, Some("train.mode=lora"))] {
        let r = recipe(&dir, &model, &data, extra);
        let run = |name: &str| dir.join(format!("{tag}-{name}"));
        let with = |more: &[&str]| -> Vec<String> { mode.iter().copied().chain(["eval.every=2", eval.as_str()]).chain(more.iter().copied()).map(|s| s.to_string()).collect() };
        for (name, accum) in [("one", "train.grad_accum=1"), ("one-ga2", "train.grad_accum=2")] {
            let mut args = vec!["run".to_string(), "--recipe".into(), r.display().to_string(), format!("run.dir={}", run(name).display())];
            args.extend(with(&[accum]));
            let out = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let mut sp2: Vec<&str> = vec!["dist.sequence_parallel=2"];
        sp2.extend(offload);
        let sp2 = with(&sp2);
        let out = torchrun_job(2, &r, &run("sp2"), &sp2.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "torchrun: {}", String::from_utf8_lossy(&out.stderr));
        assert_same_training(&format!("{tag}: sequence parallel 2"), &run("one"), &run("sp2"));
        assert_same_eval(&format!("{tag}: sequence parallel 2"), &run("one"), &run("sp2"));
        // Token tiles of each shard (two passes around the whole attention backward).
        let mut tiles = sp2.clone();
        tiles.push("compute.tile_tokens=16".into());
        let out = torchrun_job(2, &r, &run("sp2-tiles"), &tiles.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "torchrun: {}", String::from_utf8_lossy(&out.stderr));
        assert_same_training(&format!("{tag}: sequence parallel 2 over tiles of 16"), &run("one"), &run("sp2-tiles"));
        let mut args = vec!["launch".to_string(), "--nproc-per-node".into(), "4".into(), "--".into(), "run".into(), "--recipe".into(), r.display().to_string(), format!("run.dir={}", run("dp2sp2").display())];
        args.extend(sp2.iter().cloned());
        let out = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "train launch: {}", String::from_utf8_lossy(&out.stderr));
        assert_same_training(&format!("{tag}: data parallel 2 × sequence parallel 2"), &run("one-ga2"), &run("dp2sp2"));
        assert_same_eval(&format!("{tag}: data parallel 2 × sequence parallel 2"), &run("one-ga2"), &run("dp2sp2"));
        // One sequence over 4 processes (KV heads repeated: 2 over 4 ranks).
        let mut args = vec!["launch".to_string(), "--nproc-per-node".into(), "4".into(), "--".into(), "run".into(), "--recipe".into(), r.display().to_string(), format!("run.dir={}", run("sp4").display())];
        args.extend(with(&["dist.sequence_parallel=4"]));
        let out = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "train launch: {}", String::from_utf8_lossy(&out.stderr));
        assert_same_training(&format!("{tag}: sequence parallel 4"), &run("one"), &run("sp4"));
        assert_same_eval(&format!("{tag}: sequence parallel 4"), &run("one"), &run("sp4"));
    }
    // What cannot be split is refused before anything trains.
    let r = recipe(&dir, &model, &data, "");
    for (n, overrides, says) in [
        (3, vec!["dist.sequence_parallel=2"], "dist.sequence_parallel = 2 does not divide the job's 3 processes"),
        (3, vec!["dist.sequence_parallel=3"], "dist.sequence_parallel = 3: 4 attention heads do not divide over 3 ranks"),
        (1, vec!["dist.sequence_parallel=2"], "dist.sequence_parallel = 2 needs a job of 2 or more processes (torchrun or `train launch`); this one has 1"),
        (2, vec!["dist.sequence_parallel=0"], "dist.sequence_parallel"),
        (2, vec!["dist.bucket_cap_mb=0"], "`dist.bucket_cap_mb`: 0: must be a positive number of MiB"),
    ] {
        let out = torchrun_job(n, &r, &dir.join("refused"), &overrides);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{overrides:?}: {stderr}");
    }
    let out = train(&["run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", dir.join("alone").display()), "dist.sequence_parallel=2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("this one has 1"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_job_environments_are_clear_errors() {
    let dir = tmp_dir("multi-process-env");
    let (model, data) = tiny_llama_and_texts(&dir);
    let r = recipe(&dir, &model, &data, "");
    let run = |vars: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
        c.args(["run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", dir.join("run").display()), "dist.timeout_seconds=3"]);
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&[("WORLD_SIZE", "2"), ("RANK", "0")]);
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
    let e = run(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")]);
    assert!(e.contains("RANK=2 with WORLD_SIZE=2"), "{e}");
    // A master nobody hosts: a timeout error within the recipe's limit, not a hang.
    let t0 = std::time::Instant::now();
    let e = run(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &free_port().to_string()), ("TORCHELASTIC_ERROR_FILE", dir.join("error.json").to_str().unwrap())]);
    assert!(e.contains("rendezvous store") && e.contains("timed out"), "{e}");
    assert!(t0.elapsed().as_secs() < 60);
    // NCCL takes CUDA tensors only.
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["launch", "--nproc-per-node", "1", "--", "run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", dir.join("nccl").display()), "dist.backend=nccl"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("rank 0 failed") && e.contains("dist.backend = \"nccl\" needs CUDA tensors"), "{e}");
    // Ranks started with different recipes (here one override apart): both stop, saying so.
    let port = free_port().to_string();
    let ranks: Vec<_> = [("0", "train.lr=3e-3"), ("1", "train.lr=1e-3")]
        .into_iter()
        .map(|(rank, lr)| {
            Command::new(env!("CARGO_BIN_EXE_train"))
                .args(["run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", dir.join("mismatch").display()), "dist.timeout_seconds=30", lr])
                .envs([("WORLD_SIZE", "2"), ("RANK", rank), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains("resolved recipe differs") && e.contains("every rank must run the same recipe"), "rank {r}: {e}");
    }
    // torchrun's error file: the JSON its elastic agent reads.
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("error.json")).unwrap()).unwrap();
    assert!(v["message"]["message"].as_str().unwrap().contains("rendezvous store"), "{v}");
    let _ = std::fs::remove_dir_all(dir);
}

/// An interrupted 40-step job (`tag`: how it went on) ended with the uninterrupted job's losses at
/// every step and its final weights, bit for bit.
fn assert_same_40_steps(full: &Path, run: &Path, tag: &str) {
    let (a, b) = (losses_by_step(full), losses_by_step(run));
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "losses of the {tag} job");
    assert!(weights_at(full, 40).iter().zip(weights_at(run, 40)).all(|((n, x), (m, y))| n == &m && x.equal(&y)), "final weights of the {tag} job");
}

#[test]
fn a_killed_rank_stops_the_job_and_resume_continues_exactly() {
    let dir = tmp_dir("multi-process-kill");
    let (model, data) = tiny_llama_and_texts(&dir);
    let r = recipe(&dir, &model, &data, "");
    let steps = "train.steps=40";
    let launch = |run: &Path, resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
        c.args(["launch", "--nproc-per-node", "2", "--", "run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", run.display()), steps, "checkpoint.every=4", "checkpoint.keep_last=20"]);
        if resume {
            c.arg("--resume");
        }
        c
    };
    // The uninterrupted job.
    let full = dir.join("uninterrupted");
    let out = launch(&full, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same job, rank 1 SIGKILLed once a checkpoint exists.
    let run = dir.join("killed");
    let mut job = launch(&run, false).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stderr = job.stderr.take().unwrap();
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let t0 = std::time::Instant::now();
    while !run.join("step_00000008/DONE").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint: {}", text.lock().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid: i32 = {
        let t = text.lock().unwrap();
        let line = t.lines().find(|l| l.starts_with("[launch] rank 1: pid ")).expect("the launcher names each rank's pid").to_string();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let killed_at = std::time::Instant::now();
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let status = job.wait().unwrap();
    let took = killed_at.elapsed();
    reader.join().unwrap();
    let text = text.lock().unwrap().clone();
    assert!(!status.success(), "{text}");
    assert!(took.as_secs() < 30, "the job took {took:?} to stop");
    assert!(text.contains("rank 1 failed (killed by signal 9 (SIGKILL))"), "{text}");
    // Resumed: every step and the final weights equal the uninterrupted job's, bit for bit.
    let out = launch(&run, true).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_40_steps(&full, &run, "resumed");
    println!("rank 1 killed after step 8's checkpoint: the job stopped in {took:?}; resumed, 40 steps equal the uninterrupted job's");
    let _ = std::fs::remove_dir_all(dir);
}

/// The pid of the worker of `rank` whose environment carries `tag` and torchrun's restart count
/// `attempt` (torchrun names neither; the workers' environments do).
fn worker_pid(tag: &str, rank: usize, attempt: u32) -> Option<i32> {
    let want = [format!("STRATA_TEST_TAG={tag}"), format!("RANK={rank}"), format!("TORCHELASTIC_RESTART_COUNT={attempt}")];
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        let exe = std::fs::read_link(e.path().join("exe")).ok()?;
        (exe.file_name()? == "train" && want.iter().all(|w| vars.contains(w))).then_some(pid)
    })
}

/// torchrun's elastic agent with `--max-restarts 1`: rank 1 SIGKILLed once step 8's checkpoint
/// exists; the agent stops rank 0 and starts both again with TORCHELASTIC_RESTART_COUNT=1, whose
/// store keys live under `/worker/attempt_1/`; they resume from the newest checkpoint, and the job
/// ends with every loss and the final weights of the uninterrupted job, bit for bit.
#[test]
fn torchrun_restarts_a_failed_job_and_it_resumes_exactly() {
    let dir = tmp_dir("multi-process-restart");
    let (model, data) = tiny_llama_and_texts(&dir);
    let r = recipe(&dir, &model, &data, "");
    let job = |run: &Path, restarts: &str| {
        let mut c = Command::new(torchrun());
        c.args(["--no-python", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", restarts, "--monitor-interval", "0.1", "--rdzv-backend", "c10d", "--rdzv-endpoint", &format!("127.0.0.1:{}", free_port()), env!("CARGO_BIN_EXE_train"), "run", "--recipe"])
            .arg(&r)
            .args([format!("run.dir={}", run.display()), "train.steps=40".into(), "checkpoint.every=4".into(), "checkpoint.keep_last=20".into()])
            .env("OMP_NUM_THREADS", "1")
            .env("STRATA_TEST_TAG", run.display().to_string());
        c
    };
    let full = dir.join("uninterrupted");
    let out = job(&full, "0").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.join("killed-once");
    let mut child = job(&run, "1").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let t0 = std::time::Instant::now();
    while !run.join("step_00000008/DONE").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tag = run.display().to_string();
    let pid = worker_pid(&tag, 1, 0).expect("rank 1 of the first attempt runs");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(status.success(), "the restarted job: {text}");
    // The agent saw a worker fail (rank 1 killed, or rank 0 whose all-reduce lost its peer:
    // whichever it polls first) and started both again; both resumed from a checkpoint.
    assert!(text.contains("failed (exitcode: "), "torchrun reports a failed worker: {text}");
    // ("resuming from DIR (step N)" of each worker; their lines may interleave on the shared pipe.)
    let resumed: Vec<i64> = text.split("(step ").skip(1).filter_map(|r| r.split(')').next()?.parse().ok()).collect();
    assert_eq!(text.matches("resuming from ").count(), 2, "{text}");
    assert!(resumed.len() == 2 && resumed[0] == resumed[1] && resumed[0] >= 8, "both restarted workers resume from the newest checkpoint: {text}");
    assert_same_40_steps(&full, &run, "restarted");
    println!("torchrun --max-restarts 1: rank 1 killed after step 8's checkpoint; the restarted workers resumed and 40 steps equal the uninterrupted job's");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_job_of_one_process_runs_its_group_and_equals_a_plain_run() {
    let dir = tmp_dir("multi-process-one");
    let (model, data) = tiny_llama_and_texts(&dir);
    let r = recipe(&dir, &model, &data, "");
    let (plain, job) = (dir.join("plain"), dir.join("job"));
    let out = train(&["run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", plain.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train(&["launch", "--nproc-per-node", "1", "--", "run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", job.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(losses(&plain), losses(&job));
    assert!(weights(&plain).iter().zip(weights(&job)).all(|((_, x), (_, y))| x.equal(&y)));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctrl_c_stops_every_rank() {
    let dir = tmp_dir("multi-process-int");
    let (model, data) = tiny_llama_and_texts(&dir);
    let r = recipe(&dir, &model, &data, "");
    let run = dir.join("run");
    let mut job = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["launch", "--nproc-per-node", "2", "--", "run", "--recipe", r.to_str().unwrap(), &format!("run.dir={}", run.display()), "train.steps=100000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(job.stderr.take().unwrap());
    // Wait until both ranks were started and training runs (rank 0 prints its steps).
    let mut pids = Vec::new();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0 {
        if let Some(p) = line.trim().strip_prefix("[launch] rank ").and_then(|l| l.split("pid ").nth(1)) {
            pids.push(p.to_string());
        }
        if line.contains("[rank 0] step 2/") {
            break;
        }
        line.clear();
    }
    assert_eq!(pids.len(), 2);
    assert!(Command::new("kill").args(["-INT", &job.id().to_string()]).status().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = job.wait().unwrap();
    assert!(!status.success() && rest.contains("interrupted (Ctrl-C): every rank was stopped"), "{rest}");
    for p in &pids {
        assert!(!Path::new(&format!("/proc/{p}")).exists(), "rank pid {p} still runs");
    }
    let _ = std::fs::remove_dir_all(dir);
}
