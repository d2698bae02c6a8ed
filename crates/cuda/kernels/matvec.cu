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
//
// With ASYNC (Ampere and later) the copy goes through cp.async (see below):
// the slot's bytes are there once the group is waited for (and, for other
// threads, after a barrier).
__device__ __forceinline__ void copy_async16(uint4 *dst, const uint4 *src);
template <bool ASYNC = false>
__device__ __forceinline__ const u8 *stage_row(const u8 *src, u64 bytes, uint4 *slot, u32 tid, u32 n_threads) {
    const u64 at = (u64)src;
    const uint4 *from = reinterpret_cast<const uint4 *>(at & ~(u64)15);
    const u32 chunks = (u32)((((at + bytes + 15) & ~(u64)15) - (at & ~(u64)15)) / 16);
#pragma unroll 4
    for (u32 c = tid; c < chunks; c += n_threads) {
        if (ASYNC) copy_async16(slot + c, from + c);
        else slot[c] = __ldcs(from + c);
    }
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

// ---- asynchronous staging (Ampere and later) ------------------------------
//
// cp.async copies 16 bytes from global to shared memory without passing
// through registers; a block that loops over several row groups copies the
// next group's rows while it computes on the current one's.
__device__ __forceinline__ void copy_async16(uint4 *dst, const uint4 *src) {
#if __CUDA_ARCH__ >= 800
    const u32 at = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(at), "l"(src) : "memory");
#else
    *dst = __ldcs(src);
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void copy_async_wait_all_but_one() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}


// Up to three matrices stacked (scalars, not arrays: an array
// indexed at run time would live in local memory).
struct Segments {
    const u8 *w0, *w1, *w2;
    float *y0, *y1, *y2;
    u32 rows0, rows1, rows2;
    u32 ldy0, ldy1, ldy2;
};

// Where row r of the stacked segments lives: its bytes (gated: gate's; up's
// are at the same offset of w1), its output column and row stride.
struct RowAt {
    const u8 *w;
    float *y;
    u32 r, ldy;
    bool active;
};

template <int GATED>
__device__ __forceinline__ RowAt locate_row(const Segments &s, u64 row_bytes, u32 r) {
    RowAt at;
    at.w = s.w0, at.y = s.y0;
    u32 rows = s.rows0;
    at.ldy = s.ldy0;
    if (!GATED && r >= s.rows0) {
        r -= s.rows0;
        at.w = s.w1, at.y = s.y1, rows = s.rows1, at.ldy = s.ldy1;
        if (r >= s.rows1) {
            r -= s.rows1;
            at.w = s.w2, at.y = s.y2, rows = s.rows2, at.ldy = s.ldy2;
        }
    }
    at.r = r;
    at.active = r < rows;
    at.w += (u64)r * row_bytes;
    return at;
}

