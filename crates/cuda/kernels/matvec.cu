// The kernels that read weights in their GGUF format: matrix products with
// a few activation rows (decode), and embedding-row lookup.
//
// matvec: y[t][r] (+)= sum_c W[r][c] * x[t][c] for rows r and token rows t.
// One warp per weight row: lane l dequantizes values 8l..8l+8 of each
// 256-value stretch of the row (for the K-quants, one super-block per warp
// step; the block's scales are read by every lane from the same bytes) and
// multiplies them with up to TOKENS activation rows at once, so each weight
// is read from memory once per launch. Activations are f32, accumulation is
// f32; the weights' values are exactly the CPU's (formats.cuh).
#include "common.cuh"
#include "formats.cuh"
#include "warp.cuh"
#include "activation.cuh"

#define MATVEC_WARPS 4  // weight rows per block

// Long rows (the FFN's down projection) are split over all MATVEC_WARPS warps
// of a block (warps_per_row = MATVEC_WARPS, one row per block), so that a
// decode step's few rows still keep many warps busy; short rows take one warp.
template <typename Format, int TOKENS>
__device__ __forceinline__ void matvec(const u8 *__restrict__ w, u64 row_bytes, u32 rows, u32 cols,
                                       const float *__restrict__ x, u32 n_tokens, float *__restrict__ y,
                                       u32 ldy, u32 accumulate, u32 warps_per_row) {
    __shared__ float partial[MATVEC_WARPS][TOKENS];
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 r = blockIdx.x * (MATVEC_WARPS / warps_per_row) + warp / warps_per_row;
    const u32 part = warp % warps_per_row;
    // With warps_per_row > 1 the grid has exactly `rows` blocks, so no block
    // that reaches the barrier below returns here.
    if (r >= rows) return;
    // This block's token rows: TOKENS of them from blockIdx.y * TOKENS on.
    const u32 t0 = blockIdx.y * TOKENS;
    const u32 nt = min((u32)TOKENS, n_tokens - t0);
    x += (u64)t0 * cols;
    y += (u64)t0 * ldy;
    const u8 *row = w + (u64)r * row_bytes;
    float acc[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[t] = 0.0f;
#define MATVEC_STEP(first)                                                                             \
    {                                                                                                  \
        float v[8];                                                                                    \
        row_values8<Format>(row, first, v);                                                            \
        _Pragma("unroll") for (int t = 0; t < TOKENS; ++t) {                                          \
            if (t < nt) {                                                                              \
                const float4 a = *reinterpret_cast<const float4 *>(x + (u64)t * cols + first);        \
                const float4 b = *reinterpret_cast<const float4 *>(x + (u64)t * cols + first + 4);    \
                acc[t] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + \
                          v[6] * b.z + v[7] * b.w;                                                    \
            }                                                                                          \
        }                                                                                              \
    }
    const u32 start = (part * WARP_SIZE + lane) * 8, stride = warps_per_row * WARP_SIZE * 8;
    if constexpr (TOKENS == 1) {
        // Unrolled so that several stretches' loads are in flight at once: a
        // decode step is a chain of small products, each bound by its latency.
#pragma unroll 4
        for (u32 first = start; first < cols; first += stride) MATVEC_STEP(first)
    } else {
        // Eight tokens' accumulators: unrolling spills.
#pragma unroll 1
        for (u32 first = start; first < cols; first += stride) MATVEC_STEP(first)
    }
#undef MATVEC_STEP
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[t] = warp_sum(acc[t]);
    if (warps_per_row > 1) {
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) partial[warp][t] = acc[t];
        }
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
            acc[t] = 0.0f;
            for (u32 p = 0; p < warps_per_row; ++p) acc[t] += partial[p][t];
        }
    }
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        if (lane == 0 && t < nt) {
            float *out = y + (u64)t * ldy + r;
            *out = accumulate ? *out + acc[t] : acc[t];
        }
    }
}

