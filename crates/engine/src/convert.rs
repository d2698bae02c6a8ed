//! Re-quantizing a model file: llama.cpp's file types (`Q4_K_M`, `Q8_0`, …)
//! and the per-tensor rules that decide which ggml type each tensor gets.
//!
//! The rules follow llama.cpp's `llama_tensor_get_type` for the file types
//! this project can produce, so that a mix made here has the same tensor
//! types as llama.cpp's (checked against a llama.cpp-quantized fixture).

use std::borrow::Cow;

use gguf::{GgmlType, GgufFile, GgufWriter, Value};
use rayon::prelude::*;

use crate::EngineError;

/// A whole-file quantization scheme, as llama.cpp names it (`LLAMA_FTYPE_*`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 13] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q5_K_M,
        FileType::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4_K_S => "Q4_K_S",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q5_K_S => "Q5_K_S",
            FileType::Q5_K_M => "Q5_K_M",
            FileType::Q6_K => "Q6_K",
        }
    }

    /// Parse a name case-insensitively; `Q4_K` and `Q5_K` mean their `_M` mixes, as in llama.cpp.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "Q4_K" => Some(FileType::Q4_K_M),
            "Q5_K" => Some(FileType::Q5_K_M),
            upper => Self::ALL.iter().copied().find(|t| t.name() == upper),
        }
    }

    /// `general.file_type` value (`enum llama_ftype`).
    pub fn llama_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most weight matrices get.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_K_S | FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q5_K_S | FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }
}

/// What the per-tensor rules need to know about one tensor.
#[derive(Clone, Debug)]
pub struct TensorDesc<'a> {
    pub name: &'a str,
    /// Dimensions in ggml order (row length first).
    pub dims: &'a [u64],
    /// The type it has now (1-D tensors keep it, except in an all-F32 file).
    pub ty: GgmlType,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and
/// every third layer in between get more bits in the `_M` mixes.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    i_layer < n_layers / 8
        || i_layer >= 7 * n_layers / 8
        || (i_layer as isize - (n_layers / 8) as isize).rem_euclid(3) == 2
}

/// A K-quant type on a row length that is not a multiple of 256 falls back
/// to the 32-element format of about the same size, as llama.cpp does.
fn fallback_for_row(ty: GgmlType, row_len: u64) -> GgmlType {
    let fits = |t: GgmlType| row_len.is_multiple_of(t.block_size() as u64);
    if fits(ty) {
        return ty;
    }
    let fallback = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlType::F16
    }
}

/// Whether a tensor is a weight matrix that quantization applies to.
fn is_quantizable(t: &TensorDesc) -> bool {
    t.name.ends_with("weight") && !t.name.contains("_norm.weight") && t.dims.len() >= 2
}

/// Chooses the ggml type of every tensor of a file for one `FileType`.
pub struct TypePlanner {
    file_type: FileType,
    has_output: bool,
    n_attention_wv: usize,
    n_ffn_down: usize,
    i_attention_wv: usize,
    i_ffn_down: usize,
}

