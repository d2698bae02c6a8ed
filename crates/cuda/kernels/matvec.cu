// The kernels that read weights in their GGUF format: matrix products with
// a few activation rows (decode), and embedding-row lookup.
//
// matvec: y[t][r] (+)= sum_c W[r][c] * x[t][c] for rows r and token rows t,
// where W may be up to three matrices of one format and width stacked (Q, K
// and V: one launch), and x may be normalized on the way in (RMSNorm fused:
// y = rstd(x[t]) * sum_c W[r][c] * x[t][c] * norm[c]). One warp per weight
// row (long rows: several warps of a block), the row first staged in shared
// memory, each lane 8 values of every 256, so that a warp reads adjacent
// bytes; every weight byte is read from memory once per launch. Activations
// and accumulation are f32; each 8 values' scale and quants are exactly the
// CPU's, the scale applied once to their dot product (formats without a
// fast form use formats.cuh's exact values).
#include "common.cuh"
#include "formats.cuh"
#include "warp.cuh"
#include "activation.cuh"

#define MATVEC_WARPS 4  // weight rows per block (one row per block for long rows)

// ---- staging: a weight row copied to shared memory 16 bytes at a time -------
//
// A warp's lanes would otherwise read a block's scale and bits byte by byte
// from global memory. Instead each row is first copied (by its warp, or by
// the whole block for a long row) with 16-byte loads, every load issued
// before any value is used, and the values are then read from shared memory.
// The copy covers the 16-byte-aligned span around the row: the row's byte i
// lands at slot byte (row & 15) + i, so every block keeps its alignment
// modulo 16. Reading the whole aligned 16 bytes around a valid byte never
// leaves its page.
__device__ __forceinline__ const u8 *stage_row(const u8 *src, u64 bytes, uint4 *slot, u32 tid, u32 n_threads) {
    const u64 at = (u64)src;
    const uint4 *from = reinterpret_cast<const uint4 *>(at & ~(u64)15);
    const u32 chunks = (u32)((((at + bytes + 15) & ~(u64)15) - (at & ~(u64)15)) / 16);
#pragma unroll 4
    for (u32 c = tid; c < chunks; c += n_threads) slot[c] = __ldcs(from + c);
    return reinterpret_cast<const u8 *>(slot) + (at & 15);
}

// ---- each format's 8 values as w_k = scale * q_k - offset -----------------
//
// q_k are small integers (exact in f32), so a lane sums q_k * x_k and scales
// once per 8 values. Formats without a fast form fall back on the exact
// dequantization (scale 1, offset 0).

// Two bytes at a 2-byte-aligned address (every block of every format starts
// at an even offset in its row), four such as two words.
__device__ __forceinline__ u32 ld_u16(const u8 *p) { return *reinterpret_cast<const u16 *>(p); }
__device__ __forceinline__ void load8(const u8 *p, u32 &lo, u32 &hi) {
    lo = __byte_perm(ld_u16(p), ld_u16(p + 2), 0x5410);
    hi = __byte_perm(ld_u16(p + 4), ld_u16(p + 6), 0x5410);
}
__device__ __forceinline__ float half_at(const u8 *p) { return __half2float(__ushort_as_half((u16)ld_u16(p))); }

// Byte k of `word` minus `bias` as f32, exactly: 2^23 + byte as a float's
// bits, less 2^23 + bias.
__device__ __forceinline__ void bytes_to_floats(u32 lo, u32 hi, float bias, float q[8]) {
    const float magic = 8388608.0f + bias;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        q[k] = __int_as_float(__byte_perm(lo, 0x4B000000u, 0x7440 + k)) - magic;
        q[4 + k] = __int_as_float(__byte_perm(hi, 0x4B000000u, 0x7440 + k)) - magic;
    }
}

// Bits 0..4 of `bits` moved to bit 4 of bytes 0..4 (a fifth quant bit each).
__device__ __forceinline__ u32 spread4_to_bit4(u32 bits) { return ((bits & 15u) * 0x00204081u & 0x01010101u) << 4; }

template <typename Format>
struct Scaled {
    static constexpr bool has_offset = false;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        row_values8<Format>(row, first, q);
        scale = 1.0f;
        offset = 0.0f;
    }
};

