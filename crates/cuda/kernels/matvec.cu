// The kernels that read weights in their GGUF format: matrix products with
// a few activation rows (decode), and embedding-row lookup.
//
// matvec: y[t][r] (+)= sum_c W[r][c] * x[t][c] for rows r and token rows t,
// where W may be up to three matrices of one format and width stacked (Q, K
// and V: one launch), and x may be normalized on the way in (RMSNorm fused:
// y = rstd(x[t]) * sum_c W[r][c] * x[t][c] * norm[c]). One warp per weight
// row (long rows: several warps of a block); each lane takes whole stretches
// of 32 values, so a legacy block (32 values) is read by one lane with a few
// 2-byte loads and a K-quant sub-block with 16-byte loads, and every weight
// byte is read from memory once per launch. Activations are f32,
// accumulation is f32; the weights' values are exactly the CPU's
// (formats.cuh).
#include "common.cuh"
#include "formats.cuh"
#include "warp.cuh"
#include "activation.cuh"

#define MATVEC_WARPS 4  // weight rows per block (one row per block for long rows)
#define MATVEC_MAX_SEGMENTS 3

// Values first..first+32 of a row (first a multiple of 32).
template <typename Format>
__device__ __forceinline__ void row_values32(const u8 *__restrict__ row, u32 first, float out[32]) {
    if constexpr (Format::block_values == QK_LEGACY) {
        // The whole block into registers with 2-byte loads (legacy blocks are
        // only 2-byte aligned), decoded there by the exact decoders.
        typedef typename Format::block block;
        static_assert(sizeof(block) % 2 == 0, "legacy blocks are whole 2-byte words");
        union {
            block b;
            u16 h[sizeof(block) / 2];
        } local;
        const u16 *src = reinterpret_cast<const u16 *>(row + (u64)(first / QK_LEGACY) * sizeof(block));
#pragma unroll
        for (int i = 0; i < (int)(sizeof(block) / 2); ++i) local.h[i] = src[i];
#pragma unroll
        for (int k = 0; k < 4; ++k) Format::dequantize8(&local.b, 8 * k, out + 8 * k);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) row_values8<Format>(row, first + 8 * k, out + 8 * k);
    }
}

// Q4_K: sub-block j of 32 values is nibble j % 2 of the 32 bytes 32 (j / 2)..
// of qs, read as two 16-byte loads (blocks are 144 bytes, rows 256-byte
// aligned), with scale and min from scale_min_k4.
template <>
__device__ __forceinline__ void row_values32<FormatQ4_K>(const u8 *__restrict__ row, u32 first, float out[32]) {
    const block_q4_k *b = reinterpret_cast<const block_q4_k *>(row) + first / QK_K;
    const int j = (first % QK_K) / 32, n = j % 2;
    int sc, m;
    scale_min_k4(j, b->scales, &sc, &m);
    const u32 dd = *reinterpret_cast<const u32 *>(b->d);
    const float dl = __fmul_rn(f16_bits_to_f32((u16)(dd & 0xffffu)), (float)sc);
    const float ml = __fmul_rn(f16_bits_to_f32((u16)(dd >> 16)), (float)m);
    const uint4 *qs = reinterpret_cast<const uint4 *>(b->qs + 32 * (j / 2));
    const uint4 lo = qs[0], hi = qs[1];
    const u32 words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const int q = (words[k / 4] >> (8 * (k % 4) + 4 * n)) & 0x0f;
        out[k] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
    }
}

// Q6_K: values 128h + 32n + l (l < 32) from ql bytes 64h + 32(n % 2) + l
// (nibble n / 2) and qh bytes 32h + l (bits 2n), with the scales of
// sub-blocks 8h + 2n and 8h + 2n + 1; 2-byte loads (blocks are 210 bytes).
template <>
__device__ __forceinline__ void row_values32<FormatQ6_K>(const u8 *__restrict__ row, u32 first, float out[32]) {
    const block_q6_k *b = reinterpret_cast<const block_q6_k *>(row) + first / QK_K;
    const int v = first % QK_K, h = v / 128, n = (v / 32) % 4;
    const float d = f16_bits_to_f32(*reinterpret_cast<const u16 *>(b->d));
    const float dl0 = __fmul_rn(d, (float)b->scales[8 * h + 2 * n]);
    const float dl1 = __fmul_rn(d, (float)b->scales[8 * h + 2 * n + 1]);
    const u16 *ql = reinterpret_cast<const u16 *>(b->ql + 64 * h + 32 * (n % 2));
    const u16 *qh = reinterpret_cast<const u16 *>(b->qh + 32 * h);
    u16 low[16], high[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        low[i] = ql[i];
        high[i] = qh[i];
    }
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const int lo = (low[k / 2] >> (8 * (k % 2) + 4 * (n / 2))) & 0x0f;
        const int hi = (high[k / 2] >> (8 * (k % 2) + 2 * n)) & 3;
        out[k] = __fmul_rn(k < 16 ? dl0 : dl1, (float)((lo | (hi << 4)) - 32));
    }
}

