// The attention block's per-head preparation, between the Q/K/V products and
// attention: bias, QK-norm, rotary position embedding, and the new keys and
// values written into the KV cache as f16.
#include "common.cuh"
#include "warp.cuh"

#define PAGE_TOKENS 16   // positions per KV page (engine::kv::PAGE_TOKENS)
#define MAX_HEAD_DIM 256
#define VALUES_PER_LANE (MAX_HEAD_DIM / WARP_SIZE)

// One warp per (token, head), over the n_heads query heads then the
// n_kv_heads key heads (whose warps also store the value head).
//   q: [n][n_heads * head_dim], k, v: [n][n_kv_heads * head_dim], in place (v read only)
//   bq, bk, bv: biases or null; q_norm, k_norm: [head_dim] weights or null
//   positions[t]: the token's position; its sequence's block table starts at
//   block_tables + table_offsets[t]
//   k_cache, v_cache: this layer's pages, [page][PAGE_TOKENS][n_kv_heads * head_dim] f16
// RoPE rotates the first rope_dims dimensions of each head, pair i by
// pos * theta_scale^i, the power built by repeated multiplication in f32 as
// the CPU backend (and llama.cpp) does, so the angle is the CPU's bit for bit; pairs are (i, i + rope_dims/2) for NEOX,
// (2i, 2i + 1) otherwise. The angle is then divided by rope_factors[i] (Llama 3's
// rope_freqs, Phi-3's LongRoPE factors; null: 1) and multiplied by freq_scale
// (linear scaling), and cos and sin by attn_factor. rope_dims 0: no rotation
// (SmolLM3's every fourth layer).
extern "C" __global__ void __launch_bounds__(WARP_SIZE) qkv_prepare(
    float *__restrict__ q, float *__restrict__ k, const float *__restrict__ v,
    const float *__restrict__ bq, const float *__restrict__ bk, const float *__restrict__ bv,
    const float *__restrict__ q_norm, const float *__restrict__ k_norm, float eps,
    const u32 *__restrict__ positions, const u32 *__restrict__ table_offsets,
    const u32 *__restrict__ block_tables, __half *__restrict__ k_cache, __half *__restrict__ v_cache,
    u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 rope_dims, float theta_scale, u32 neox,
    const float *__restrict__ rope_factors, float freq_scale, float attn_factor) {
    allow_dependents();
    wait_for_prerequisites();
    const u32 t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const bool is_query = h < n_heads;
    const u32 kv_head = h - n_heads;  // meaningful for key heads only
    const u32 q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    float *head = is_query ? q + (u64)t * q_dim + h * head_dim : k + (u64)t * kv_dim + kv_head * head_dim;
    const float *bias = is_query ? (bq ? bq + h * head_dim : nullptr) : (bk ? bk + kv_head * head_dim : nullptr);
    const float *norm = is_query ? q_norm : k_norm;

    // Bias, then RMSNorm over the head.
    float values[VALUES_PER_LANE];
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const u32 d = lane + WARP_SIZE * j;
        values[j] = 0.0f;
        if (d < head_dim) {
            values[j] = head[d] + (bias ? bias[d] : 0.0f);
            sum_sq += values[j] * values[j];
        }
    }
    if (norm) {
        const float scale = 1.0f / sqrtf(warp_sum(sum_sq) / (float)head_dim + eps);
#pragma unroll
        for (int j = 0; j < VALUES_PER_LANE; ++j) {
            const u32 d = lane + WARP_SIZE * j;
            if (d < head_dim) values[j] = values[j] * scale * norm[d];
        }
    }
#pragma unroll
    for (int j = 0; j < VALUES_PER_LANE; ++j) {
        const u32 d = lane + WARP_SIZE * j;
        if (d < head_dim) head[d] = values[j];
    }
    __syncwarp();

    // RoPE: each pair belongs to one lane.
    const u32 pos = positions[t];
    const u32 half = rope_dims / 2;
    for (u32 i = lane; i < half; i += WARP_SIZE) {
        float angle = (float)pos;
        for (u32 step = 0; step < i; ++step) angle *= theta_scale;
        angle = freq_scale * (rope_factors ? angle / rope_factors[i] : angle);
        // The f32 angle reduced to [-pi, pi] in double (exact to ~1e-16 of
        // its size), so the fast sine and cosine (absolute error < 4e-7
        // there) stand in for cosf/sinf, whose large-argument path would
        // put an array on the stack.
        const double two_pi = 6.283185307179586;
        const double turns = rint((double)angle / two_pi);
        const float reduced = (float)fma(-turns, two_pi, (double)angle);
        float s, c;
        __sincosf(reduced, &s, &c);
        s *= attn_factor;
        c *= attn_factor;
        const u32 a = neox ? i : 2 * i;
        const u32 b = neox ? i + half : 2 * i + 1;
        const float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
    __syncwarp();

    if (!is_query) {
        const u32 page = block_tables[table_offsets[t] + pos / PAGE_TOKENS];
        const u64 at = ((u64)page * PAGE_TOKENS + pos % PAGE_TOKENS) * kv_dim + kv_head * head_dim;
        const float *value = v + (u64)t * kv_dim + kv_head * head_dim;
        const float *value_bias = bv ? bv + kv_head * head_dim : nullptr;
        for (u32 d = lane; d < head_dim; d += WARP_SIZE) {
            k_cache[at + d] = __float2half_rn(head[d]);
            v_cache[at + d] = __float2half_rn(value[d] + (value_bias ? value_bias[d] : 0.0f));
        }
    }
}
