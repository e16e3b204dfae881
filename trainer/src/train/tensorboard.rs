//! TensorBoard event files written directly: TFRecord framing (length, masked CRC-32C, payload,
//! masked CRC-32C) around hand-encoded `Event` protobufs holding scalar summaries. Small enough
//! to own, and it avoids a protobuf toolchain.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainerError};

pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(step as u64, &mut out);
    body(&mut out);
    out
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<time>.strata.<pid>` and writes the file-version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(TrainerError::io(dir))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let path = dir.join(format!("events.out.tfevents.{}.strata.{}", now as u64, std::process::id()));
        let file = File::create(&path).map_err(TrainerError::io(&path))?;
        let mut w = EventWriter { file, path };
        let rec = event(now, 0, |o| bytes_field(3, b"brain.Event:2", o));
        w.record(&rec)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf).map_err(TrainerError::io(&self.path))
    }

    /// Scalars of one step: `Summary { value = 1: Value { tag = 1, simple_value = 2 (float) } }`.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut val = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut val);
            val.push(0x15);
            val.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(1, &val, &mut summary);
        }
        let rec = event(now, step, |o| bytes_field(5, &summary, o));
        self.record(&rec)?;
        self.file.flush().map_err(TrainerError::io(&self.path))
    }
}
