//! `train launch`: torchrun's job for users without Python. It starts `nproc_per_node` copies of
//! this binary with torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE,
//! LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT,
//! TORCHELASTIC_ERROR_FILE), prefixes each rank's output lines with `[rank N]`, and watches them:
//! when one fails the others are stopped within seconds and the launcher names the rank and its
//! error; Ctrl-C stops every rank.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Result, TrainerError};

/// The job's shape and rendezvous (torchrun's flags of the same names).
#[derive(Debug, Clone)]
pub struct Job {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// None: 127.0.0.1 (single node only).
    pub master_addr: Option<String>,
    /// None: a free port on this machine (single node only).
    pub master_port: Option<u16>,
}

/// How long the other ranks get to stop after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    error_file: PathBuf,
    /// The rank's last stderr lines (for the report when it leaves no error file).
    tail: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
    /// The threads copying its output (joined before the launcher returns, so no line is lost).
    relays: Vec<std::thread::JoinHandle<()>>,
}

/// Copies a rank's output to ours line by line with its prefix, keeping the last lines. Our
/// own output closing (a pipe whose reader left) does not stop the copy: the rank must never
/// block on a full pipe.
fn relay(rank: usize, stream: impl Read + Send + 'static, to_stderr: bool, tail: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let _ = if to_stderr { writeln!(std::io::stderr(), "[rank {rank}] {line}") } else { writeln!(std::io::stdout(), "[rank {rank}] {line}") };
            if let Some(t) = &tail {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                t.push(line);
                if t.len() > 20 {
                    t.remove(0);
                }
            }
        }
    })
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}{}", if s == libc::SIGKILL { " (SIGKILL)" } else { "" }),
        _ => "ended".into(),
    }
}

/// Why a failed rank failed: its error file (written by `train run`), else its last stderr line.
fn reason(r: &Rank) -> String {
    if let Ok(text) = std::fs::read_to_string(&r.error_file) {
        if let Some(m) = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["message"]["message"].as_str().map(str::to_string)) {
            return m.trim_start_matches("TrainError: ").to_string();
        }
    }
    let tail = r.tail.lock().unwrap_or_else(|e| e.into_inner());
    tail.iter().rev().find(|l| l.starts_with("error:")).or(tail.last()).cloned().unwrap_or_else(|| "(no output)".into())
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a child's pid that we have not reaped yet (so it cannot be reused).
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Stops the ranks still running: SIGTERM, then SIGKILL after the grace period.
fn stop_all(ranks: &mut [Rank]) {
    for r in ranks.iter().filter(|r| r.status.is_none()) {
        signal(&r.child, libc::SIGTERM);
    }
    let t0 = Instant::now();
    loop {
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Ok(Some(s)) = r.child.try_wait() {
                r.status = Some(s);
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            return;
        }
        if t0.elapsed() > GRACE {
            for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
                signal(&r.child, libc::SIGKILL);
                r.status = r.child.wait().ok();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `exe args…` as this node's ranks of `job`; Ok when every rank succeeded.
pub fn launch(exe: &Path, job: &Job, args: &[String]) -> Result<()> {
    if job.nproc_per_node == 0 || job.nnodes == 0 || job.node_rank >= job.nnodes {
        return Err(TrainerError::Dist(format!("--nproc-per-node {} --nnodes {} --node-rank {}: need at least one process and node, and node-rank below nnodes", job.nproc_per_node, job.nnodes, job.node_rank)));
    }
    let (addr, port) = match (&job.master_addr, job.master_port) {
        (Some(a), Some(p)) => (a.clone(), p),
        (None, Some(p)) if job.nnodes == 1 => ("127.0.0.1".to_string(), p),
        (a, None) if job.nnodes == 1 => {
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(TrainerError::io("127.0.0.1:0"))?;
            (a.clone().unwrap_or_else(|| "127.0.0.1".into()), port)
        }
        _ => return Err(TrainerError::Dist("--master-addr and --master-port (node 0's address and a free port there) are needed with more than one node".into())),
    };
    let world = job.nnodes * job.nproc_per_node;
    let logs = std::env::temp_dir().join(format!("strata-launch-{}", std::process::id()));
    std::fs::create_dir_all(&logs).map_err(TrainerError::io(&logs))?;
    // Ctrl-C, and a launcher told to stop (SIGTERM, a closed terminal), stop every rank.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
        }
    }
    let mut ranks = Vec::new();
    for local in 0..job.nproc_per_node {
        let rank = job.node_rank * job.nproc_per_node + local;
        let error_file = logs.join(format!("rank{rank}-error.json"));
        let mut c = Command::new(exe);
        c.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("GROUP_RANK", job.node_rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", job.nproc_per_node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .env("TORCHELASTIC_ERROR_FILE", &error_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // As torchrun: one thread per rank unless the user chose.
        if job.nproc_per_node > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
            c.env("OMP_NUM_THREADS", "1");
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the
        // child between fork and exec. A launcher that dies (even by SIGKILL) takes its ranks
        // with it instead of leaving them waiting in a collective.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                stop_all(&mut ranks);
                return Err(TrainerError::Io { path: exe.to_path_buf(), source: e });
            }
        };
        eprintln!("[launch] rank {rank}: pid {}", child.id());
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut relays = Vec::new();
        if let Some(out) = child.stdout.take() {
            relays.push(relay(rank, out, false, None));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(relay(rank, err, true, Some(tail.clone())));
        }
        ranks.push(Rank { rank, child, error_file, tail, status: None, relays });
    }
    let outcome = watch(&mut ranks);
    // Every rank has ended: its pipes close and the copies finish.
    for r in &mut ranks {
        for h in r.relays.drain(..) {
            let _ = h.join();
        }
    }
    let _ = std::fs::remove_dir_all(&logs);
    outcome
}

/// Waits for the ranks; the first failure (or Ctrl-C) stops the others.
fn watch(ranks: &mut [Rank]) -> Result<()> {
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("[launch] interrupted: stopping every rank");
            stop_all(ranks);
            return Err(TrainerError::Dist("interrupted (Ctrl-C): every rank was stopped".into()));
        }
        for i in 0..ranks.len() {
            if ranks[i].status.is_some() {
                continue;
            }
            let Ok(Some(s)) = ranks[i].child.try_wait() else { continue };
            ranks[i].status = Some(s);
            // A rank ended by the same Ctrl-C as the launcher did not fail: the loop's next
            // turn reports the interruption.
            if !s.success() && !INTERRUPTED.load(Ordering::SeqCst) {
                // Give its error file and last lines a moment to land, then stop the rest.
                std::thread::sleep(Duration::from_millis(200));
                let (rank, why) = (ranks[i].rank, reason(&ranks[i]));
                stop_all(ranks);
                return Err(TrainerError::Dist(format!("rank {rank} failed ({}): {why}; the other ranks were stopped", describe(s))));
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