impl TypePlanner {
    /// `names` are all tensor names of the file.
    pub fn new<'a>(file_type: FileType, names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut planner = TypePlanner {
            file_type,
            has_output: false,
            n_attention_wv: 0,
            n_ffn_down: 0,
            i_attention_wv: 0,
            i_ffn_down: 0,
        };
        for name in names {
            planner.has_output |= name == "output.weight";
            planner.n_attention_wv +=
                usize::from(name.contains("attn_v.weight") || name.contains("attn_qkv.weight"));
            planner.n_ffn_down += usize::from(name.contains("ffn_down"));
        }
        planner
    }

    /// The type for the next tensor; call in [`plan_order`] order.
    pub fn next_type(&mut self, t: &TensorDesc) -> GgmlType {
        if !is_quantizable(t) {
            return match self.file_type {
                FileType::F32 => GgmlType::F32,
                _ if t.ty.is_quantized() => GgmlType::F32,
                _ => t.ty,
            };
        }
        let default = self.file_type.default_type();
        if !default.is_quantized() {
            return default;
        }
        let ty = self.k_mix_type(t, default);
        fallback_for_row(ty, t.dims[0])
    }

    fn k_mix_type(&mut self, t: &TensorDesc, default: GgmlType) -> GgmlType {
        use FileType::*;
        let ft = self.file_type;
        let name = t.name;
        if name == "output.weight" || (!self.has_output && name == "token_embd.weight") {
            return if !t.dims[0].is_multiple_of(default.block_size() as u64) {
                GgmlType::Q8_0
            } else if default != GgmlType::Q8_0 {
                GgmlType::Q6_K
            } else {
                default
            };
        }
        // A fused QKV tensor (phi3) follows the attn_v rules, as llama.cpp's
        // `category_is_attn_v` has it (older llama.cpp gave it Q5_K in Q4_K_M).
        if name.contains("attn_v.weight") || name.contains("attn_qkv.weight") {
            let i = self.i_attention_wv;
            self.i_attention_wv += 1;
            return match ft {
                Q4_K_M | Q5_K_M if use_more_bits(i, self.n_attention_wv) => GgmlType::Q6_K,
                Q4_K_S if i < 4 => GgmlType::Q5_K,
                _ => default,
            };
        }
        if name.contains("ffn_down") {
            let i = self.i_ffn_down;
            self.i_ffn_down += 1;
            return match ft {
                Q4_K_M | Q5_K_M if use_more_bits(i, self.n_ffn_down) => GgmlType::Q6_K,
                Q4_K_S if i < self.n_ffn_down / 8 => GgmlType::Q5_K,
                _ => default,
            };
        }
        default
    }
}

/// The order llama.cpp visits tensors in when quantizing: tensors outside the
/// blocks first, then block by block (numerically), each by name.
pub fn plan_order(names: &[&str]) -> Vec<usize> {
    let key = |name: &str| -> (i64, String) {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-1);
        (layer, name.to_string())
    };
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| key(names[i]));
    order
}

/// The type every tensor of `tensors` gets under `file_type`, in input order.
pub fn plan_types(file_type: FileType, tensors: &[TensorDesc]) -> Vec<GgmlType> {
    let names: Vec<&str> = tensors.iter().map(|t| t.name).collect();
    let mut planner = TypePlanner::new(file_type, names.iter().copied());
    let mut types = vec![GgmlType::F32; tensors.len()];
    for i in plan_order(&names) {
        types[i] = planner.next_type(&tensors[i]);
    }
    types
}

/// Convert one tensor's bytes from `from` to `to` through f32.
pub fn convert_tensor(
    from: GgmlType,
    to: GgmlType,
    data: &[u8],
    n_elements: usize,
) -> Result<Vec<u8>, EngineError> {
    let mut values = vec![0f32; n_elements];
    quant::dequantize(from, data, &mut values)?;
    Ok(quant::quantize(to, &values)?)
}

