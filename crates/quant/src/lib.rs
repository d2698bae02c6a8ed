//! ggml block formats on the CPU: their layouts, dequantization to f32 and
//! f16, quantization, and matrix products straight from the blocks.
//!
//! GGUF files store weights in ggml's block formats (Q4_K, Q6_K, Q8_0, …).
//! Everything that computes with them — the CPU backend, the loader that
//! converts weights for the GPU, the `quantize` command and the tests that
//! check the GPU kernels — goes through this crate, so it has one job: be
//! exact. Dequantization reproduces gguf-py's `gguf.quants.dequantize`
//! (0.19.0) bit for bit, operation order included; the quantizers reproduce
//! `gguf.quants.quantize` where gguf-py has one (F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0) and llama.cpp's reference quantizers otherwise (the
//! K-quants, Q8_1). Large inputs are split across the rayon thread pool.
//!
//! The CPU backend's matrix products ([`matmul()`], [`matmul_many`]) are the
//! one place where speed comes first: they decode blocks in registers and
//! are checked against dequantize-then-f64-dot within a rounding bound
//! rather than bit for bit (see [`mod@matmul`]).
//!
//! Layouts: [`legacy`] holds the 32-value formats, [`kquants`] the 256-value
//! super-block formats; each block is a `#[repr(C)]` struct of byte arrays
//! (alignment 1, so any byte slice can be viewed as blocks).

mod float;
mod kernel;
mod kquantize;
pub mod kquants;
pub mod legacy;

use std::fmt;

use half::f16;
use rayon::prelude::*;

pub use gguf::{GgmlType, QK_K};
pub use kquants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
pub use legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, QK_LEGACY};
pub use matmul::{
    matmul, matmul_input, matmul_many, Activations, MatmulInput, Product, TOKEN_TILE,
};

/// Types this crate can both dequantize and quantize.
pub const SUPPORTED_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Below this many values a call runs on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;
/// Values per rayon task when dequantizing (a multiple of every block size).
const DEQUANTIZE_TASK_VALUES: usize = 1 << 15;
/// Values per rayon task when quantizing; smaller because the K-quant search is slow.
const QUANTIZE_TASK_VALUES: usize = 1 << 12;

/// What a caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Dequantize,
    Quantize,
    Matmul,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Dequantize => "dequantize",
            Op::Quantize => "quantize",
            Op::Matmul => "multiply",
        })
    }
}

/// Why a (de)quantization call was refused. Nothing is written on error.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(
        "cannot {op} {ty}: not implemented (supported types: {})",
        SupportedList
    )]
    Unsupported { ty: GgmlType, op: Op },
    #[error("{ty} data of {bytes} bytes is not a whole number of {type_size}-byte blocks")]
    PartialBlock {
        ty: GgmlType,
        bytes: usize,
        type_size: usize,
    },
    #[error("cannot quantize {values} values to {ty}: the count must be a multiple of its block size {block_size}")]
    PartialBlockValues {
        ty: GgmlType,
        values: usize,
        block_size: usize,
    },
    #[error("{ty} data of {bytes} bytes holds {values} values, but the output has room for {output_len}")]
    Length {
        ty: GgmlType,
        bytes: usize,
        values: usize,
        output_len: usize,
    },
    #[error("{ty} matrix of {rows}×{cols}: {problem}")]
    MatmulShape {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        problem: String,
    },
    #[error("activations of {len} values are not {n} tokens × {cols}")]
    Activations { len: usize, n: usize, cols: usize },
}

struct SupportedList;

impl fmt::Display for SupportedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ty) in SUPPORTED_TYPES.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(ty.name())?;
        }
        Ok(())
    }
}

/// Whether [`dequantize`] and [`dequantize_f16`] accept `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    SUPPORTED_TYPES.contains(&ty)
}

/// Whether [`quantize`] accepts `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    SUPPORTED_TYPES.contains(&ty)
}

