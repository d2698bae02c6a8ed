// Token choice on the GPU, so that only token ids come back to the host.
#include "common.cuh"
#include "warp.cuh"

// (logit, index) as one integer that orders like the CPU's argmax: larger
// logits first, and among equal logits the earlier index (the low half holds
// the complement of the index). NaN never wins: it maps to 0, below every
// number, -inf included.
__device__ __forceinline__ u64 argmax_key(float v, u32 i) {
    const u32 bits = __float_as_uint(v);
    const u32 ordered = v != v ? 0u : (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)ordered << 32) | (u64)(~i);
}

// *out = max over the tokens i that mask allows (every one where mask is
// null) of argmax_key(row[i], i); this block's share of the row. Bit i % 32
// of word i / 32 of mask is set when token i is allowed.
__device__ __forceinline__ void argmax_row(const float *__restrict__ row, u32 vocab,
                                           const u32 *__restrict__ mask, u32 words,
                                           u64 *__restrict__ out) {
    u64 best = 0;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
        if (mask != nullptr && (i / 32 >= words || !((mask[i / 32] >> (i % 32)) & 1u))) {
            continue;
        }
        const u64 key = argmax_key(row[i], i);
        best = key > best ? key : best;
    }
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        const u64 other = __shfl_xor_sync(FULL_MASK, best, offset);
        best = other > best ? other : best;
    }
    if (threadIdx.x % WARP_SIZE == 0 && best != 0) {
        atomicMax(reinterpret_cast<unsigned long long *>(out), (unsigned long long)best);
    }
}

// out[r] = max over i of argmax_key(logits[r][i], i), for rows r = blockIdx.y,
// many blocks per row (the vocabulary is long); out must start at 0. The
// host reads the index back as the complement of the low half (0 if the key
// is 0: a row of NaNs, where the CPU's argmax also says 0).
extern "C" __global__ void argmax_rows(const float *__restrict__ logits, u32 vocab, u64 *__restrict__ out) {
    allow_dependents();
    wait_for_prerequisites();
    argmax_row(logits + (u64)blockIdx.y * vocab, vocab, nullptr, 0, out + blockIdx.y);
}

// As argmax_rows, over the tokens a mask allows: row r uses mask
// row_mask[r] of masks (words u32 each), or none when row_mask[r] is
// 0xffffffff. A row whose mask allows nothing keeps the key 0 (index 0).
extern "C" __global__ void argmax_rows_masked(const float *__restrict__ logits, u32 vocab,
                                              const u32 *__restrict__ row_mask,
                                              const u32 *__restrict__ masks, u32 words,
                                              u64 *__restrict__ out) {
    allow_dependents();
    wait_for_prerequisites();
    const u32 which = row_mask[blockIdx.y];
    const u32 *mask = which == 0xffffffffu ? nullptr : masks + (u64)which * words;
    argmax_row(logits + (u64)blockIdx.y * vocab, vocab, mask, words, out + blockIdx.y);
}
