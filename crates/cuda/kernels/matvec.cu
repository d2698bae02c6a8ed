// The kernels that read weights in their GGUF format: matrix products with
// a few activation rows (decode), and embedding-row lookup.
//
// matvec: y[t][r] (+)= sum_c W[r][c] * x[t][c] for rows r and token rows t,
// where W may be up to three matrices of one format and width stacked (Q, K
// and V: one launch), and x may be normalized on the way in (RMSNorm fused:
// y = rstd(x[t]) * sum_c W[r][c] * x[t][c] * norm[c]). One warp per weight
// row (long rows: several warps of a block), each lane 8 values of every
// 256, so that a warp reads adjacent bytes; every weight byte is read from
// memory once per launch. Activations are f32,
// accumulation is f32; the weights' values are exactly the CPU's
// (formats.cuh).
#include "common.cuh"
#include "formats.cuh"
#include "warp.cuh"
#include "activation.cuh"

#define MATVEC_WARPS 4  // weight rows per block (one row per block for long rows)
#define MATVEC_MAX_SEGMENTS 3

// sum_i v[i] * x[i] (* norm[i]) over 8 values; with `norm` and `count`, also
// adds sum_i x[i]^2 to `sq` (the warp sees every input value once, so it
// gets RMSNorm's sum of squares from the loads it makes anyway).
__device__ __forceinline__ float dot8(const float v[8], const float *__restrict__ x, const float *__restrict__ norm,
                                      bool count, float &sq) {
    float4 a = *reinterpret_cast<const float4 *>(x);
    float4 b = *reinterpret_cast<const float4 *>(x + 4);
    if (norm) {
        if (count) sq += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
        const float4 wa = *reinterpret_cast<const float4 *>(norm);
        const float4 wb = *reinterpret_cast<const float4 *>(norm + 4);
        a.x *= wa.x; a.y *= wa.y; a.z *= wa.z; a.w *= wa.w;
        b.x *= wb.x; b.y *= wb.y; b.z *= wb.z; b.w *= wb.w;
    }
    return v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
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
    constexpr int SUMS = GATED ? 2 : 1;
    // Per warp: each sum's partial dot products, then the sums of squares.
    __shared__ float partial[MATVEC_WARPS][TOKENS * (SUMS + 1)];
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
    float acc[SUMS][TOKENS], sq[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) sq[t] = 0.0f;
#pragma unroll
    for (int g = 0; g < SUMS; ++g)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[g][t] = 0.0f;
    if (active) {
        const u8 *row_at[SUMS];
        row_at[0] = w + (u64)r * row_bytes;
        if (GATED) row_at[SUMS - 1] = s.w1 + (u64)r * row_bytes;
        // Lane l takes values 8l..8l+8 of each 256-value stretch (of each
        // warp's share of a long row): a warp's loads of one stretch are
        // adjacent bytes.
        const u32 start = (part * WARP_SIZE + lane) * 8, stride = warps_per_row * WARP_SIZE * 8;
#define MATVEC_STEP(first)                                                                             \
    _Pragma("unroll") for (int g = 0; g < SUMS; ++g) {                                                 \
        float v[8];                                                                                    \
        row_values8<Format>(row_at[g], first, v);                                                      \
        _Pragma("unroll") for (int t = 0; t < TOKENS; ++t) {                                           \
            if (t < nt) acc[g][t] += dot8(v, x + (u64)t * cols + (first), norm ? norm + (first) : nullptr, g == 0, sq[t]); \
        }                                                                                              \
    }
        if constexpr (TOKENS == 1 && !GATED) {
            // Unrolled so that several stretches' loads are in flight at
            // once: a decode step is a chain of small products, each bound
            // by its latency.
#pragma unroll 4
            for (u32 first = start; first < cols; first += stride) MATVEC_STEP(first)
        } else if constexpr (TOKENS == 1) {
#pragma unroll 2
            for (u32 first = start; first < cols; first += stride) MATVEC_STEP(first)
        } else {
            // Eight tokens' accumulators: unrolling spills.
#pragma unroll 1
            for (u32 first = start; first < cols; first += stride) MATVEC_STEP(first)
        }
#undef MATVEC_STEP
    }
#pragma unroll
    for (int g = 0; g < SUMS; ++g)
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) acc[g][t] = warp_sum(acc[g][t]);
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) sq[t] = norm ? warp_sum(sq[t]) : 0.0f;
    if (warps_per_row > 1) {
        if (lane == 0) {
#pragma unroll
            for (int g = 0; g < SUMS; ++g)
#pragma unroll
                for (int t = 0; t < TOKENS; ++t) partial[warp][g * TOKENS + t] = acc[g][t];
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) partial[warp][SUMS * TOKENS + t] = sq[t];
        }
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int g = 0; g <= SUMS; ++g)
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) {
                float sum = 0.0f;
                for (u32 p = 0; p < warps_per_row; ++p) sum += partial[p][g * TOKENS + t];
                if (g < SUMS) acc[g][t] = sum;
                else sq[t] = sum;
            }
    }
    float rstd[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) rstd[t] = norm ? 1.0f / sqrtf(sq[t] / (float)cols + eps) : 1.0f;
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
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE, 1)      \
        matvec_##suffix##name##_##tokens(                                                                     \
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