/// Runs `$body` with `$kernel` naming the kernel type of `$ty`
/// (the `F32`/`F16`/`BF16` markers or a block struct).
macro_rules! with_kernel {
    ($ty:expr, $kernel:ident => $body:expr, unsupported => $unsupported:expr) => {
        match $ty {
            GgmlType::F32 => {
                type $kernel = float::F32;
                $body
            }
            GgmlType::F16 => {
                type $kernel = float::F16;
                $body
            }
            GgmlType::BF16 => {
                type $kernel = float::BF16;
                $body
            }
            GgmlType::Q4_0 => {
                type $kernel = BlockQ4_0;
                $body
            }
            GgmlType::Q4_1 => {
                type $kernel = BlockQ4_1;
                $body
            }
            GgmlType::Q5_0 => {
                type $kernel = BlockQ5_0;
                $body
            }
            GgmlType::Q5_1 => {
                type $kernel = BlockQ5_1;
                $body
            }
            GgmlType::Q8_0 => {
                type $kernel = BlockQ8_0;
                $body
            }
            GgmlType::Q8_1 => {
                type $kernel = BlockQ8_1;
                $body
            }
            GgmlType::Q2_K => {
                type $kernel = BlockQ2K;
                $body
            }
            GgmlType::Q3_K => {
                type $kernel = BlockQ3K;
                $body
            }
            GgmlType::Q4_K => {
                type $kernel = BlockQ4K;
                $body
            }
            GgmlType::Q5_K => {
                type $kernel = BlockQ5K;
                $body
            }
            GgmlType::Q6_K => {
                type $kernel = BlockQ6K;
                $body
            }
            GgmlType::Q8_K => {
                type $kernel = BlockQ8K;
                $body
            }
            _ => $unsupported,
        }
    };
}

// after with_kernel!, which it uses
pub mod matmul;

/// Number of values in `src`, which must be whole blocks of `ty`.
fn values_in(ty: GgmlType, src: &[u8]) -> Result<usize, QuantError> {
    let type_size = ty.type_size();
    if !src.len().is_multiple_of(type_size) {
        return Err(QuantError::PartialBlock {
            ty,
            bytes: src.len(),
            type_size,
        });
    }
    Ok(src.len() / type_size * ty.block_size())
}

fn check_output(ty: GgmlType, src: &[u8], output_len: usize) -> Result<(), QuantError> {
    let values = values_in(ty, src)?;
    if values != output_len {
        return Err(QuantError::Length {
            ty,
            bytes: src.len(),
            values,
            output_len,
        });
    }
    Ok(())
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, which must hold
/// exactly the number of values the blocks encode. Bit-exact with gguf-py's
/// `gguf.quants.dequantize`. Runs on the rayon pool for large inputs.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    if !can_dequantize(ty) {
        return Err(QuantError::Unsupported {
            ty,
            op: Op::Dequantize,
        });
    }
    check_output(ty, src, dst.len())?;
    with_kernel!(
        ty,
        K => par_dequantize(ty, src, dst, kernel::dequantize_serial::<K>),
        unsupported => return Err(QuantError::Unsupported { ty, op: Op::Dequantize })
    );
    Ok(())
}

/// [`dequantize`] into a new vector.
pub fn dequantize_to_vec(ty: GgmlType, src: &[u8]) -> Result<Vec<f32>, QuantError> {
    if !can_dequantize(ty) {
        return Err(QuantError::Unsupported {
            ty,
            op: Op::Dequantize,
        });
    }
    let mut dst = vec![0.0; values_in(ty, src)?];
    dequantize(ty, src, &mut dst)?;
    Ok(dst)
}

/// Dequantizes `src` into f16: each value is exactly [`dequantize`]'s f32
/// result rounded to the nearest f16 (ties to even, as `half::f16::from_f32`).
pub fn dequantize_f16(ty: GgmlType, src: &[u8], dst: &mut [f16]) -> Result<(), QuantError> {
    if !can_dequantize(ty) {
        return Err(QuantError::Unsupported {
            ty,
            op: Op::Dequantize,
        });
    }
    check_output(ty, src, dst.len())?;
    with_kernel!(
        ty,
        K => par_dequantize(ty, src, dst, kernel::dequantize_f16_serial::<K>),
        unsupported => return Err(QuantError::Unsupported { ty, op: Op::Dequantize })
    );
    Ok(())
}

/// Quantizes `src` to `ty` and returns the blocks' bytes. `src.len()` must be
/// a multiple of `ty.block_size()`. Bit-exact with gguf-py's
/// `gguf.quants.quantize` for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0;
/// the K-quants and Q8_1 follow llama.cpp's reference quantizers (no
/// importance matrix). Non-finite input never panics, but what it turns
/// into is unspecified for the quantized types. Runs on the rayon pool for
/// large inputs.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !can_quantize(ty) {
        return Err(QuantError::Unsupported {
            ty,
            op: Op::Quantize,
        });
    }
    let block_size = ty.block_size();
    if !src.len().is_multiple_of(block_size) {
        return Err(QuantError::PartialBlockValues {
            ty,
            values: src.len(),
            block_size,
        });
    }
    let mut dst = vec![0u8; src.len() / block_size * ty.type_size()];
    with_kernel!(
        ty,
        K => par_quantize(ty, src, &mut dst, <K as kernel::Quantize>::quantize),
        unsupported => return Err(QuantError::Unsupported { ty, op: Op::Quantize })
    );
    Ok(dst)
}

