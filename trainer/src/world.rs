//! The processes of one training job: torchrun's environment contract (which `train launch`
//! follows too), the rendezvous through a c10d TCPStore, the process group, and what data
//! parallelism needs of it.
//!
//! Alone (no `WORLD_SIZE`, or 1) a run is one process and nothing here talks to anyone.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dist::{ProcessGroup, ReduceOp, Store};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};
use crate::train::recipe::Backend;

/// The job as the environment describes it (torchrun's variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank is a
    /// client, keys under `/worker/attempt_{restart_count}`; else rank 0 hosts it.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: restarts of the job so far (each resumes from the newest
    /// checkpoint).
    pub restart_count: u64,
    /// `TORCHELASTIC_ERROR_FILE`: where a failing rank writes its error for torchrun.
    pub error_file: Option<PathBuf>,
}

fn var_err(msg: String) -> TrainerError {
    TrainerError::Dist(format!("{msg} (torchrun and `train launch` set these variables)"))
}

impl Env {
    /// Reads the job from `get` (the process environment: `|k| std::env::var(k).ok()`); None
    /// when `WORLD_SIZE` is unset. Inconsistent values are errors naming the variable.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Env>> {
        let Some(ws) = get("WORLD_SIZE") else { return Ok(None) };
        let int = |name: &str, v: &str| -> Result<usize> { v.trim().parse::<usize>().map_err(|_| var_err(format!("{name}={v} is not a non-negative integer"))) };
        let size = int("WORLD_SIZE", &ws)?;
        if size == 0 {
            return Err(var_err("WORLD_SIZE=0: a job has at least one process".into()));
        }
        let rank = match get("RANK") {
            Some(r) => int("RANK", &r)?,
            None if size == 1 => 0,
            None => return Err(var_err(format!("WORLD_SIZE={size} but RANK is not set"))),
        };
        if rank >= size {
            return Err(var_err(format!("RANK={rank} with WORLD_SIZE={size}: ranks are 0..{}", size - 1)));
        }
        let local_rank = get("LOCAL_RANK").map(|v| int("LOCAL_RANK", &v)).transpose()?.unwrap_or(rank);
        let local_size = get("LOCAL_WORLD_SIZE").map(|v| int("LOCAL_WORLD_SIZE", &v)).transpose()?.unwrap_or(size);
        if local_rank >= local_size {
            return Err(var_err(format!("LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_size}")));
        }
        let port = |p: String| p.trim().parse::<u16>().map_err(|_| var_err(format!("MASTER_PORT={p} is not a port number")));
        let (master_addr, master_port) = match (get("MASTER_ADDR").filter(|a| !a.is_empty()), get("MASTER_PORT")) {
            (Some(a), Some(p)) => (a, port(p)?),
            _ if size == 1 => ("127.0.0.1".to_string(), 0),
            (None, _) => return Err(var_err(format!("WORLD_SIZE={size} but MASTER_ADDR is not set"))),
            (Some(_), None) => return Err(var_err(format!("WORLD_SIZE={size} but MASTER_PORT is not set"))),
        };
        let restart_count = get("TORCHELASTIC_RESTART_COUNT").map(|v| int("TORCHELASTIC_RESTART_COUNT", &v)).transpose()?.unwrap_or(0) as u64;
        Ok(Some(Env {
            rank,
            size,
            local_rank,
            local_size,
            master_addr,
            master_port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
            restart_count,
            error_file: get("TORCHELASTIC_ERROR_FILE").filter(|f| !f.is_empty()).map(PathBuf::from),
        }))
    }

    /// This process's job from its environment.
    pub fn from_process() -> Result<Option<Env>> {
        Env::from_vars(|k| std::env::var(k).ok())
    }
}

/// This process's place in the job and, with more than one process, its process group.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pg: Option<ProcessGroup>,
    /// Where the group's own small tensors live (NCCL takes only CUDA tensors).
    on: Device,
    /// How this process met the others, to form subgroups the same way.
    joined: Option<Joined>,
}

struct Joined {
    env: Env,
    /// The store's key prefix.
    prefix: String,
    nccl: bool,
    timeout: Duration,
    device: Device,
}