// The 8 quants from value f of a legacy 4-bit block (nibbles in qs), or
// with qh a 5-bit one (fifth bits in the byte qh[f / 8]), less `bias`.
__device__ __forceinline__ void legacy_quants8(const u8 *qs, const u8 *qh, u32 f, float bias, float q[8]) {
    u32 lo, hi;
    load8(qs + f % 16, lo, hi);
    const u32 shift = f >= 16 ? 4 : 0;
    lo = (lo >> shift) & 0x0f0f0f0fu;
    hi = (hi >> shift) & 0x0f0f0f0fu;
    if (qh) {
        const u32 high = qh[f / 8];
        lo |= spread4_to_bit4(high);
        hi |= spread4_to_bit4(high >> 4);
    }
    bytes_to_floats(lo, hi, bias, q);
}

// Q4_0, Q4_1, Q5_0, Q5_1: d at 0, then m (the _1 forms), qh (the 5-bit
// forms) and qs.
template <typename Block, bool MIN, bool FIVE>
struct ScaledLegacy {
    static constexpr bool has_offset = MIN;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        const u8 *b = row + (first / QK_LEGACY) * sizeof(Block);
        const u32 at_qh = MIN ? 4 : 2, at_qs = at_qh + (FIVE ? 4 : 0);
        legacy_quants8(b + at_qs, FIVE ? b + at_qh : nullptr, first % QK_LEGACY, MIN ? 0.0f : (FIVE ? 16.0f : 8.0f), q);
        scale = half_at(b);
        offset = MIN ? -half_at(b + 2) : 0.0f;
    }
};

template <> struct Scaled<FormatQ4_0> : ScaledLegacy<block_q4_0, false, false> {};
template <> struct Scaled<FormatQ4_1> : ScaledLegacy<block_q4_1, true, false> {};
template <> struct Scaled<FormatQ5_0> : ScaledLegacy<block_q5_0, false, true> {};
template <> struct Scaled<FormatQ5_1> : ScaledLegacy<block_q5_1, true, true> {};

template <>
struct Scaled<FormatQ8_0> {
    static constexpr bool has_offset = false;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        const u8 *b = row + (first / QK_LEGACY) * sizeof(block_q8_0);
        u32 lo, hi;
        load8(b + 2 + first % QK_LEGACY, lo, hi);
        // Signed bytes as unsigned ones 128 higher.
        bytes_to_floats(lo ^ 0x80808080u, hi ^ 0x80808080u, 128.0f, q);
        scale = half_at(b);
        offset = 0.0f;
    }
};

template <>
struct Scaled<FormatQ4_K> {
    static constexpr bool has_offset = true;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        const u8 *b = row + (first / QK_K) * sizeof(block_q4_k);
        const u32 f = first % QK_K;
        const u32 chunk = f / 64, n = (f / 32) % 2, l = f % 32;
        int sc, m;
        scale_min_k4(2 * chunk + n, b + 4, &sc, &m);
        u32 lo, hi;
        load8(b + 16 + 32 * chunk + l, lo, hi);
        const u32 shift = 4 * n;
        bytes_to_floats((lo >> shift) & 0x0f0f0f0fu, (hi >> shift) & 0x0f0f0f0fu, 0.0f, q);
        scale = half_at(b) * (float)sc;
        offset = half_at(b + 2) * (float)m;
    }
};

template <>
struct Scaled<FormatQ5_K> {
    static constexpr bool has_offset = true;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        const u8 *b = row + (first / QK_K) * sizeof(block_q5_k);
        const u32 f = first % QK_K;
        const u32 chunk = f / 64, n = (f / 32) % 2, l = f % 32, sub = 2 * chunk + n;
        int sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        u32 lo, hi, hlo, hhi;
        load8(b + 48 + 32 * chunk + l, lo, hi);
        load8(b + 16 + l, hlo, hhi);
        const u32 shift = 4 * n;
        lo = ((lo >> shift) & 0x0f0f0f0fu) | (((hlo >> sub) & 0x01010101u) << 4);
        hi = ((hi >> shift) & 0x0f0f0f0fu) | (((hhi >> sub) & 0x01010101u) << 4);
        bytes_to_floats(lo, hi, 0.0f, q);
        scale = half_at(b) * (float)sc;
        offset = half_at(b + 2) * (float)m;
    }
};