// sum_k v[k] * x[k] (* norm[k]) over 32 values.
__device__ __forceinline__ float dot32(const float v[32], const float *__restrict__ x, const float *__restrict__ norm) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 32; k += 4) {
        float4 a = *reinterpret_cast<const float4 *>(x + k);
        if (norm) {
            const float4 w = *reinterpret_cast<const float4 *>(norm + k);
            a.x *= w.x; a.y *= w.y; a.z *= w.z; a.w *= w.w;
        }
        acc += v[k] * a.x + v[k + 1] * a.y + v[k + 2] * a.z + v[k + 3] * a.w;
    }
    return acc;
}

// 1 / sqrt(mean(x[t]^2) + eps) for the block's token rows into rstd[]
// (every thread of the block calls this; 1 for every row without `norm`).
template <int TOKENS>
__device__ __forceinline__ void row_scales(const float *__restrict__ x, u32 cols, u32 nt, const float *norm, float eps,
                                           float rstd[TOKENS], float (*scratch)[TOKENS]) {
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (!norm) {
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) rstd[t] = 1.0f;
        return;
    }
    __syncthreads();  // scratch may still be read by an earlier reduction
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        float sum = 0.0f;
        if (t < nt) {
            for (u32 c = threadIdx.x; c < cols; c += blockDim.x) sum += x[(u64)t * cols + c] * x[(u64)t * cols + c];
        }
        sum = warp_sum(sum);
        if (lane == 0) scratch[warp][t] = sum;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        float sum = 0.0f;
        for (u32 w = 0; w < MATVEC_WARPS; ++w) sum += scratch[w][t];
        rstd[t] = 1.0f / sqrtf(sum / (float)cols + eps);
    }
}

// Up to MATVEC_MAX_SEGMENTS matrices stacked (scalars, not arrays: an array
// indexed at run time would live in local memory).
struct Segments {
    const u8 *w0, *w1, *w2;
    float *y0, *y1, *y2;
    u32 rows0, rows1, rows2;
    u32 ldy0, ldy1, ldy2;
};

// GATED: 0 for a plain product; 1 (SiLU) or 2 (GELU-tanh) for the FFN's
// first half, y[t][r] = act(gate[r]·x[t]) * (up[r]·x[t]) with gate and up as
// segments 0 and 1 (rows[0] rows each, written to y[0]).
template <typename Format, int TOKENS, int GATED>
__device__ __forceinline__ void matvec(const Segments &s, u64 row_bytes, u32 cols, const float *__restrict__ x,
                                       u32 n_tokens, const float *__restrict__ norm, float eps, u32 accumulate,
                                       u32 warps_per_row) {
    __shared__ float partial[MATVEC_WARPS][TOKENS * (GATED ? 2 : 1)];
    __shared__ float scratch[MATVEC_WARPS][TOKENS];
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 part = warp % warps_per_row;
    // This warp's row of the stacked segments (gated: of gate and up alike).
    u32 r = blockIdx.x * (MATVEC_WARPS / warps_per_row) + warp / warps_per_row;
    const u8 *w = s.w0;
    float *y = s.y0;
    u32 rows = s.rows0, ldy = s.ldy0;
    if (!GATED && r >= s.rows0) {
        r -= s.rows0;
        w = s.w1, y = s.y1, rows = s.rows1, ldy = s.ldy1;
        if (r >= s.rows1) {
            r -= s.rows1;
            w = s.w2, y = s.y2, rows = s.rows2, ldy = s.ldy2;
        }
    }
    const bool active = r < rows;
    const u32 t0 = blockIdx.y * TOKENS;
    const u32 nt = min((u32)TOKENS, n_tokens - t0);
    x += (u64)t0 * cols;
    constexpr int SUMS = GATED ? 2 : 1;
    float acc[SUMS][TOKENS];
#pragma unroll
    for (int g = 0; g < SUMS; ++g)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[g][t] = 0.0f;
    if (active) {
        const u8 *row_at[SUMS];
        row_at[0] = w + (u64)r * row_bytes;
        if (GATED) row_at[SUMS - 1] = s.w1 + (u64)r * row_bytes;
        const u32 stride = warps_per_row * WARP_SIZE * 32;
#pragma unroll 1
        for (u32 first = (part * WARP_SIZE + lane) * 32; first < cols; first += stride) {
#pragma unroll
            for (int g = 0; g < SUMS; ++g) {
                float v[32];
                row_values32<Format>(row_at[g], first, v);
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) {
                    if (t < nt) acc[g][t] += dot32(v, x + (u64)t * cols + first, norm ? norm + first : nullptr);
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < SUMS; ++g)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[g][t] = warp_sum(acc[g][t]);
    float rstd[TOKENS];
    row_scales<TOKENS>(x, cols, nt, norm, eps, rstd, scratch);
    if (warps_per_row > 1) {
        if (lane == 0) {
#pragma unroll
            for (int g = 0; g < SUMS; ++g)
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) partial[warp][g * TOKENS + t] = acc[g][t];
        }
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int g = 0; g < SUMS; ++g)
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) {
                acc[g][t] = 0.0f;
                for (u32 p = 0; p < warps_per_row; ++p) acc[g][t] += partial[p][g * TOKENS + t];
            }
    }
    if (!active || lane != 0) return;
    y += (u64)t0 * ldy + r;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        if (t < nt) {
            float *out = y + (u64)t * ldy;
            if (GATED) {
                const float g = acc[0][t] * rstd[t], u = acc[SUMS - 1][t] * rstd[t];
                *out = GATED == 2 ? gelu_tanh_times(g, u) : silu_times(g, u);
            } else {
                const float v = acc[0][t] * rstd[t];
                *out = accumulate ? *out + v : v;
            }
        }
    }
}