// The FFN's first half in one pass: y[t][r] = act(gate[r]·x[t]) * (up[r]·x[t]),
// gate and up of one format and shape, each warp taking row r of both.
template <typename Format, int TOKENS, bool GELU>
__device__ __forceinline__ void matvec_gated(const u8 *__restrict__ gate, const u8 *__restrict__ up, u64 row_bytes,
                                             u32 rows, u32 cols, const float *__restrict__ x, u32 n_tokens,
                                             float *__restrict__ y) {
    const u32 lane = threadIdx.x % WARP_SIZE;
    const u32 r = blockIdx.x * MATVEC_WARPS + threadIdx.x / WARP_SIZE;
    if (r >= rows) return;
    const u32 t0 = blockIdx.y * TOKENS;
    const u32 nt = min((u32)TOKENS, n_tokens - t0);
    x += (u64)t0 * cols;
    y += (u64)t0 * rows;
    const u8 *gate_row = gate + (u64)r * row_bytes;
    const u8 *up_row = up + (u64)r * row_bytes;
    float acc_gate[TOKENS], acc_up[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc_gate[t] = acc_up[t] = 0.0f;
    // One stretch of 8 values of both rows (a macro, not a lambda: the
    // lambda's captured arrays went to the stack).
#define GATED_STEP(first)                                                                              \
    {                                                                                                  \
        float g[8], u[8];                                                                              \
        row_values8<Format>(gate_row, first, g);                                                       \
        row_values8<Format>(up_row, first, u);                                                         \
        _Pragma("unroll") for (int t = 0; t < TOKENS; ++t) {                                          \
            if (t < nt) {                                                                              \
                const float4 a = *reinterpret_cast<const float4 *>(x + (u64)t * cols + first);        \
                const float4 b = *reinterpret_cast<const float4 *>(x + (u64)t * cols + first + 4);    \
                acc_gate[t] += g[0] * a.x + g[1] * a.y + g[2] * a.z + g[3] * a.w + g[4] * b.x +        \
                               g[5] * b.y + g[6] * b.z + g[7] * b.w;                                  \
                acc_up[t] += u[0] * a.x + u[1] * a.y + u[2] * a.z + u[3] * a.w + u[4] * b.x +          \
                             u[5] * b.y + u[6] * b.z + u[7] * b.w;                                    \
            }                                                                                          \
        }                                                                                              \
    }
    if constexpr (TOKENS == 1) {
        // A decode step: unrolled, so that several stretches' loads are in
        // flight (twice two rows; 4 spills for some formats).
#pragma unroll 2
        for (u32 first = lane * 8; first < cols; first += WARP_SIZE * 8) GATED_STEP(first)
    } else {
        // Two rows of eight tokens' accumulators: unrolling further spills.
#pragma unroll 1
        for (u32 first = lane * 8; first < cols; first += WARP_SIZE * 8) GATED_STEP(first)
    }
#undef GATED_STEP
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        const float g_sum = warp_sum(acc_gate[t]);
        const float u_sum = warp_sum(acc_up[t]);
        if (lane == 0 && t < nt) {
            y[(u64)t * rows + r] = GELU ? gelu_tanh_times(g_sum, u_sum) : silu_times(g_sum, u_sum);
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

#define MATVEC_GATED_KERNEL(name, Format, act, gelu, tokens)                                                   \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE) matvec_gated_##act##_##name##_##tokens( \
        const u8 *gate, const u8 *up, u64 row_bytes, u32 rows, u32 cols, const float *x, u32 n_tokens, float *y) { \
        matvec_gated<Format, tokens, gelu>(gate, up, row_bytes, rows, cols, x, n_tokens, y);                  \
    }

#define MATVEC_KERNELS(name, Format)                                                                          \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE) matvec_##name##_1(                  \
        const u8 *w, u64 row_bytes, u32 rows, u32 cols, const float *x, u32 n_tokens, float *y, u32 ldy,        \
        u32 accumulate, u32 warps_per_row) {                                                                  \
        matvec<Format, 1>(w, row_bytes, rows, cols, x, n_tokens, y, ldy, accumulate, warps_per_row);          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE) matvec_##name##_8(                  \
        const u8 *w, u64 row_bytes, u32 rows, u32 cols, const float *x, u32 n_tokens, float *y, u32 ldy,        \
        u32 accumulate, u32 warps_per_row) {                                                                  \
        matvec<Format, 8>(w, row_bytes, rows, cols, x, n_tokens, y, ldy, accumulate, warps_per_row);          \
    }                                                                                                         \
    MATVEC_GATED_KERNEL(name, Format, silu, false, 1)                                                          \
    MATVEC_GATED_KERNEL(name, Format, silu, false, 8)                                                          \
    MATVEC_GATED_KERNEL(name, Format, gelu, true, 1)                                                           \
    MATVEC_GATED_KERNEL(name, Format, gelu, true, 8)                                                           \
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
