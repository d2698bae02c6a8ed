//! `inspect`: a GGUF file's metadata, tensors and memory needs, as text or JSON.

use std::collections::BTreeMap;
use std::io::{self, Write};

use gguf::{Array, GgmlType, GgufFile, Value};
use serde_json::json;

/// Per-type totals of a file's tensors.
#[derive(Default)]
struct TypeTotal {
    tensors: u64,
    elements: u64,
    bytes: u64,
}

pub struct Report<'a> {
    file: &'a GgufFile,
    by_type: BTreeMap<GgmlType, TypeTotal>,
    elements: u64,
}

impl<'a> Report<'a> {
    pub fn new(file: &'a GgufFile) -> Self {
        let mut by_type: BTreeMap<GgmlType, TypeTotal> = BTreeMap::new();
        for t in file.tensors() {
            let total = by_type.entry(t.ty).or_default();
            total.tensors += 1;
            total.elements += t.n_elements();
            total.bytes += t.n_bytes;
        }
        let elements = by_type.values().map(|t| t.elements).sum();
        Report {
            file,
            by_type,
            elements,
        }
    }

    pub fn print(&self, out: &mut impl Write, full: bool) -> io::Result<()> {
        let f = self.file;
        writeln!(
            out,
            "{}: GGUF v{}, {} bytes, alignment {}, data section at {}",
            f.path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            f.version(),
            f.file_len(),
            f.alignment(),
            f.data_offset()
        )?;
        writeln!(out, "\nmetadata ({} keys)", f.metadata().len())?;
        for (key, value) in f.metadata().iter() {
            writeln!(
                out,
                "  {} = {}",
                gguf::shown(key),
                describe_value(value, full)
            )?;
        }
        writeln!(out, "\ntensors ({})", f.tensors().len())?;
        let width = f.tensors().iter().map(|t| t.name.len()).max().unwrap_or(4);
        writeln!(
            out,
            "  {:width$}  {:7}  {:>20}  {:>12}",
            "name", "type", "shape", "bytes"
        )?;
        for t in f.tensors() {
            writeln!(
                out,
                "  {:width$}  {:7}  {:>20}  {:>12}",
                gguf::shown(&t.name),
                t.ty.name(),
                t.shape_string(),
                t.n_bytes
            )?;
        }
        writeln!(out, "\ntotals by type")?;
        writeln!(
            out,
            "  {:7}  {:>7}  {:>13}  {:>13}  {:>10}",
            "type", "tensors", "elements", "bytes", "bits/weight"
        )?;
        for (ty, total) in &self.by_type {
            writeln!(
                out,
                "  {:7}  {:>7}  {:>13}  {:>13}  {:>10.2}",
                ty.name(),
                total.tensors,
                total.elements,
                total.bytes,
                total.bytes as f64 * 8.0 / total.elements as f64
            )?;
        }
        let stored = f.tensor_bytes_total();
        writeln!(out, "\nweights: {} elements", self.elements)?;
        writeln!(
            out,
            "  as stored:        {:>12} bytes ({:.1} MiB)",
            stored,
            super::mib(stored)
        )?;
        writeln!(
            out,
            "  dequantized F16:  {:>12} bytes ({:.1} MiB)",
            self.elements * 2,
            super::mib(self.elements * 2)
        )?;
        writeln!(
            out,
            "  dequantized F32:  {:>12} bytes ({:.1} MiB)",
            self.elements * 4,
            super::mib(self.elements * 4)
        )?;
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let f = self.file;
        let metadata: serde_json::Map<String, serde_json::Value> = f
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect();
        let tensors: Vec<serde_json::Value> = f
            .tensors()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "type": t.ty.name(),
                    "shape": t.dims,
                    "offset": t.offset,
                    "bytes": t.n_bytes,
                })
            })
            .collect();
        let totals: serde_json::Map<String, serde_json::Value> = self
            .by_type
            .iter()
            .map(|(ty, t)| {
                (
                    ty.name().to_string(),
                    json!({"tensors": t.tensors, "elements": t.elements, "bytes": t.bytes}),
                )
            })
            .collect();
        json!({
            "path": f.path().map(|p| p.display().to_string()),
            "version": f.version(),
            "file_bytes": f.file_len(),
            "alignment": f.alignment(),
            "data_offset": f.data_offset(),
            "metadata": metadata,
            "tensors": tensors,
            "totals_by_type": totals,
            "weights": {
                "elements": self.elements,
                "bytes_as_stored": f.tensor_bytes_total(),
                "bytes_f16": self.elements * 2,
                "bytes_f32": self.elements * 4,
            },
        })
    }
}

