//! `--device cpu|cuda|auto` and `--dtype`.
use tch::{Device, Kind};

use crate::error::{Result, TrainerError};

/// Resolves a device name. `auto` is CUDA when libtorch sees a GPU, else CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(TrainerError::Device("--device cuda: no CUDA device is visible to libtorch".into()))
            }
        }
        "auto" => Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        other => Err(TrainerError::Device(format!("--device {other}: expected cpu, cuda or auto"))),
    }
}

/// The device a recipe targets, for planning: "cuda" stays CUDA on a machine without a GPU (the
/// plan is for the machine the run will use).
pub fn target_device(name: &str) -> Result<Device> {
    match name {
        "cuda" => Ok(Device::Cuda(0)),
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