/// Runs `serial` over `src`/`dst`, split into tasks of whole blocks on the
/// rayon pool when the input is large.
fn par_dequantize<T: Send>(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [T],
    serial: impl Fn(&[u8], &mut [T]) + Sync,
) {
    if dst.len() < PARALLEL_MIN_VALUES {
        serial(src, dst);
        return;
    }
    let blocks_per_task = DEQUANTIZE_TASK_VALUES / ty.block_size();
    src.par_chunks(blocks_per_task * ty.type_size())
        .zip(dst.par_chunks_mut(blocks_per_task * ty.block_size()))
        .for_each(|(src, dst)| serial(src, dst));
}

fn par_quantize(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    serial: impl Fn(&[f32], &mut [u8]) + Sync,
) {
    if src.len() < QUANTIZE_TASK_VALUES * 2 {
        serial(src, dst);
        return;
    }
    let blocks_per_task = QUANTIZE_TASK_VALUES / ty.block_size();
    src.par_chunks(blocks_per_task * ty.block_size())
        .zip(dst.par_chunks_mut(blocks_per_task * ty.type_size()))
        .for_each(|(src, dst)| serial(src, dst));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Equal bits, or both NaN (which NaN comes out of `NaN * x + NaN` is up
    /// to operand order, which the compiler may swap for a commutative op).
    fn same_value(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// The AVX2 build of each kernel is what runs on this machine; the
    /// baseline build is what runs on CPUs without AVX2/F16C. Both must give
    /// the same values.
    #[test]
    fn baseline_and_dispatched_kernels_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for ty in SUPPORTED_TYPES {
            let n_blocks = 4096 / ty.block_size() + 3;
            let mut src = vec![0u8; n_blocks * ty.type_size()];
            rng.fill(&mut src[..]);
            let n = n_blocks * ty.block_size();
            with_kernel!(
                ty,
                K => {
                    let mut baseline = vec![0f32; n];
                    <K as kernel::Dequantize>::dequantize::<kernel::StoreF32>(&src, &mut baseline);
                    let mut dispatched = vec![0f32; n];
                    kernel::dequantize_serial::<K>(&src, &mut dispatched);
                    for (i, (a, b)) in baseline.iter().zip(&dispatched).enumerate() {
                        assert!(same_value(*a, *b), "{ty} value {i}: baseline {a:e}, dispatched {b:e}");
                    }

                    let mut baseline = vec![f16::ZERO; n];
                    <K as kernel::Dequantize>::dequantize::<kernel::StoreF16>(&src, &mut baseline);
                    let mut dispatched = vec![f16::ZERO; n];
                    kernel::dequantize_f16_serial::<K>(&src, &mut dispatched);
                    for (i, (a, b)) in baseline.iter().zip(&dispatched).enumerate() {
                        assert!(same_value(a.to_f32(), b.to_f32()), "{ty} f16 value {i}: baseline {a}, dispatched {b}");
                    }
                },
                unsupported => unreachable!("{ty} is in SUPPORTED_TYPES")
            );
        }
    }

    #[test]
    fn block_structs_have_the_ggml_sizes() {
        use std::mem::size_of;
        let sizes = [
            (GgmlType::Q4_0, size_of::<BlockQ4_0>()),
            (GgmlType::Q4_1, size_of::<BlockQ4_1>()),
            (GgmlType::Q5_0, size_of::<BlockQ5_0>()),
            (GgmlType::Q5_1, size_of::<BlockQ5_1>()),
            (GgmlType::Q8_0, size_of::<BlockQ8_0>()),
            (GgmlType::Q8_1, size_of::<BlockQ8_1>()),
            (GgmlType::Q2_K, size_of::<BlockQ2K>()),
            (GgmlType::Q3_K, size_of::<BlockQ3K>()),
            (GgmlType::Q4_K, size_of::<BlockQ4K>()),
            (GgmlType::Q5_K, size_of::<BlockQ5K>()),
            (GgmlType::Q6_K, size_of::<BlockQ6K>()),
            (GgmlType::Q8_K, size_of::<BlockQ8K>()),
        ];
        for (ty, size) in sizes {
            assert_eq!(size, ty.type_size(), "{ty}");
        }
    }
}