// Rows tokens[t] of the table, times `scale`, into x[t] (n_embd = cols values each).
template <typename Format>
__device__ __forceinline__ void embed(const u8 *__restrict__ table, u64 row_bytes, u32 cols,
                                      const u32 *__restrict__ tokens, float scale, float *__restrict__ x) {
    const u32 t = blockIdx.x;
    const u8 *row = table + (u64)tokens[t] * row_bytes;
    float *out = x + (u64)t * cols;
    for (u32 first = threadIdx.x * 8; first < cols; first += blockDim.x * 8) {
        float v[8];
        row_values8<Format>(row, first, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) out[first + k] = v[k] * scale;
    }
}

// Kernel arguments: up to three (weights, rows, y, ldy) segments (unused
// ones: null, 0 rows), then the shared shape, input and options.
#define MATVEC_ARGS                                                                                            \
    const u8 *w0, const u8 *w1, const u8 *w2, u32 rows0, u32 rows1, u32 rows2, float *y0, float *y1, float *y2, \
        u32 ldy0, u32 ldy1, u32 ldy2, u64 row_bytes, u32 cols, const float *x, u32 n_tokens, const float *norm,  \
        float eps, u32 accumulate, u32 warps_per_row
#define MATVEC_SEGMENTS {w0, w1, w2, y0, y1, y2, rows0, rows1, rows2, ldy0, ldy1, ldy2}

#define MATVEC_KERNEL(name, Format, suffix, gated, tokens)                                                      \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE, 1) matvec_##suffix##name##_##tokens(    \
        MATVEC_ARGS) {                                                                                        \
        const Segments s = MATVEC_SEGMENTS;                                                                   \
        matvec<Format, tokens, gated>(s, row_bytes, cols, x, n_tokens, norm, eps, accumulate, warps_per_row); \
    }

#define MATVEC_KERNELS(name, Format)                                                                          \
    MATVEC_KERNEL(name, Format, , 0, 1)                                                                       \
    MATVEC_KERNEL(name, Format, , 0, 8)                                                                       \
    MATVEC_KERNEL(name, Format, gated_silu_, 1, 1)                                                            \
    MATVEC_KERNEL(name, Format, gated_silu_, 1, 8)                                                            \
    MATVEC_KERNEL(name, Format, gated_gelu_, 2, 1)                                                            \
    MATVEC_KERNEL(name, Format, gated_gelu_, 2, 8)                                                            \
    extern "C" __global__ void embed_##name(const u8 *table, u64 row_bytes, u32 cols, const u32 *tokens,      \
                                            float scale, float *x) {                                          \
        embed<Format>(table, row_bytes, cols, tokens, scale, x);                                              \
    }

MATVEC_KERNELS(f32, FormatF32)
MATVEC_KERNELS(f16, FormatF16)
MATVEC_KERNELS(bf16, FormatBF16)
MATVEC_KERNELS(q4_0, FormatQ4_0)
MATVEC_KERNELS(q4_1, FormatQ4_1)
MATVEC_KERNELS(q5_0, FormatQ5_0)
MATVEC_KERNELS(q5_1, FormatQ5_1)
MATVEC_KERNELS(q8_0, FormatQ8_0)
MATVEC_KERNELS(q8_1, FormatQ8_1)
MATVEC_KERNELS(q2_k, FormatQ2_K)
MATVEC_KERNELS(q3_k, FormatQ3_K)
MATVEC_KERNELS(q4_k, FormatQ4_K)
MATVEC_KERNELS(q5_k, FormatQ5_K)
MATVEC_KERNELS(q6_k, FormatQ6_K)
MATVEC_KERNELS(q8_k, FormatQ8_K)