template <>
struct Scaled<FormatQ6_K> {
    static constexpr bool has_offset = false;
    static __device__ __forceinline__ void values8(const u8 *row, u32 first, float q[8], float &scale, float &offset) {
        const u8 *b = row + (first / QK_K) * sizeof(block_q6_k);
        const u32 f = first % QK_K;
        const u32 h = f / 128, n = (f / 32) % 4, l = f % 32;
        u32 lo, hi, hlo, hhi;
        load8(b + 64 * h + 32 * (n % 2) + l, lo, hi);
        load8(b + 128 + 32 * h + l, hlo, hhi);
        const u32 shift = 4 * (n / 2), hshift = 2 * n;
        lo = ((lo >> shift) & 0x0f0f0f0fu) | (((hlo >> hshift) & 0x03030303u) << 4);
        hi = ((hi >> shift) & 0x0f0f0f0fu) | (((hhi >> hshift) & 0x03030303u) << 4);
        bytes_to_floats(lo, hi, 32.0f, q);
        scale = half_at(b + 208) * (float)(i8)b[192 + 8 * h + 2 * n + l / 16];
        offset = 0.0f;
    }
};

// sum_i q[i] * x[i] (* norm[i]) over 8 values, and with `want_sum` also
// sum_i x[i] (* norm[i]) into `xsum`; with `norm` and `count`, adds
// sum_i x[i]^2 to `sq` (the warp sees every input value once, so it gets
// RMSNorm's sum of squares from the loads it makes anyway).
template <bool want_sum>
__device__ __forceinline__ float dot8(const float q[8], const float *__restrict__ x, const float *__restrict__ norm,
                                      bool count, float &sq, float &xsum) {
    float4 a = *reinterpret_cast<const float4 *>(x);
    float4 b = *reinterpret_cast<const float4 *>(x + 4);
    if (norm) {
        if (count) sq += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
        const float4 wa = *reinterpret_cast<const float4 *>(norm);
        const float4 wb = *reinterpret_cast<const float4 *>(norm + 4);
        a.x *= wa.x; a.y *= wa.y; a.z *= wa.z; a.w *= wa.w;
        b.x *= wb.x; b.y *= wb.y; b.z *= wb.z; b.w *= wb.w;
    }
    if (want_sum) xsum = (a.x + a.y) + (a.z + a.w) + (b.x + b.y) + (b.z + b.w);
    return q[0] * a.x + q[1] * a.y + q[2] * a.z + q[3] * a.w + q[4] * b.x + q[5] * b.y + q[6] * b.z + q[7] * b.w;
}

