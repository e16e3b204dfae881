//! `--device cpu|cuda|auto` and `--dtype`.
use tch::{Device, Kind};

use crate::error::{Result, TrainerError};

/// This process's GPU: `cuda:LOCAL_RANK` in a job of several processes (torchrun and `train
/// launch` set LOCAL_RANK, one GPU per process), else `cuda:0`. Planning, calibration and the
/// run all take their device from here.
fn this_process_gpu() -> usize {
    std::env::var("LOCAL_RANK").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Resolves a device name. `auto` is CUDA when libtorch sees a GPU, else CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let gpu = || -> Result<Device> {
        let (i, n) = (this_process_gpu(), tch::Cuda::device_count() as usize);
        if i >= n {
            return Err(TrainerError::Device(format!("LOCAL_RANK={i} but {n} CUDA device(s) are visible: one process per GPU")));
        }
        Ok(Device::Cuda(i))
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                gpu()
            } else {
                Err(TrainerError::Device("--device cuda: no CUDA device is visible to libtorch".into()))
            }
        }
        "auto" => if tch::Cuda::is_available() { gpu() } else { Ok(Device::Cpu) },
        other => Err(TrainerError::Device(format!("--device {other}: expected cpu, cuda or auto"))),
    }
}

/// The device a recipe targets, for planning: "cuda" stays CUDA on a machine without a GPU (the
/// plan is for the machine the run will use).
pub fn target_device(name: &str) -> Result<Device> {
    match name {
        "cuda" if !tch::Cuda::is_available() => Ok(Device::Cuda(this_process_gpu())),
        other => parse_device(other),
    }
}

pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name {
        "float32" | "fp32" | "f32" => Ok(Kind::Float),
        "float64" | "fp64" | "f64" => Ok(Kind::Double),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "fp16" | "f16" => Ok(Kind::Half),
        other => Err(TrainerError::Device(format!("--dtype {other}: expected float32, float64, bfloat16 or float16"))),
    }
}