impl Joined {
    fn backend(&self) -> &'static str {
        match self.device {
            Device::Cuda(_) if self.nccl => "NCCL",
            _ => "Gloo",
        }
    }

    /// A process group of `size` ranks over `store`, this process rank `rank`: NCCL on the run's
    /// GPU when the job chose it, else Gloo; and where its own small tensors live.
    fn group(&self, store: Store, rank: usize, size: usize) -> dist::Result<(ProcessGroup, Device)> {
        let store = Arc::new(store);
        match self.device {
            Device::Cuda(i) if self.nccl => Ok((ProcessGroup::nccl(store, rank, size, self.timeout, i)?, self.device)),
            _ => Ok((ProcessGroup::gloo(store, rank, size, self.timeout)?, Device::Cpu)),
        }
    }
}

impl World {
    /// A job of one process.
    pub fn alone() -> World {
        World { rank: 0, size: 1, pg: None, on: Device::Cpu, joined: None }
    }

    /// Meets the other ranks: the store (torchrun's agent's, or hosted by rank 0), then the
    /// process group `backend` says for a run on `device` (auto: NCCL on CUDA where built in,
    /// else Gloo); waits at most `timeout` for them (an unreachable master is a timeout error).
    pub fn join(env: &Env, backend: Backend, timeout: Duration, device: Device) -> Result<World> {
        let nccl = match (backend, device) {
            (Backend::Gloo, _) => false,
            (Backend::Auto, Device::Cuda(_)) => ProcessGroup::has_nccl(),
            (Backend::Auto, _) => false,
            (Backend::Nccl, Device::Cuda(_)) => true,
            (Backend::Nccl, d) => return Err(TrainerError::Dist(format!("dist.backend = \"nccl\" needs CUDA tensors, but this run computes on {d:?}: use \"gloo\" or \"auto\""))),
        };
        // A job of one process still gets its group (as torchrun's workers do): the same code
        // path as many, e.g. NCCL on a machine with one GPU.
        let at = format!("{}:{}", env.master_addr, env.master_port);
        let fail = |what: &str, e: dist::DistError| TrainerError::Dist(format!("rank {} of {}: {what} at {at}: {e}", env.rank, env.size));
        let prefix = if env.agent_store { format!("/worker/attempt_{}/", env.restart_count) } else { "/strata/".to_string() };
        let store = Store::tcp(&env.master_addr, env.master_port, env.rank == 0 && !env.agent_store, timeout, &prefix).map_err(|e| fail("the rendezvous store", e))?;
        let joined = Joined { env: env.clone(), prefix, nccl, timeout, device };
        let (pg, on) = joined.group(store, env.rank, env.size).map_err(|e| fail(&format!("the {} process group", joined.backend()), e))?;
        Ok(World { rank: env.rank, size: env.size, pg: Some(pg), on, joined: Some(joined) })
    }

    /// Whether this job can split sequences over `sp` ranks: at least `sp` processes, a multiple
    /// of it (checked before anything loads).
    pub fn check_sequence_parallel(&self, sp: usize) -> Result<()> {
        if sp <= 1 {
            return Ok(());
        }
        if self.size < sp {
            return Err(TrainerError::Dist(format!("dist.sequence_parallel = {sp} needs a job of {sp} or more processes (torchrun or `train launch`); this one has {}", self.size)));
        }
        if self.size % sp != 0 {
            return Err(TrainerError::Dist(format!("dist.sequence_parallel = {sp} does not divide the job's {} processes (data parallel × sequence parallel = world size)", self.size)));
        }
        Ok(())
    }

    /// The sequence-parallel group of `sp` consecutive ranks this rank belongs to (ranks
    /// `[g·sp, (g+1)·sp)` split one sequence; `g` is the data-parallel rank); None for `sp` 1.
    pub fn sequence_group(&self, sp: usize) -> Result<Option<Arc<crate::model::seq::SeqParallel>>> {
        if sp <= 1 {
            return Ok(None);
        }
        self.check_sequence_parallel(sp)?;
        let Some(j) = &self.joined else {
            return Err(TrainerError::Dist("internal: a job of several processes without its rendezvous".into()));
        };
        let g = self.rank / sp;
        let at = format!("{}:{}", j.env.master_addr, j.env.master_port);
        let fail = |what: &str, e: dist::DistError| TrainerError::Dist(format!("rank {} of {}: {what} at {at}: {e}", self.rank, self.size));
        let store = Store::tcp(&j.env.master_addr, j.env.master_port, false, j.timeout, &format!("{}sp{g}/", j.prefix)).map_err(|e| fail("the rendezvous store", e))?;
        let (pg, on) = j.group(store, self.rank % sp, sp).map_err(|e| fail(&format!("the sequence-parallel {} group", j.backend()), e))?;
        Ok(Some(Arc::new(crate::model::seq::SeqParallel::new(Arc::new(pg), on))))
    }

