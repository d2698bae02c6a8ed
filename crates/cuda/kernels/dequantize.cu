// Dequantization of whole tensors to f16 or bf16, for every format the quant
// crate dequantizes: the `--weights f16` load path and the cross-check of the
// fused kernels.
//
// Bit-exact with the CPU reference: `quant::dequantize` (gguf-py's numpy
// code, operation by operation) followed by one round-to-nearest-even
// conversion. So every product and sum is an explicit IEEE operation
// (__fmul_rn, __fadd_rn, __fsub_rn: never contracted into an FMA) in the
// CPU's order, and the module is also compiled with --fmad=false.
//
// Each thread writes 8 consecutive values (one 16-byte store): they lie in
// one sub-block of every block format, so their scales are computed once.
#include "common.cuh"
#include "formats.cuh"

#define VALUES_PER_THREAD 8

// ---- output types ------------------------------------------------------------

struct ToF16 {
    static __device__ __forceinline__ u16 convert(float x) { return f32_to_f16_bits(x); }
};

struct ToBF16 {
    static __device__ __forceinline__ u16 convert(float x) { return f32_to_bf16_bits(x); }
};

// ---- drivers -----------------------------------------------------------------

template <typename Out>
__device__ __forceinline__ void store8(u16 *dst, const float values[8], bool aligned) {
    u16 h[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) h[k] = Out::convert(values[k]);
    if (aligned) {
        uint4 packed;
        packed.x = (u32)h[0] | ((u32)h[1] << 16);
        packed.y = (u32)h[2] | ((u32)h[3] << 16);
        packed.z = (u32)h[4] | ((u32)h[5] << 16);
        packed.w = (u32)h[6] | ((u32)h[7] << 16);
        *reinterpret_cast<uint4 *>(dst) = packed;
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) dst[k] = h[k];
    }
}

// Block formats: n_values is a whole number of blocks.
template <typename Format, typename Out>
__device__ __forceinline__ void dequantize_blocks(const u8 *__restrict__ src, u16 *__restrict__ dst, u64 n_values) {
    typedef typename Format::block block;
    const bool aligned = (reinterpret_cast<size_t>(dst) & 15) == 0;
    const u64 n_groups = n_values / VALUES_PER_THREAD;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < n_groups; g += stride) {
        const u64 first = g * VALUES_PER_THREAD;
        const block *b = reinterpret_cast<const block *>(src) + first / Format::block_values;
        float values[8];
        Format::dequantize8(b, (int)(first % Format::block_values), values);
        store8<Out>(dst + first, values, aligned);
    }
}

// Plain float formats: any n_values.
template <typename Format, typename Out>
__device__ __forceinline__ void dequantize_scalars(const u8 *__restrict__ src, u16 *__restrict__ dst, u64 n_values) {
    const bool aligned = (reinterpret_cast<size_t>(dst) & 15) == 0;
    const u64 n_groups = (n_values + VALUES_PER_THREAD - 1) / VALUES_PER_THREAD;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x; g < n_groups; g += stride) {
        const u64 first = g * VALUES_PER_THREAD;
        if (first + VALUES_PER_THREAD <= n_values) {
            float values[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) values[k] = Format::value(src, first + k);
            store8<Out>(dst + first, values, aligned);
        } else {
            for (u64 i = first; i < n_values; ++i) dst[i] = Out::convert(Format::value(src, i));
        }
    }
}

#define DEQUANTIZE_KERNEL(name, driver, Format, out_name, Out)                                         \
    extern "C" __global__ void dequantize_##name##_##out_name(const u8 *__restrict__ src,              \
                                                              u16 *__restrict__ dst, u64 n_values) {   \
        driver<Format, Out>(src, dst, n_values);                                                       \
    }

#define DEQUANTIZE_KERNELS(name, driver, Format)           \
    DEQUANTIZE_KERNEL(name, driver, Format, f16, ToF16)    \
    DEQUANTIZE_KERNEL(name, driver, Format, bf16, ToBF16)

DEQUANTIZE_KERNELS(f32, dequantize_scalars, FormatF32)
DEQUANTIZE_KERNELS(f16, dequantize_scalars, FormatF16)
DEQUANTIZE_KERNELS(bf16, dequantize_scalars, FormatBF16)
DEQUANTIZE_KERNELS(q4_0, dequantize_blocks, FormatQ4_0)
DEQUANTIZE_KERNELS(q4_1, dequantize_blocks, FormatQ4_1)
DEQUANTIZE_KERNELS(q5_0, dequantize_blocks, FormatQ5_0)
DEQUANTIZE_KERNELS(q5_1, dequantize_blocks, FormatQ5_1)
DEQUANTIZE_KERNELS(q8_0, dequantize_blocks, FormatQ8_0)
DEQUANTIZE_KERNELS(q8_1, dequantize_blocks, FormatQ8_1)
DEQUANTIZE_KERNELS(q2_k, dequantize_blocks, FormatQ2_K)
DEQUANTIZE_KERNELS(q3_k, dequantize_blocks, FormatQ3_K)
DEQUANTIZE_KERNELS(q4_k, dequantize_blocks, FormatQ4_K)
DEQUANTIZE_KERNELS(q5_k, dequantize_blocks, FormatQ5_K)
DEQUANTIZE_KERNELS(q6_k, dequantize_blocks, FormatQ6_K)
DEQUANTIZE_KERNELS(q8_k, dequantize_blocks, FormatQ8_K)