/// Re-quantize every tensor of `input` into a new file under `file_type`.
/// Tensors whose type does not change are borrowed from the input mapping.
pub fn requantize<'a>(
    input: &'a GgufFile,
    file_type: FileType,
) -> Result<GgufWriter<'a>, EngineError> {
    let descs: Vec<TensorDesc> = input
        .tensors()
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            dims: &t.dims,
            ty: t.ty,
        })
        .collect();
    let types = plan_types(file_type, &descs);
    for (t, &to) in input.tensors().iter().zip(&types) {
        if t.ty != to && !quant::can_dequantize(t.ty) {
            return Err(EngineError::Tensor {
                name: t.name.clone(),
                reason: format!("cannot convert from {} (unsupported type)", t.ty),
            });
        }
    }
    let converted: Vec<Cow<'a, [u8]>> = input
        .tensors()
        .par_iter()
        .zip(types.par_iter())
        .map(|(t, &to)| -> Result<Cow<'a, [u8]>, EngineError> {
            let data = input.tensor_data(t);
            if t.ty == to {
                return Ok(Cow::Borrowed(data));
            }
            convert_tensor(t.ty, to, data, t.n_elements() as usize)
                .map(Cow::Owned)
                .map_err(|e| EngineError::Tensor {
                    name: t.name.clone(),
                    reason: format!("{} → {to}: {e}", t.ty),
                })
        })
        .collect::<Result<_, _>>()?;

    let mut out = GgufWriter::with_metadata(input.metadata().clone());
    out.set("general.file_type", Value::U32(file_type.llama_ftype()));
    out.set("general.quantization_version", Value::U32(2));
    for ((t, &to), data) in input.tensors().iter().zip(&types).zip(converted) {
        out.add_tensor(t.name.clone(), to, &t.dims, data)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05_tensors() -> Vec<(String, Vec<u64>)> {
        let (embd, ff, kv, vocab) = (896u64, 4864u64, 128u64, 151936u64);
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![embd, vocab]),
            ("output_norm.weight".to_string(), vec![embd]),
        ];
        for i in 0..24 {
            let p = |s: &str| format!("blk.{i}.{s}");
            t.extend([
                (p("attn_norm.weight"), vec![embd]),
                (p("attn_q.weight"), vec![embd, embd]),
                (p("attn_q.bias"), vec![embd]),
                (p("attn_k.weight"), vec![embd, kv]),
                (p("attn_k.bias"), vec![kv]),
                (p("attn_v.weight"), vec![embd, kv]),
                (p("attn_v.bias"), vec![kv]),
                (p("attn_output.weight"), vec![embd, embd]),
                (p("ffn_norm.weight"), vec![embd]),
                (p("ffn_gate.weight"), vec![embd, ff]),
                (p("ffn_up.weight"), vec![embd, ff]),
                (p("ffn_down.weight"), vec![ff, embd]),
            ]);
        }
        t
    }

    #[test]
    fn qwen25_05b_q4_k_m_mix_matches_llama_cpp_counts() {
        // llama.cpp's Q4_K_M of Qwen2.5-0.5B: Q5_0 ×132, Q8_0 ×13, Q4_K ×12, Q6_K ×12, F32 ×121.
        let tensors = qwen05_tensors();
        let descs: Vec<TensorDesc> = tensors
            .iter()
            .map(|(n, d)| TensorDesc {
                name: n,
                dims: d,
                ty: GgmlType::F32,
            })
            .collect();
        let types = plan_types(FileType::Q4_K_M, &descs);
        let count = |ty| types.iter().filter(|&&t| t == ty).count();
        assert_eq!(count(GgmlType::Q5_0), 132);
        assert_eq!(count(GgmlType::Q8_0), 13);
        assert_eq!(count(GgmlType::Q4_K), 12);
        assert_eq!(count(GgmlType::Q6_K), 12);
        assert_eq!(count(GgmlType::F32), 121);
        let embd = descs
            .iter()
            .position(|d| d.name == "token_embd.weight")
            .unwrap();
        assert_eq!(
            types[embd],
            GgmlType::Q8_0,
            "tied embedding acts as the output"
        );
    }

    #[test]
    fn use_more_bits_picks_a_third_plus_the_ends() {
        let picked: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(picked, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn order_is_by_layer_number_not_by_string() {
        let names = [
            "blk.10.a",
            "blk.2.b",
            "token_embd.weight",
            "blk.2.a",
            "output_norm.weight",
        ];
        let order: Vec<&str> = plan_order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(
            order,
            [
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.a",
                "blk.2.b",
                "blk.10.a"
            ]
        );
    }

    #[test]
    fn file_type_names() {
        for ft in FileType::ALL {
            assert_eq!(FileType::from_name(&ft.name().to_lowercase()), Some(ft));
        }
        assert_eq!(FileType::from_name("q4_k"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::from_name("Q3_K_M"), None);
    }
}