    /// This rank's data-parallel rank and the number of them under sequence parallelism `sp`.
    pub fn data_parallel(&self, sp: usize) -> (usize, usize) {
        let sp = sp.max(1);
        (self.rank / sp, (self.size / sp).max(1))
    }

    /// Whether this process writes the run's files (metrics, checkpoints, exports): rank 0.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn collective<T>(&self, r: dist::Result<T>) -> Result<T> {
        r.map_err(|source| TrainerError::Collective { rank: self.rank, source })
    }

    /// Stops unless every rank holds the same `value` (e.g. a hash of the resolved recipe):
    /// ranks started with different recipes would train different things in lockstep.
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let Some(pg) = &self.pg else { return Ok(()) };
        let all = self.collective(pg.all_gather(&Tensor::from_slice(&[value as i64]).to_device(self.on)))?;
        let all = Vec::<i64>::try_from(&all.to_device(Device::Cpu)).map_err(|e| TrainerError::Dist(e.to_string()))?;
        if let Some(r) = all.iter().position(|&v| v != value as i64) {
            return Err(TrainerError::Dist(format!("rank {r}'s {what} differs from rank {}'s: every rank must run the same recipe and overrides", self.rank)));
        }
        Ok(())
    }

    /// Sums `t` over the ranks, in place.
    pub fn sum(&self, t: &Tensor) -> Result<()> {
        match &self.pg {
            Some(pg) => self.collective(pg.all_reduce(t, ReduceOp::Sum)),
            None => Ok(()),
        }
    }

    /// Sums a number over the ranks.
    pub fn sum_f64(&self, x: f64) -> Result<f64> {
        let t = Tensor::from_slice(&[x]).to_device(self.on);
        self.sum(&t)?;
        Ok(t.double_value(&[0]))
    }

    /// Sums counts of a step's micro-batches (targets, tokens) over the data-parallel ranks: the
    /// ranks of one sequence-parallel group (`sp` of them) count the same micro-batches.
    pub fn sum_step_counts(&self, counts: [i64; 2], sp: usize) -> Result<[i64; 2]> {
        let t = Tensor::from_slice(&counts).to_device(self.on);
        self.sum(&t)?;
        let sp = sp.max(1) as i64;
        Ok([t.int64_value(&[0]) / sp, t.int64_value(&[1]) / sp])
    }

    /// Starts summing `grads` over the ranks while the caller goes on: a gradient of `bucket`
    /// bytes or more alone and in place; the smaller ones flattened (per dtype and device, in
    /// name order, the same on every rank) into buckets of up to `bucket` bytes
    /// (`dist.bucket_cap_mb`), so the copy beside them is at most one bucket. Alone they are kept
    /// as they are.
    pub fn start_sum(&self, grads: crate::model::Grads, pending: &mut PendingSums, bucket: u64) -> Result<()> {
        let Some(pg) = &self.pg else {
            pending.done.extend(grads);
            return Ok(());
        };
        let mut buckets: Vec<((Kind, Device), u64, Vec<(String, Tensor)>)> = Vec::new();
        for (n, g) in grads {
            let (key, bytes) = ((g.kind(), g.device()), g.numel() as u64 * g.kind().elt_size_in_bytes() as u64);
            if bytes >= bucket {
                buckets.push((key, bytes, vec![(n, g)]));
                continue;
            }
            match buckets.iter_mut().find(|(k, b, _)| *k == key && b + bytes <= bucket) {
                Some((_, b, v)) => {
                    *b += bytes;
                    v.push((n, g));
                }
                None => buckets.push((key, bytes, vec![(n, g)])),
            }
        }
        for (_, _, members) in buckets {
            // One member is summed where it lies (a view of its own storage: the explicit backward
            // makes contiguous gradients, so `contiguous` copies nothing); several are copied into
            // one flat tensor, and their own storage goes as `members` is consumed.
            let flat = match members.as_slice() {
                [(_, g)] => g.contiguous().view([-1]),
                _ => Tensor::cat(&members.iter().map(|(_, g)| g.reshape([-1])).collect::<Vec<_>>(), 0),
            };
            let work = self.collective(pg.all_reduce_async(&flat, ReduceOp::Sum))?;
            let shapes = members.into_iter().map(|(n, g)| (n, g.size())).collect();
            pending.flights.push((shapes, flat, work));
        }
        Ok(())
    }

    /// Makes every rank's `t` equal rank 0's.
    pub fn from_main(&self, t: &Tensor) -> Result<()> {
        match &self.pg {
            Some(pg) => self.collective(pg.broadcast(t, 0)),
            None => Ok(()),
        }
    }
}

