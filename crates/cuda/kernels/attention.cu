// Causal attention (optionally within a sliding window) of each new token's
// query heads over its sequence's cached keys and values (f16, in pages),
// with grouped-query heads sharing a key/value head.
//
// Each warp streams over key chunks of 32 with an online softmax: lane l
// scores key base + l (a whole dot product from the f16 row, 16 bytes at a
// time), then the chunk's weights and row offsets are passed round by
// shuffles and the lanes accumulate the value rows, 8 dimensions of a key
// per lane, so that a chunk's loads are in flight together.
#include "common.cuh"
#include "warp.cuh"

#define PAGE_TOKENS 16
#define MAX_HEAD_DIM 256

// Row of position p of this sequence in a layer's cache, at kv head offset.
__device__ __forceinline__ const __half *cache_row(const __half *cache, const u32 *table, u32 p, u32 kv_dim,
                                                   u32 head_offset) {
    return cache + ((u64)table[p / PAGE_TOKENS] * PAGE_TOKENS + p % PAGE_TOKENS) * kv_dim + head_offset;
}

//   q: [n][n_heads * head_dim] (after RoPE); out: same shape
//   window: 0 for full causal attention, else keys pos - window + 1 ..= pos
//   softcap: 0, or scores pass through softcap * tanh(score / softcap) (Gemma 2)
// head_dim must be a multiple of 8 and at most MAX_HEAD_DIM.
//
// A block of up to ATTENTION_MAX_WARPS warps (blockDim.x / 32, chosen by the
// host) per (token, query head): warp w takes the key chunks w, w + warps,
// ..., each with its own online softmax, and the block then merges the
// warps' (max, sum, accumulator) triples. Steps with few (token, head)
// pairs and long contexts — a decode step of one sequence, a short prompt
// after a long cached prefix — take more warps, so each warp's chain of
// dependent key-chunk loads is shorter (with 4 warps, 16 tokens after 2,000
// cached took 4.9 ms a pass on an H100, 2.6 ms with 16); steps with many
// pairs keep 4, which fills the GPU with blocks already.
#define ATTENTION_MAX_WARPS 16

extern "C" __global__ void __launch_bounds__(ATTENTION_MAX_WARPS * WARP_SIZE, 1) attention(
    const float *__restrict__ q, const __half *__restrict__ k_cache, const __half *__restrict__ v_cache,
    const u32 *__restrict__ positions, const u32 *__restrict__ table_offsets,
    const u32 *__restrict__ block_tables, u32 n_heads, u32 n_kv_heads, u32 head_dim, u32 window, float scale,
    float softcap, float *__restrict__ out) {
    allow_dependents();
    wait_for_prerequisites();
    __shared__ float query[MAX_HEAD_DIM];
    __shared__ float warp_max_of[ATTENTION_MAX_WARPS];
    __shared__ float warp_sum_of[ATTENTION_MAX_WARPS];
    __shared__ float warp_factor[ATTENTION_MAX_WARPS];
    __shared__ float warp_acc[ATTENTION_MAX_WARPS][MAX_HEAD_DIM];
    const u32 t = blockIdx.x, h = blockIdx.y;
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const u32 warps = blockDim.x / WARP_SIZE;
    const u32 q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const u32 head_offset = (h / (n_heads / n_kv_heads)) * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = q[(u64)t * q_dim + h * head_dim + d];
    __syncthreads();

    const u32 pos = positions[t];
    const u32 first = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32 *table = block_tables + table_offsets[t];
    float running_max = NEG_INFINITY, denominator = 0.0f;

    // Value accumulation: lane = key_group * dim_blocks + dim_block holds 8
    // dimensions (one 16-byte load per key) of the keys key_group,
    // key_group + key_groups, ... of each chunk, so a chunk's value rows are
    // all loaded at once rather than key after key.
    const u32 dim_blocks = head_dim / 8, key_groups = WARP_SIZE / dim_blocks;
    const u32 key_group = lane / dim_blocks, dim_block = lane % dim_blocks;
    const bool holds_values = key_group < key_groups;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;

    for (u32 base = first + warp * WARP_SIZE; base <= pos; base += warps * WARP_SIZE) {
        const u32 p = base + lane;
        float score = NEG_INFINITY;
        // This lane's key's position in the cache's pages (passed on to the
        // value loads below).
        u32 slot = 0;
        if (p <= pos) {
            slot = table[p / PAGE_TOKENS] * PAGE_TOKENS + p % PAGE_TOKENS;
            const __half *key = k_cache + (u64)slot * kv_dim + head_offset;
            float dot = 0.0f;
#pragma unroll 8
            for (u32 d = 0; d < head_dim; d += 8) {
                const uint4 packed = *reinterpret_cast<const uint4 *>(key + d);
                const __half2 *pairs = reinterpret_cast<const __half2 *>(&packed);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(pairs[e]);
                    dot += f.x * query[d + 2 * e] + f.y * query[d + 2 * e + 1];
                }
            }
            score = dot * scale;
            if (softcap != 0.0f) score = softcap * tanhf(score / softcap);
        }
        const float new_max = fmaxf(running_max, warp_max(score));
        const float correction = expf(running_max - new_max);
        const float weight = p <= pos ? expf(score - new_max) : 0.0f;
        denominator = denominator * correction + warp_sum(weight);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] *= correction;
        const u32 n_keys = min((u32)WARP_SIZE, pos + 1 - base);
#pragma unroll 4
        for (u32 k0 = 0; k0 < WARP_SIZE; k0 += key_groups) {
            const u32 key = k0 + key_group;
            const float w = __shfl_sync(FULL_MASK, weight, key % WARP_SIZE);
            const u32 key_slot = __shfl_sync(FULL_MASK, slot, key % WARP_SIZE);
            if (holds_values && key < n_keys) {
                const uint4 packed =
                    *reinterpret_cast<const uint4 *>(v_cache + (u64)key_slot * kv_dim + head_offset + 8 * dim_block);
                const __half2 *pairs = reinterpret_cast<const __half2 *>(&packed);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(pairs[e]);
                    acc[2 * e] += w * f.x;
                    acc[2 * e + 1] += w * f.y;
                }
            }
        }
        running_max = new_max;
    }

    // Merge the warps and key groups: a warp that saw no key has max -inf,
    // sum 0 and weight 0.
    if (lane == 0) {
        warp_max_of[warp] = running_max;
        warp_sum_of[warp] = denominator;
    }
    if (holds_values) {
#pragma unroll
        for (int j = 0; j < 8; ++j) warp_acc[warp][key_group * head_dim + 8 * dim_block + j] = acc[j];
    }
    __syncthreads();
    float block_max = NEG_INFINITY;
    for (u32 w = 0; w < warps; ++w) block_max = fmaxf(block_max, warp_max_of[w]);
    float total = 0.0f;
    for (u32 w = 0; w < warps; ++w) {
        const float factor = warp_max_of[w] == NEG_INFINITY ? 0.0f : expf(warp_max_of[w] - block_max);
        if (threadIdx.x == 0) warp_factor[w] = factor;
        total += warp_sum_of[w] * factor;
    }
    __syncthreads();
    const float inverse = 1.0f / total;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
        for (u32 w = 0; w < warps; ++w) {
            float part = 0.0f;
            for (u32 g = 0; g < key_groups; ++g) part += warp_acc[w][g * head_dim + d];
            sum += part * warp_factor[w];
        }
        out[(u64)t * q_dim + h * head_dim + d] = sum * inverse;
    }
}
