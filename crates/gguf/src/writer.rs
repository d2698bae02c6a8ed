//! Writing GGUF v3 files that llama.cpp and the `gguf` Python package read.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::error::{GgufError, Result};
use crate::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::value::{Array, Metadata, Value};
use crate::GgmlType;

struct PendingTensor<'a> {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Cow<'a, [u8]>,
}

/// Collects metadata and tensors, then writes them as one GGUF v3 file.
///
/// Tensor data may be borrowed (e.g. straight from another file's mapping)
/// so re-writing a model does not copy unchanged tensors.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Metadata,
    tensors: Vec<PendingTensor<'a>>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_metadata(metadata: Metadata) -> Self {
        GgufWriter {
            metadata,
            tensors: Vec::new(),
        }
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.set(key, value);
    }

    /// Add a tensor; `dims` are in ggml order (row length first) and `data`
    /// must hold exactly the bytes that shape and type need.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<()> {
        let name = name.into();
        let data = data.into();
        let bad = |reason: String| GgufError::Tensor {
            name: name.clone(),
            reason,
        };
        if dims.is_empty() || dims.len() > MAX_DIMS || dims.contains(&0) {
            return Err(bad(format!(
                "dimensions {dims:?} must be 1..={MAX_DIMS} non-zero values"
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".to_string()));
        }
        let expected = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|_| dims[0].is_multiple_of(ty.block_size() as u64))
            .and_then(|n| ty.row_bytes(n))
            .ok_or_else(|| {
                bad(format!(
                    "shape {dims:?} is not a whole number of {ty} blocks per row"
                ))
            })?;
        if data.len() as u64 != expected {
            return Err(bad(format!(
                "{ty} {dims:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(())
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            // The reader's limit: a file copied from a hostile one must not
            // pad each tensor to a terabyte.
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 30)
                .ok_or_else(|| {
                    GgufError::Write(format!(
                        "general.alignment {v:?} is not a power of two up to 2^30"
                    ))
                }),
        }
    }

    /// Write the file to `out`.
    pub fn write(&self, out: &mut impl Write) -> Result<()> {
        let alignment = self.alignment()?;
        let mut w = CountingWriter {
            inner: out,
            written: 0,
        };
        let io = |e: io::Error| GgufError::Write(e.to_string());

        w.write_all(&GGUF_MAGIC).map_err(io)?;
        w.write_all(&3u32.to_le_bytes()).map_err(io)?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (key, value) in self.metadata.iter() {
            write_string(&mut w, key).map_err(io)?;
            w.write_all(&(value.value_type() as u32).to_le_bytes())
                .map_err(io)?;
            write_value(&mut w, value).map_err(io)?;
        }

        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(&mut w, &t.name).map_err(io)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())
                .map_err(io)?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes()).map_err(io)?;
            }
            w.write_all(&t.ty.id().to_le_bytes()).map_err(io)?;
            w.write_all(&offset.to_le_bytes()).map_err(io)?;
            offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
        }
        pad(&mut w, alignment).map_err(io)?;

        for t in &self.tensors {
            w.write_all(&t.data).map_err(io)?;
            pad(&mut w, alignment).map_err(io)?;
        }
        w.flush().map_err(io)
    }

    /// Write the file to `path` atomically (a temporary file in the same
    /// folder, renamed into place once complete).
    pub fn write_to_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".partial");
        let tmp = std::path::PathBuf::from(tmp_name);
        let file = std::fs::File::create(&tmp).map_err(io_err)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let result = self
            .write(&mut out)
            .and_then(|()| {
                out.into_inner()
                    .map_err(|e| GgufError::Write(e.to_string()))
            })
            .and_then(|file| file.sync_all().map_err(io_err))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

struct CountingWriter<'w, W: Write> {
    inner: &'w mut W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad<W: Write>(w: &mut CountingWriter<'_, W>, alignment: u64) -> io::Result<()> {
    let target = w.written.next_multiple_of(alignment);
    let zeros = vec![0u8; (target - w.written) as usize];
    w.write_all(&zeros)
}

fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, value: &Value) -> io::Result<()> {
    match value {
        Value::U8(v) => w.write_all(&[*v]),
        Value::I8(v) => w.write_all(&v.to_le_bytes()),
        Value::U16(v) => w.write_all(&v.to_le_bytes()),
        Value::I16(v) => w.write_all(&v.to_le_bytes()),
        Value::U32(v) => w.write_all(&v.to_le_bytes()),
        Value::I32(v) => w.write_all(&v.to_le_bytes()),
        Value::F32(v) => w.write_all(&v.to_le_bytes()),
        Value::Bool(v) => w.write_all(&[u8::from(*v)]),
        Value::String(s) => write_string(w, s),
        Value::Array(a) => write_array(w, a),
        Value::U64(v) => w.write_all(&v.to_le_bytes()),
        Value::I64(v) => w.write_all(&v.to_le_bytes()),
        Value::F64(v) => w.write_all(&v.to_le_bytes()),
    }
}

fn write_array(w: &mut impl Write, a: &Array) -> io::Result<()> {
    w.write_all(&(a.element_type() as u32).to_le_bytes())?;
    w.write_all(&(a.len() as u64).to_le_bytes())?;
    macro_rules! each {
        ($v:expr) => {{
            for x in $v {
                w.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        }};
    }
    match a {
        Array::U8(v) => w.write_all(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => {
            let bytes: Vec<u8> = v.iter().map(|&b| u8::from(b)).collect();
            w.write_all(&bytes)
        }
        Array::String(v) => {
            for s in v {
                write_string(w, s)?;
            }
            Ok(())
        }
        Array::Array(v) => {
            for inner in v {
                write_array(w, inner)?;
            }
            Ok(())
        }
    }
}
