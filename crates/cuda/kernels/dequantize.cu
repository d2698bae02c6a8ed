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

#define VALUES_PER_THREAD 8

// ---- per format: the 8 values starting at value `first` of one block ------

struct FormatF32 {
    static constexpr int block_values = 1;
    static constexpr int block_bytes = 4;
    static __device__ __forceinline__ float value(const u8 *src, u64 i) { return load_f32(src + 4 * i); }
};

struct FormatF16 {
    static constexpr int block_values = 1;
    static constexpr int block_bytes = 2;
    static __device__ __forceinline__ float value(const u8 *src, u64 i) { return load_f16(src + 2 * i); }
};

struct FormatBF16 {
    static constexpr int block_values = 1;
    static constexpr int block_bytes = 2;
    static __device__ __forceinline__ float value(const u8 *src, u64 i) {
        return __uint_as_float((u32)load_u16(src + 2 * i) << 16);
    }
};

struct FormatQ4_0 {
    typedef block_q4_0 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
        const int shift = first >= QK_LEGACY / 2 ? 4 : 0;
        const u8 *qs = b->qs + first % (QK_LEGACY / 2);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (qs[k] >> shift) & 0x0f;
            out[k] = __fmul_rn(d, (float)(q - 8));
        }
    }
};

struct FormatQ4_1 {
    typedef block_q4_1 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
        const float m = load_f16(b->m);
        const int shift = first >= QK_LEGACY / 2 ? 4 : 0;
        const u8 *qs = b->qs + first % (QK_LEGACY / 2);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (qs[k] >> shift) & 0x0f;
            out[k] = __fadd_rn(__fmul_rn(d, (float)q), m);
        }
    }
};

// 5-bit quant of value j of a Q5_0/Q5_1 block.
__device__ __forceinline__ int q5_quant(const u8 *qs, u32 qh, int j) {
    const int shift = j >= QK_LEGACY / 2 ? 4 : 0;
    const int low = (qs[j % (QK_LEGACY / 2)] >> shift) & 0x0f;
    return low | (int)(((qh >> j) & 1u) << 4);
}

struct FormatQ5_0 {
    typedef block_q5_0 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
        const u32 qh = load_u32(b->qh);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            out[k] = __fmul_rn(d, (float)(q5_quant(b->qs, qh, first + k) - 16));
        }
    }
};

struct FormatQ5_1 {
    typedef block_q5_1 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
        const float m = load_f16(b->m);
        const u32 qh = load_u32(b->qh);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            out[k] = __fadd_rn(__fmul_rn(d, (float)q5_quant(b->qs, qh, first + k)), m);
        }
    }
};

struct FormatQ8_0 {
    typedef block_q8_0 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            out[k] = __fmul_rn((float)b->qs[first + k], d);
        }
    }
};

struct FormatQ8_1 {
    typedef block_q8_1 block;
    static constexpr int block_values = QK_LEGACY;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f16(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            out[k] = __fmul_rn((float)b->qs[first + k], d);
        }
    }
};

// Value v = 128h + 32s + l of Q2_K/Q3_K: sub-block (group) v / 16, bits 2s of
// byte 32h + l of qs.
struct FormatQ2_K {
    typedef block_q2_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const int group = first / 16;
        const int h = group / 8, s = (group / 2) % 4, half = group % 2;
        const u8 sc = b->scales[group];
        const float dl = __fmul_rn(load_f16(b->d), (float)(sc & 0x0f));
        const float ml = __fmul_rn(load_f16(b->dmin), (float)(sc >> 4));
        const u8 *qs = b->qs + 32 * h + 16 * half + first % 16;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (qs[k] >> (2 * s)) & 3;
            out[k] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
        }
    }
};

struct FormatQ3_K {
    typedef block_q3_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const int group = first / 16;
        const int h = group / 8, s = (group / 2) % 4, half = group % 2;
        const int low_bits = (b->scales[group % 8] >> (4 * (group / 8))) & 0x0f;
        const int high_bits = (b->scales[8 + group % 4] >> (2 * (group / 4))) & 3;
        const int scale = (low_bits | (high_bits << 4)) - 32;
        const float dl = __fmul_rn(load_f16(b->d), (float)scale);
        const int bit = 4 * h + s;
        const u8 *qs = b->qs + 32 * h + 16 * half + first % 16;
        const u8 *hmask = b->hmask + 16 * half + first % 16;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int low = (qs[k] >> (2 * s)) & 3;
            const int missing_high = ((hmask[k] >> bit) & 1) ^ 1;
            out[k] = __fmul_rn(dl, (float)(low - (missing_high << 2)));
        }
    }
};

// Scale and min of sub-block j (0..8) of a Q4_K/Q5_K block.
__device__ __forceinline__ void scale_min_k4(int j, const u8 *scales, int *sc, int *m) {
    if (j < 4) {
        *sc = scales[j] & 63;
        *m = scales[j + 4] & 63;
    } else {
        *sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        *m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

// Value v = 64c + 32n + l of Q4_K/Q5_K: sub-block 2c + n, nibble n of byte
// 32c + l of qs (and for Q5_K bit 2c + n of byte l of qh).
struct FormatQ4_K {
    typedef block_q4_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const int chunk = first / 64, n = (first / 32) % 2, l = first % 32;
        int sc, m;
        scale_min_k4(2 * chunk + n, b->scales, &sc, &m);
        const float dl = __fmul_rn(load_f16(b->d), (float)sc);
        const float ml = __fmul_rn(load_f16(b->dmin), (float)m);
        const u8 *qs = b->qs + 32 * chunk + l;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (qs[k] >> (4 * n)) & 0x0f;
            out[k] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
        }
    }
};

struct FormatQ5_K {
    typedef block_q5_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const int chunk = first / 64, n = (first / 32) % 2, l = first % 32;
        const int sub = 2 * chunk + n;
        int sc, m;
        scale_min_k4(sub, b->scales, &sc, &m);
        const float dl = __fmul_rn(load_f16(b->d), (float)sc);
        const float ml = __fmul_rn(load_f16(b->dmin), (float)m);
        const u8 *qs = b->qs + 32 * chunk + l;
        const u8 *qh = b->qh + l;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = ((qs[k] >> (4 * n)) & 0x0f) | (((qh[k] >> sub) & 1) << 4);
            out[k] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
        }
    }
};

// Value v = 128h + 32n + l of Q6_K: low nibble from byte 64h + 32(n % 2) + l
// of ql (nibble n / 2), high bits 2n of byte 32h + l of qh, scale of
// sub-block 8h + 2n + l / 16.
struct FormatQ6_K {
    typedef block_q6_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const int h = first / 128, n = (first / 32) % 4, l = first % 32;
        const float dl = __fmul_rn(load_f16(b->d), (float)b->scales[8 * h + 2 * n + l / 16]);
        const u8 *ql = b->ql + 64 * h + 32 * (n % 2) + l;
        const u8 *qh = b->qh + 32 * h + l;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int low = (ql[k] >> (4 * (n / 2))) & 0x0f;
            const int high = (qh[k] >> (2 * n)) & 3;
            out[k] = __fmul_rn(dl, (float)((low | (high << 4)) - 32));
        }
    }
};

struct FormatQ8_K {
    typedef block_q8_k block;
    static constexpr int block_values = QK_K;
    static __device__ __forceinline__ void dequantize8(const block *b, int first, float out[8]) {
        const float d = load_f32(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            out[k] = __fmul_rn(d, (float)b->qs[first + k]);
        }
    }
};

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