// GATED: 0 for a plain product; 1 (SiLU) or 2 (GELU-tanh) for the FFN's
// first half, y[t][r] = act(gate[r]·x[t]) * (up[r]·x[t]) with gate and up as
// segments 0 and 1 (rows[0] rows each, written to y[0]).
//
// A block takes a group of rows: MATVEC_WARPS rows (a warp each), or one
// long row split over its warps (warps_per_row > 1). With one block per
// group (gridDim.x = groups) each block stages its group and computes it.
// With fewer blocks (large matrices: a persistent grid), block b takes
// groups b, b + gridDim.x, ... and copies group k + 1's rows (cp.async, a
// second stage buffer) while it computes group k, so that its weight bytes
// stay in flight all along instead of only at the block's start.
template <typename Format, int TOKENS, int GATED, bool PERSIST>
__device__ __forceinline__ void matvec(const Segments &s, u64 row_bytes, u32 cols, const float *__restrict__ x,
                                       u32 n_tokens, const float *__restrict__ norm, float eps, u32 accumulate,
                                       u32 warps_per_row, u32 stage_slot) {
    constexpr int SUMS = GATED ? 2 : 1;
    // Per warp: each sum's partial dot products, then the sums of squares.
    __shared__ float partial[MATVEC_WARPS][TOKENS * (SUMS + 1)];
    extern __shared__ uint4 stage[];
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 part = warp % warps_per_row;
    const bool split = warps_per_row > 1;
    const u32 rows_per_group = MATVEC_WARPS / warps_per_row;
    const u32 total_rows = GATED ? s.rows0 : s.rows0 + s.rows1 + s.rows2;
    // Without PERSIST, a block takes its own group only.
    const u32 groups = PERSIST ? (total_rows + rows_per_group - 1) / rows_per_group : blockIdx.x + 1;
    const bool loops = PERSIST && gridDim.x < groups;
    // A stage buffer: slots of stage_slot 16-byte units, per warp and sum,
    // or per sum when the block shares one long row.
    const u32 buffer_units = (split ? 1 : MATVEC_WARPS) * SUMS * stage_slot;
    const u32 slot0 = (split ? 0 : warp * SUMS) * stage_slot;
    const u32 t0 = blockIdx.y * TOKENS;
    const u32 nt = min((u32)TOKENS, n_tokens - t0);
    x += (u64)t0 * cols;

    // Row g's bytes of `at` (gate's, then up's when gated) in global memory.
    auto source = [&](const RowAt &at, int g) { return g == 0 ? at.w : s.w1 + (at.w - s.w0); };
    // Copies the rows of `at` to stage buffer `buf`.
    auto stage_rows = [&](const RowAt &at, u32 buf) {
        if (stage_slot == 0 || !at.active) return;
#pragma unroll
        for (int g = 0; g < SUMS; ++g) {
            uint4 *slot = stage + buf * buffer_units + slot0 + g * stage_slot;
            const u32 tid = split ? threadIdx.x : lane, n = split ? blockDim.x : WARP_SIZE;
            if (loops) stage_row<true>(source(at, g), row_bytes, slot, tid, n);
            else stage_row(source(at, g), row_bytes, slot, tid, n);
        }
    };

    // Group `group`'s product from stage buffer `buf`, its rows written.
    auto compute = [&](u32 group, u32 buf) {
        const u32 row = group * rows_per_group + warp / warps_per_row;
        const bool active = locate_row<GATED>(s, row_bytes, row).active;
        const u8 *cur_rows[SUMS];
#pragma unroll
        for (int g = 0; g < SUMS; ++g) {
            cur_rows[g] = source(locate_row<GATED>(s, row_bytes, row), g);
            // stage_row's slot layout: the row's byte i at slot byte (row & 15) + i.
            if (stage_slot != 0)
                cur_rows[g] = reinterpret_cast<const u8 *>(stage + buf * buffer_units + slot0 + g * stage_slot) +
                              ((u64)cur_rows[g] & 15);
        }
        float acc[SUMS][TOKENS], sq[TOKENS];
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) sq[t] = 0.0f;
#pragma unroll
        for (int g = 0; g < SUMS; ++g)
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) acc[g][t] = 0.0f;
        if (active) {
            // Lane l takes values 8l..8l+8 of each 256-value stretch (of each
            // warp's share of a long row): a warp's loads of one stretch are
            // adjacent bytes.
            const u32 start = (part * WARP_SIZE + lane) * 8, stride = warps_per_row * WARP_SIZE * 8;
            typedef Scaled<Format> S;
#define MATVEC_STEP(first)                                                                             \
    _Pragma("unroll") for (int g = 0; g < SUMS; ++g) {                                                 \
        float q[8], scale, offset;                                                                     \
        S::values8(cur_rows[g], first, q, scale, offset);                                              \
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
        if (split) {
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
        // Found again rather than kept through the product (registers).
        const RowAt at = locate_row<GATED>(s, row_bytes, row);
        float *y = at.y + (u64)t0 * at.ldy + at.r;
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
            if (t < nt) {
                float *out = y + (u64)t * at.ldy;
                if (GATED) {
                    const float g = acc[0][t] * rstd[t], u = acc[SUMS - 1][t] * rstd[t];
                    *out = GATED == 2 ? gelu_tanh_times(g, u) : silu_times(g, u);
                } else {
                    const float v = acc[0][t] * rstd[t];
                    *out = accumulate ? *out + v : v;
                }
            }
        }
    };

    const u32 first_row = blockIdx.x * rows_per_group + warp / warps_per_row;
    stage_rows(locate_row<GATED>(s, row_bytes, first_row), 0);
    if (!loops) {
        // The weights are on their way; the input comes from the kernel before.
        wait_for_prerequisites();
        if (stage_slot != 0) {
            if (split) __syncthreads();
            else __syncwarp();
        }
        compute(blockIdx.x, 0);
        return;
    }
    copy_async_commit();
    wait_for_prerequisites();
    for (u32 group = blockIdx.x, buf = 0; group < groups; group += gridDim.x, buf ^= 1) {
        // The next group's rows on their way to the other buffer while this
        // one's are used.
        const u32 next_group = group + gridDim.x;
        RowAt next = locate_row<GATED>(s, row_bytes, next_group * rows_per_group + warp / warps_per_row);
        next.active = next.active && next_group < groups;
        stage_rows(next, buf ^ 1);
        copy_async_commit();
        copy_async_wait_all_but_one();
        if (split) __syncthreads();
        else __syncwarp();
        compute(group, buf);
        // This buffer and `partial` are written again in the next round.
        if (split) __syncthreads();
        else __syncwarp();
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
        matvec<Format, tokens, gated, false>(s, row_bytes, cols, x, n_tokens, norm, eps, accumulate, warps_per_row, \
                                             stage_slot);                                                     \
    }

// The persistent grid's one-token kernels (large matrices): built for 8
// blocks an SM (64 registers), the loop's state on top of the product's.
#define MATVEC_PERSIST_KERNEL(name, Format, suffix, gated)                                                      \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * WARP_SIZE, 8)                                 \
        matvec_##suffix##persist_##name##_1(MATVEC_ARGS) {                                                   \
        allow_dependents();                                                                                   \
        const Segments s = MATVEC_SEGMENTS;                                                                   \
        matvec<Format, 1, gated, true>(s, row_bytes, cols, x, n_tokens, norm, eps, accumulate, warps_per_row,   \
                                       stage_slot);                                                           \
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

// The persistent grid's kernels, for the block formats (staged rows).
#define MATVEC_PERSIST_KERNELS(name, Format)                                                                  \
    MATVEC_PERSIST_KERNEL(name, Format, , 0)                                                                  \
    MATVEC_PERSIST_KERNEL(name, Format, gated_silu_, 1)                                                       \
    MATVEC_PERSIST_KERNEL(name, Format, gated_gelu_, 2)

MATVEC_PERSIST_KERNELS(q4_0, FormatQ4_0)
MATVEC_PERSIST_KERNELS(q4_1, FormatQ4_1)
MATVEC_PERSIST_KERNELS(q5_0, FormatQ5_0)
MATVEC_PERSIST_KERNELS(q5_1, FormatQ5_1)
MATVEC_PERSIST_KERNELS(q8_0, FormatQ8_0)
MATVEC_PERSIST_KERNELS(q8_1, FormatQ8_1)
MATVEC_PERSIST_KERNELS(q2_k, FormatQ2_K)
MATVEC_PERSIST_KERNELS(q3_k, FormatQ3_K)
MATVEC_PERSIST_KERNELS(q4_k, FormatQ4_K)
MATVEC_PERSIST_KERNELS(q5_k, FormatQ5_K)
MATVEC_PERSIST_KERNELS(q6_k, FormatQ6_K)
MATVEC_PERSIST_KERNELS(q8_k, FormatQ8_K)

// ---- products of a few activation rows (3 to 64) on the tensor cores ------
//
// matmul_q: y[t][r] (+)= sum_c W[r][c] * x[t][c] for up to 64 token rows of
// x (f16, n × cols) against a block-format W read once from memory (the
// multi-sequence decode step and short prompts; larger ones go through
// cuBLAS). A warp takes 16 weight rows and a block's 64 token rows: 256
// values of its rows at a time are staged (cp.async, the next 256 on their
// way while these are used), turned into f16 64 values at a time in a warp
// tile, and multiplied on the tensor cores (mma m16n8k16, f32 sums), the
// token rows' f16 values read from global memory (L1) as the instruction's
// B operand. Long rows are split over gridDim.y blocks (split-K), each
// writing its partial sums to `partial` for matmul_q_reduce.
#define MMQ_WARPS 4
#define MMQ_ROWS 16            // weight rows per warp
#define MMQ_TOKENS 64          // token rows per block
#define MMQ_CHUNK 256          // values staged at a time
#define MMQ_SUB 64             // values turned to f16 at a time
#define MMQ_TILE_STRIDE 72     // halves per f16 tile row (64 + 8: no bank conflicts)

__device__ __forceinline__ void mma_16x8x16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// Shared memory per warp: two stage buffers of MMQ_ROWS slots of
// `slot_units` 16-byte units, then the f16 tile.
template <typename Format>
__device__ __forceinline__ void matmul_q(const u8 *__restrict__ w, u64 row_bytes, u32 rows, u32 cols,
                                         const __half *__restrict__ x, u32 n_tokens, float *__restrict__ y, u32 ldy,
                                         u32 accumulate, u32 chunks_per_split, float *__restrict__ partial,
                                         u32 slot_units) {
    typedef typename Format::block Block;
    typedef Scaled<Format> S;
    extern __shared__ uint4 stage[];
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 group = lane / 4, quad = lane % 4;
    const u32 stage_units = MMQ_ROWS * slot_units;
    uint4 *mine = stage + warp * (2 * stage_units + MMQ_ROWS * MMQ_TILE_STRIDE * 2 / 16);
    __half *tile = reinterpret_cast<__half *>(mine + 2 * stage_units);
    const u32 r0 = (blockIdx.x * MMQ_WARPS + warp) * MMQ_ROWS;
    const u32 chunks = (cols + MMQ_CHUNK - 1) / MMQ_CHUNK;
    const u32 c_begin = blockIdx.y * chunks_per_split, c_end = min(chunks, c_begin + chunks_per_split);
    const u32 t0 = blockIdx.z * MMQ_TOKENS;
    const u32 nt = min((u32)MMQ_TOKENS, n_tokens - t0);
    const u32 n_tiles = (nt + 7) / 8;

    // Chunk c's bytes of this warp's rows into stage buffer `buf` (rows past
    // the matrix repeat its last row; their sums are not written).
    auto stage_chunk = [&](u32 c, u32 buf) {
        const u32 first_value = c * MMQ_CHUNK, len = min((u32)MMQ_CHUNK, cols - first_value);
        const u32 bytes = len / Format::block_values * sizeof(Block);
        const u64 offset = (u64)(first_value / Format::block_values) * sizeof(Block);
        for (u32 i = lane; i < MMQ_ROWS * slot_units; i += WARP_SIZE) {
            const u32 row = i / slot_units, unit = i % slot_units;
            const u64 at = (u64)(w + (u64)min(r0 + row, rows - 1) * row_bytes + offset);
            const u64 base = at & ~(u64)15;
            if (base + 16 * unit < at + bytes)
                copy_async16(mine + buf * stage_units + row * slot_units + unit,
                             reinterpret_cast<const uint4 *>(base) + unit);
        }
    };

    float acc[MMQ_TOKENS / 8][4];
#pragma unroll
    for (int j = 0; j < MMQ_TOKENS / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    stage_chunk(c_begin, 0);
    copy_async_commit();
    // The weights are on their way; the token rows come from the kernel before.
    wait_for_prerequisites();
    // Token rows past n repeat the last one (their sums are not written).
    x += (u64)t0 * cols + 2 * quad;
    u32 xr[MMQ_TOKENS / 8];
#pragma unroll
    for (int j = 0; j < MMQ_TOKENS / 8; ++j) xr[j] = min(j * 8 + group, nt - 1) * cols;
    for (u32 c = c_begin, buf = 0; c < c_end; ++c, buf ^= 1) {
        if (c + 1 < c_end) stage_chunk(c + 1, buf ^ 1);
        copy_async_commit();
        copy_async_wait_all_but_one();
        __syncwarp();
        const u32 first_value = c * MMQ_CHUNK, len = min((u32)MMQ_CHUNK, cols - first_value);
        for (u32 sub = 0; sub < len; sub += MMQ_SUB) {
            // The tile: MMQ_ROWS rows × 64 values as f16, 8 values a lane at a time.
#pragma unroll 2
            for (int j = 0; j < MMQ_ROWS * MMQ_SUB / 8 / WARP_SIZE; ++j) {
                const u32 i = lane + j * WARP_SIZE, row = i / (MMQ_SUB / 8), stretch = i % (MMQ_SUB / 8);
                const u8 *staged = reinterpret_cast<const u8 *>(mine + buf * stage_units + row * slot_units) +
                                   ((u64)(w + (u64)min(r0 + row, rows - 1) * row_bytes +
                                          (u64)(first_value / Format::block_values) * sizeof(Block)) & 15);
                float q[8], scale, offset;
                S::values8(staged, sub + 8 * stretch, q, scale, offset);
                u32 h[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    float a = scale * q[2 * k], b = scale * q[2 * k + 1];
                    if (S::has_offset) a -= offset, b -= offset;
                    h[k] = (u32)__half_as_ushort(__float2half_rn(a)) | ((u32)__half_as_ushort(__float2half_rn(b)) << 16);
                }
                *reinterpret_cast<uint4 *>(tile + row * MMQ_TILE_STRIDE + 8 * stretch) = make_uint4(h[0], h[1], h[2], h[3]);
            }
            __syncwarp();
            // Unrolled by 2: fully, the 16-column steps' operands spill.
#pragma unroll 2
            for (u32 k = 0; k < MMQ_SUB; k += 16) {
                const u32 *t32 = reinterpret_cast<const u32 *>(tile);
                const u32 a0 = t32[(group * MMQ_TILE_STRIDE + k + 2 * quad) / 2];
                const u32 a1 = t32[((group + 8) * MMQ_TILE_STRIDE + k + 2 * quad) / 2];
                const u32 a2 = t32[(group * MMQ_TILE_STRIDE + k + 8 + 2 * quad) / 2];
                const u32 a3 = t32[((group + 8) * MMQ_TILE_STRIDE + k + 8 + 2 * quad) / 2];
                const u32 col = first_value + sub + k;
#pragma unroll
                for (int j = 0; j < MMQ_TOKENS / 8; ++j) {
                    if (j < n_tiles) {
                        const __half *b = x + xr[j] + col;
                        const u32 b0 = __ldg(reinterpret_cast<const unsigned int *>(b));
                        const u32 b1 = __ldg(reinterpret_cast<const unsigned int *>(b + 8));
                        mma_16x8x16(acc[j], a0, a1, a2, a3, b0, b1);
                    }
                }
            }
            __syncwarp();
        }
    }
    // acc[j][i]: row group + 8 (i / 2), token 8 j + 2 quad + i % 2.
    const bool split = gridDim.y > 1;
#pragma unroll
    for (int j = 0; j < MMQ_TOKENS / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 r = r0 + group + 8 * (i / 2), t = j * 8 + 2 * quad + i % 2;
            if (r >= rows || t >= nt) continue;
            if (split) {
                partial[((u64)blockIdx.y * n_tokens + t0 + t) * rows + r] = acc[j][i];
            } else {
                float *out = y + (u64)(t0 + t) * ldy + r;
                *out = accumulate ? *out + acc[j][i] : acc[j][i];
            }
        }
    }
}

// y[t][r] (+)= sum over the splits s of partial[s][t][r].
extern "C" __global__ void matmul_q_reduce(const float *__restrict__ partial, u32 splits, u32 n_tokens, u32 rows,
                                           float *__restrict__ y, u32 ldy, u32 accumulate) {
    allow_dependents();
    wait_for_prerequisites();
    const u64 total = (u64)n_tokens * rows;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (u32 s = 0; s < splits; ++s) sum += partial[s * total + i];
        const u32 t = (u32)(i / rows), r = (u32)(i % rows);
        float *out = y + (u64)t * ldy + r;
        *out = accumulate ? *out + sum : sum;
    }
}

