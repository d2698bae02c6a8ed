// ggml's formats as sequences of values: for each, the 8 values that start
// at a multiple of 8, as f32. Shared by the whole-tensor dequantization
// (dequantize.cu, bit-exact with the CPU) and the kernels that multiply
// straight from the GGUF blocks (matvec.cu).
//
// Each product and sum is an explicit IEEE operation (__fmul_rn, __fadd_rn,
// __fsub_rn) in the CPU reference's order, so the values are the CPU's bit
// for bit whatever the including module's --fmad setting.
#pragma once

#include "common.cuh"

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
    static __device__ __forceinline__ float from_bits(u16 h) { return f16_bits_to_f32(h); }
};

struct FormatBF16 {
    static constexpr int block_values = 1;
    static constexpr int block_bytes = 2;
    static __device__ __forceinline__ float value(const u8 *src, u64 i) {
        return from_bits(load_u16(src + 2 * i));
    }
    static __device__ __forceinline__ float from_bits(u16 h) { return __uint_as_float((u32)h << 16); }
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

// ---- any format: 8 values of a row -------------------------------------------

// Values first..first+8 of a row that starts at `row` (first a multiple of 8;
// a block format's rows are whole blocks). f32 and f16 rows are read 16 bytes
// at a time: rows of those types must then start 16-byte aligned, which a
// tensor at a 256-byte boundary with a multiple of 8 values per row does.
template <typename Format>
__device__ __forceinline__ void row_values8(const u8 *row, u32 first, float out[8]) {
    if constexpr (Format::block_values == 1) {
        if constexpr (Format::block_bytes == 4) {
            const float4 a = *reinterpret_cast<const float4 *>(row + 4 * (u64)first);
            const float4 b = *reinterpret_cast<const float4 *>(row + 4 * (u64)first + 16);
            out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
            out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
        } else {
            const uint4 packed = *reinterpret_cast<const uint4 *>(row + 2 * (u64)first);
            const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                out[2 * k] = Format::from_bits((u16)(words[k] & 0xffffu));
                out[2 * k + 1] = Format::from_bits((u16)(words[k] >> 16));
            }
        }
    } else {
        typedef typename Format::block block;
        const block *b = reinterpret_cast<const block *>(row) + first / Format::block_values;
        Format::dequantize8(b, (int)(first % Format::block_values), out);
    }
}
