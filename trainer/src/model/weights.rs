//! Reading and writing Hugging Face weight files: `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, bf16/fp16/fp32/fp64.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainerError};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// The weight files of a folder: which file holds which tensor.
pub struct WeightFiles {
    /// tensor name → file that holds it
    pub location: BTreeMap<String, PathBuf>,
    maps: HashMap<PathBuf, Mmap>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        // Not model weights, but stored as they are (optimizer steps, RNG states, test files).
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(TrainerError::io(path))?;
    // SAFETY: the map is read-only and lives as long as `WeightFiles`. Another process truncating
    // the file while it is mapped would fault; that is the usual contract of memory-mapped weights
    // (safetensors and transformers do the same).
    unsafe { Mmap::map(&file) }.map_err(TrainerError::io(path))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| TrainerError::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file ({e}); is it truncated or still downloading?"),
    })
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut location = BTreeMap::new();
        let mut maps = HashMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(TrainerError::io(&index))?;
            let idx: IndexFile = serde_json::from_str(&text).map_err(|e| TrainerError::Checkpoint {
                path: index.clone(),
                msg: format!("line {}: {e}", e.line()),
            })?;
            for (name, file) in idx.weight_map {
                let shard = dir.join(&file);
                if !maps.contains_key(&shard) {
                    if !shard.exists() {
                        return Err(TrainerError::Checkpoint {
                            path: index.clone(),
                            msg: format!("shard `{file}` (holding `{name}`) does not exist"),
                        });
                    }
                    maps.insert(shard.clone(), map_file(&shard)?);
                }
                location.insert(name, shard);
            }
            // Every shard must parse and hold what the index says it holds.
            for (shard, m) in &maps {
                let st = parse(shard, m)?;
                let have: std::collections::HashSet<String> = st.names().into_iter().map(|s| s.to_string()).collect();
                for (name, _) in location.iter().filter(|(_, f)| *f == shard) {
                    if !have.contains(name) {
                        return Err(TrainerError::Tensor {
                            path: shard.clone(),
                            tensor: name.clone(),
                            msg: format!("listed in {INDEX_FILE} but missing from the shard"),
                        });
                    }
                }
            }
        } else if single.exists() {
            let m = map_file(&single)?;
            for name in parse(&single, &m)?.names() {
                location.insert(name.to_string(), single.clone());
            }
            maps.insert(single, m);
        } else {
            return Err(TrainerError::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!("no {SINGLE_FILE} or {INDEX_FILE} in the model folder"),
            });
        }
        Ok(WeightFiles { location, maps })
    }

    /// Opens one safetensors file of any name (adapters, optimizer state).
    pub fn open_file(path: &Path) -> Result<WeightFiles> {
        let m = map_file(path)?;
        let mut location = BTreeMap::new();
        for name in parse(path, &m)?.names() {
            location.insert(name.to_string(), path.to_path_buf());
        }
        let mut maps = HashMap::new();
        maps.insert(path.to_path_buf(), m);
        Ok(WeightFiles { location, maps })
    }

    /// Reads one tensor as stored (any shape), converted to `kind` on `device`.
    pub fn load_any(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let path = self.location.get(name).ok_or_else(|| TrainerError::Tensor {
            path: self.describe(),
            tensor: name.to_string(),
            msg: "missing".into(),
        })?;
        let st = parse(path, &self.maps[path])?;
        let view = st.tensor(name).map_err(|e| TrainerError::Tensor { path: path.clone(), tensor: name.into(), msg: e.to_string() })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        self.load(name, &shape, kind, device)
    }

    /// Reads one tensor, checks its shape, converts it to `kind` on `device`.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let path = self.location.get(name).ok_or_else(|| TrainerError::Tensor {
            path: self.describe(),
            tensor: name.to_string(),
            msg: "missing from the checkpoint".into(),
        })?;
        let bad = |msg: String| TrainerError::Tensor { path: path.clone(), tensor: name.to_string(), msg };
        let st = parse(path, &self.maps[path])?;
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let have: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if have != shape {
            return Err(bad(format!("shape {have:?}, expected {shape:?} from config.json")));
        }
        let src_kind = kind_of(view.dtype()).ok_or_else(|| bad(format!("dtype {:?} is not supported (bf16, f16, f32, f64)", view.dtype())))?;
        let t = Tensor::f_from_data_size(view.data(), shape, src_kind).map_err(|e| bad(e.to_string()))?;
        Ok(t.to_kind(kind).to_device(device))
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.location.keys()
    }

    fn describe(&self) -> PathBuf {
        let mut files: Vec<_> = self.maps.keys().collect();
        files.sort();
        match files.as_slice() {
            [one] => (*one).clone(),
            _ => files.first().and_then(|f| f.parent()).map(|d| d.join(INDEX_FILE)).unwrap_or_default(),
        }
    }
}

/// Writes `tensors` as one `model.safetensors` in `dir` (created if needed), each in its own dtype.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).ok_or_else(|| TrainerError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            msg: format!("cannot store dtype {:?}", t.kind()),
        })?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        bufs.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainerError::Tensor { path: path.to_path_buf(), tensor: n.clone(), msg: e.to_string() })
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| TrainerError::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("writing failed: {e}"),
    })
}