/// Whether worker-orcd can run a file, on each backend, and with which
/// features; or the exact thing it lacks.
pub struct Support {
    /// The model's features, when its spec and weights load.
    pub features: Result<Vec<String>, String>,
    /// Why the GPU kernels cannot run it (`None`: they can).
    pub gpu: Option<String>,
}

impl Support {
    pub fn new(file: &GgufFile) -> Self {
        let loaded = engine::spec::ModelSpec::from_gguf(file).and_then(|spec| {
            let host = engine::weights::HostWeights::load(file, &spec)?;
            Ok((spec, host))
        });
        match loaded {
            Ok((spec, host)) => Support {
                gpu: cuda::check_shapes(&spec, &host)
                    .err()
                    .map(|e| e.to_string()),
                features: Ok(spec.features()),
            },
            Err(e) => Support {
                features: Err(e.to_string()),
                gpu: None,
            },
        }
    }

    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        match &self.features {
            Ok(features) => {
                writeln!(
                    out,
                    "
worker-orcd runs this model on the CPU: yes"
                )?;
                match &self.gpu {
                    None => writeln!(out, "worker-orcd runs this model on the GPU: yes")?,
                    Some(why) => {
                        writeln!(out, "worker-orcd runs this model on the GPU: no: {why}")?
                    }
                }
                for f in features {
                    writeln!(out, "  {f}")?;
                }
                Ok(())
            }
            Err(why) => writeln!(
                out,
                "
worker-orcd cannot run this model: {why}"
            ),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match &self.features {
            Ok(features) => json!({
                "cpu": true,
                "gpu": self.gpu.is_none(),
                "gpu_missing": self.gpu,
                "features": features,
            }),
            Err(why) => json!({"cpu": false, "gpu": false, "missing": why}),
        }
    }
}

/// What `inspect --check` found in one tensor.
pub struct TensorCheck {
    pub name: String,
    /// Values that are NaN or infinite, and the index of the first.
    pub non_finite: u64,
    pub first: Option<u64>,
    /// Why the tensor could not be decoded, if it could not.
    pub error: Option<String>,
}

/// Decode every tensor and count its non-finite values. Loading scans only
/// the small norm and bias vectors; this reads every weight (a few seconds
/// per GB), so that a corrupt matrix is found and named.
pub fn check_tensors(file: &GgufFile) -> Vec<TensorCheck> {
    use rayon::prelude::*;
    file.tensors()
        .par_iter()
        .map(|t| {
            let mut check = TensorCheck {
                name: t.name.clone(),
                non_finite: 0,
                first: None,
                error: None,
            };
            if !quant::can_dequantize(t.ty) {
                check.error = Some(format!("type {} cannot be decoded", t.ty));
                return check;
            }
            // A few thousand rows at a time, so that memory stays small whatever the tensor.
            let row_len = t.row_len() as usize;
            let row_bytes = (t.n_bytes / t.n_rows()) as usize;
            let rows_per_chunk = (1 << 20) / row_len.max(1) + 1;
            let mut values = vec![0f32; rows_per_chunk * row_len];
            let data = file.tensor_data(t);
            for (chunk_index, chunk) in data.chunks(rows_per_chunk * row_bytes).enumerate() {
                let n = chunk.len() / row_bytes * row_len;
                if let Err(e) = quant::dequantize(t.ty, chunk, &mut values[..n]) {
                    check.error = Some(e.to_string());
                    return check;
                }
                for (i, v) in values[..n].iter().enumerate() {
                    if !v.is_finite() {
                        check.non_finite += 1;
                        check
                            .first
                            .get_or_insert((chunk_index * rows_per_chunk * row_len + i) as u64);
                    }
                }
            }
            check
        })
        .collect()
}