/// Gradient sums in flight ([`World::start_sum`]).
#[derive(Default)]
pub struct PendingSums {
    /// Each flattened group: its members' names and shapes, the tensor, its all-reduce.
    flights: Vec<(Vec<(String, Vec<i64>)>, Tensor, dist::Work)>,
    /// Gradients with nothing to wait for (a job of one process).
    done: crate::model::Grads,
}

impl PendingSums {
    /// Waits for every sum; the summed gradients by name.
    pub fn finish(self, world: &World) -> Result<crate::model::Grads> {
        let mut out = self.done;
        for (members, flat, work) in self.flights {
            world.collective(work.wait())?;
            let mut at = 0;
            for (n, shape) in members {
                let k: i64 = shape.iter().product();
                out.insert(n, flat.narrow(0, at, k).view(shape.as_slice()));
                at += k;
            }
        }
        Ok(out)
    }
}

/// Times the job's all-reduce: `iters` sums of a float32 tensor of `bytes` after one warm-up.
/// Bandwidth as NCCL's tests define it: algorithm (bytes / time) and bus (× 2(n−1)/n, what each
/// link carries in a ring).
pub fn bench_all_reduce(env: &Env, bytes: u64, iters: usize) -> Result<serde_json::Value> {
    let world = World::join(env, Backend::Gloo, Duration::from_secs(120), Device::Cpu)?;
    let t = Tensor::ones([(bytes / 4).max(1) as i64], (Kind::Float, Device::Cpu));
    world.sum(&t)?;
    let mut secs = Vec::new();
    for _ in 0..iters.max(1) {
        let t0 = std::time::Instant::now();
        world.sum(&t)?;
        secs.push(t0.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let n = world.size as f64;
    let algo = bytes as f64 / median / 1e9;
    Ok(serde_json::json!({
        "ranks": world.size,
        "bytes": bytes,
        "median_seconds": median,
        "algorithm_gb_per_s": algo,
        "bus_gb_per_s": algo * 2.0 * (n - 1.0) / n,
    }))
}

/// Writes a failure where torchrun reads it (`TORCHELASTIC_ERROR_FILE`), in the JSON layout of
/// torch.distributed.elastic's error handler, so that torchrun reports this rank's root cause.
pub fn write_error_file(path: &std::path::Path, message: &str) -> std::io::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let data = serde_json::json!({
        "message": {
            "message": format!("TrainError: {message}"),
            "extraInfo": { "py_callstack": message, "timestamp": now.to_string() }
        }
    });
    std::fs::write(path, data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<Env>> {
        let m: std::collections::HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn the_environment_contract_and_its_errors() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "3")])
            .unwrap()
            .unwrap();
        assert_eq!((e.rank, e.size, e.local_rank, e.master_port, e.agent_store, e.restart_count), (1, 2, 1, 29500, true, 3));
        let one = env(&[("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert_eq!((one.rank, one.size), (0, 1));
        for (vars, says) in [
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "29500")], "MASTER_ADDR is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")], "MASTER_PORT is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK=2 with WORLD_SIZE=2"),
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE=two is not"),
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
            (vec![("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")], "MASTER_PORT=99999"),
        ] {
            let e = env(&vars).unwrap_err().to_string();
            assert!(e.contains(says), "{vars:?}: {e}");
        }
    }
}