// Up to three matrices stacked (scalars, not arrays: an array
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
                                       u32 warps_per_row, u32 stage_slot) {
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
    const u8 *row_at[SUMS];
    row_at[0] = w + (u64)r * row_bytes;
    if (GATED) row_at[SUMS - 1] = s.w1 + (u64)r * row_bytes;
    if (stage_slot != 0) {
        // Slots of stage_slot 16-byte units: per warp and sum, or per sum
        // when the block shares one long row.
        extern __shared__ uint4 stage[];
        if (warps_per_row > 1) {
            if (active) {
#pragma unroll
                for (int g = 0; g < SUMS; ++g)
                    row_at[g] = stage_row(row_at[g], row_bytes, stage + g * stage_slot, threadIdx.x, blockDim.x);
            }
            __syncthreads();
        } else {
            if (active) {
#pragma unroll
                for (int g = 0; g < SUMS; ++g)
                    row_at[g] = stage_row(row_at[g], row_bytes, stage + (warp * SUMS + g) * stage_slot, lane, WARP_SIZE);
            }
            __syncwarp();
        }
    }
    // The weights are on their way; the input comes from the kernel before.
    wait_for_prerequisites();
    if (active) {
        // Lane l takes values 8l..8l+8 of each 256-value stretch (of each
        // warp's share of a long row): a warp's loads of one stretch are
        // adjacent bytes.
        const u32 start = (part * WARP_SIZE + lane) * 8, stride = warps_per_row * WARP_SIZE * 8;
        typedef Scaled<Format> S;
#define MATVEC_STEP(first)                                                                             \
    _Pragma("unroll") for (int g = 0; g < SUMS; ++g) {                                                 \
        float q[8], scale, offset;                                                                     \
        S::values8(row_at[g], first, q, scale, offset);                                                \
        _Pragma("unroll") for (int t = 0; t < TOKENS; ++t) {                                           \
            if (t < nt) {                                                                              \
                float xsum;                                                                            \
                const float d = dot8<S::has_offset>(q, x + (u64)t * cols + (first),                    \
                                                    norm ? norm + (first) : nullptr, g == 0, sq[t], xsum); \
                if constexpr (S::has_offset) acc[g][t] += scale * d - offset * xsum;                  \
                else acc[g][t] += scale * d;                                                           \
            }                                                                                          \
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

// Rows of a block-format matrix as f16, for the products of many rows that
// run through cuBLAS: block b's warp w converts row 4b + w of the n_rows
// at w (cols values, row_bytes apart) into dst (n_rows × cols, 16-byte
// aligned). Each row is staged as the mat-vec's are and read as scale ×
// small integers; the values are the CPU's rounded to f16 (the products'
// inputs, not the bit-exact dequantization of dequantize.cu, whose NaN
// payloads and K-quant rounding order this does not keep).
template <typename Format>
__device__ __forceinline__ void rows_to_f16(const u8 *__restrict__ w, u64 row_bytes, u32 cols, u32 n_rows,
                                            u32 stage_slot, __half *__restrict__ dst) {
    extern __shared__ uint4 stage[];
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 row = blockIdx.x * MATVEC_WARPS + warp;
    const bool active = row < n_rows;
    const u8 *staged = nullptr;
    if (active) staged = stage_row(w + (u64)row * row_bytes, row_bytes, stage + warp * stage_slot, lane, WARP_SIZE);
    __syncwarp();
    // dst may still be read by the product before.
    wait_for_prerequisites();
    if (!active) return;
    typedef Scaled<Format> S;
    for (u32 first = lane * 8; first < cols; first += WARP_SIZE * 8) {
        float q[8], scale, offset;
        S::values8(staged, first, q, scale, offset);
        __half2 h[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float a = scale * q[2 * k], b = scale * q[2 * k + 1];
            if (S::has_offset) a -= offset, b -= offset;
            h[k] = __floats2half2_rn(a, b);
        }
        *reinterpret_cast<uint4 *>(dst + (u64)row * cols + first) = *reinterpret_cast<const uint4 *>(h);
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
        float eps, u32 accumulate, u32 warps_per_row, u32 stage_slot
#define MATVEC_SEGMENTS {w0, w1, w2, y0, y1, y2, rows0, rows1, rows2, ldy0, ldy1, ldy2}

// Blocks per SM the register budget is made for: one-token kernels of block
// formats in 48 registers (10 blocks, 40 warps: the 1,216 blocks of a
// 0.5B model's gate/up product fit one wave of 132 SMs), the others as they
// need (eight tokens' accumulators; f32 rows unstaged).
#define MATVEC_MIN_BLOCKS(Format, tokens) ((tokens) == 1 && Format::block_values > 1 ? 10 : 1)

#define MATVEC_KERNEL(name, Format, suffix, gated, tokens)                                                      \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE, MATVEC_MIN_BLOCKS(Format, tokens)) \
        matvec_##suffix##name##_##tokens(                                                                     \
        MATVEC_ARGS) {                                                                                        \
        allow_dependents();                                                                                   \
        const Segments s = MATVEC_SEGMENTS;                                                                   \
        matvec<Format, tokens, gated>(s, row_bytes, cols, x, n_tokens, norm, eps, accumulate, warps_per_row, stage_slot); \
    }

#define MATVEC_KERNELS(name, Format)                                                                          \
    MATVEC_KERNEL(name, Format, , 0, 1)                                                                       \
    MATVEC_KERNEL(name, Format, , 0, 8)                                                                       \
    MATVEC_KERNEL(name, Format, gated_silu_, 1, 1)                                                            \
    MATVEC_KERNEL(name, Format, gated_silu_, 1, 8)                                                            \
    MATVEC_KERNEL(name, Format, gated_gelu_, 2, 1)                                                            \
    MATVEC_KERNEL(name, Format, gated_gelu_, 2, 8)                                                            \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE) rows_to_f16_##name(                \
        const u8 *w, u64 row_bytes, u32 cols, u32 n_rows, u32 stage_slot, __half *dst) {                      \
        allow_dependents();                                                                                   \
        rows_to_f16<Format>(w, row_bytes, cols, n_rows, stage_slot, dst);                                     \
    }                                                                                                         \
    extern "C" __global__ void embed_##name(const u8 *table, u64 row_bytes, u32 cols, const u32 *tokens,      \
                                            float scale, float *x) {                                          \
        allow_dependents();                                                                                   \
        wait_for_prerequisites();                                                                             \
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