/// Print the checks, one line per tensor; whether every tensor is sound.
pub fn print_checks(out: &mut impl Write, checks: &[TensorCheck]) -> io::Result<bool> {
    writeln!(
        out,
        "
check (every value of every tensor)"
    )?;
    let width = checks
        .iter()
        .map(|c| gguf::shown(&c.name).len())
        .max()
        .unwrap_or(4);
    let mut sound = true;
    for c in checks {
        let verdict = match (&c.error, c.first) {
            (Some(e), _) => format!("cannot be decoded: {e}"),
            (None, Some(first)) => {
                format!("{} non-finite values, the first at {first}", c.non_finite)
            }
            (None, None) => "ok".to_string(),
        };
        sound &= verdict == "ok";
        writeln!(out, "  {:width$}  {verdict}", gguf::shown(&c.name))?;
    }
    let bad = checks
        .iter()
        .filter(|c| c.error.is_some() || c.non_finite > 0)
        .count();
    writeln!(out, "  {} tensors, {bad} with problems", checks.len())?;
    Ok(sound)
}

/// The checks as JSON, for `inspect --check --json`.
pub fn checks_json(checks: &[TensorCheck]) -> serde_json::Value {
    checks
        .iter()
        .map(|c| json!({"name": c.name, "non_finite": c.non_finite, "first_non_finite": c.first, "error": c.error}))
        .collect()
}

/// `Q4_1 ×210, F32 ×61, Q8_0 ×1`, most frequent first.
pub fn type_counts_line(file: &GgufFile) -> String {
    let mut counts: BTreeMap<GgmlType, usize> = BTreeMap::new();
    for t in file.tensors() {
        *counts.entry(t.ty).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let parts: Vec<String> = counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
    format!("tensor types: {}", parts.join(", "))
}

const SHORT_STRING: usize = 80;
const SHORT_ARRAY: usize = 6;

fn describe_value(value: &Value, full: bool) -> String {
    match value {
        Value::String(s) => quote(s, full),
        Value::Array(a) => {
            let items = array_items(a);
            let shown = if full {
                items.len()
            } else {
                items.len().min(SHORT_ARRAY)
            };
            let mut parts: Vec<String> = items[..shown].to_vec();
            if shown < items.len() {
                parts.push(format!("… {} more", items.len() - shown));
            }
            format!(
                "[{} × {}] [{}]",
                a.element_type().name(),
                a.len(),
                parts.join(", ")
            )
        }
        v => scalar(v),
    }
}

fn quote(s: &str, full: bool) -> String {
    let escaped = format!("{s:?}");
    if full || escaped.chars().count() <= SHORT_STRING {
        escaped
    } else {
        let head: String = escaped.chars().take(SHORT_STRING).collect();
        format!("{head}… ({} bytes)", s.len())
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| other.as_u64().map(|u| u.to_string()))
            .unwrap_or_default(),
    }
}

fn array_items(a: &Array) -> Vec<String> {
    fn each<T: ToString>(v: &[T]) -> Vec<String> {
        v.iter().map(T::to_string).collect()
    }
    match a {
        Array::U8(v) => each(v),
        Array::I8(v) => each(v),
        Array::U16(v) => each(v),
        Array::I16(v) => each(v),
        Array::U32(v) => each(v),
        Array::I32(v) => each(v),
        Array::F32(v) => each(v),
        Array::Bool(v) => each(v),
        Array::U64(v) => each(v),
        Array::I64(v) => each(v),
        Array::F64(v) => each(v),
        Array::String(v) => v.iter().map(|s| quote(s, false)).collect(),
        Array::Array(v) => v
            .iter()
            .map(|inner| format!("[{} × {}]", inner.element_type().name(), inner.len()))
            .collect(),
    }
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(a) => array_json(a),
        other => other
            .as_i64()
            .map(|i| json!(i))
            .or_else(|| other.as_u64().map(|u| json!(u)))
            .unwrap_or(serde_json::Value::Null),
    }
}

fn array_json(a: &Array) -> serde_json::Value {
    match a {
        Array::U8(v) => json!(v),
        Array::I8(v) => json!(v),
        Array::U16(v) => json!(v),
        Array::I16(v) => json!(v),
        Array::U32(v) => json!(v),
        Array::I32(v) => json!(v),
        Array::F32(v) => json!(v),
        Array::Bool(v) => json!(v),
        Array::U64(v) => json!(v),
        Array::I64(v) => json!(v),
        Array::F64(v) => json!(v),
        Array::String(v) => json!(v),
        Array::Array(v) => serde_json::Value::Array(v.iter().map(array_json).collect()),
    }
}