#define MATMUL_Q_KERNEL(name, Format)                                                                         \
    extern "C" __global__ void __launch_bounds__(MMQ_WARPS * WARP_SIZE) matmul_q_##name(                      \
        const u8 *w, u64 row_bytes, u32 rows, u32 cols, const __half *x, u32 n_tokens, float *y, u32 ldy,     \
        u32 accumulate, u32 chunks_per_split, float *partial, u32 slot_units) {                               \
        allow_dependents();                                                                                   \
        matmul_q<Format>(w, row_bytes, rows, cols, x, n_tokens, y, ldy, accumulate, chunks_per_split, partial, \
                         slot_units);                                                                         \
    }

MATMUL_Q_KERNEL(q4_0, FormatQ4_0)
MATMUL_Q_KERNEL(q4_1, FormatQ4_1)
MATMUL_Q_KERNEL(q5_0, FormatQ5_0)
MATMUL_Q_KERNEL(q5_1, FormatQ5_1)
MATMUL_Q_KERNEL(q8_0, FormatQ8_0)
MATMUL_Q_KERNEL(q8_1, FormatQ8_1)
MATMUL_Q_KERNEL(q2_k, FormatQ2_K)
MATMUL_Q_KERNEL(q3_k, FormatQ3_K)
MATMUL_Q_KERNEL(q4_k, FormatQ4_K)
MATMUL_Q_KERNEL(q5_k, FormatQ5_K)
MATMUL_Q_KERNEL(q6_k, FormatQ6_K)
MATMUL_Q_KERNEL(q8_k, FormatQ8_K)
