// Token choice on the GPU, so that only token ids come back to the host.
#include "common.cuh"
#include "warp.cuh"

// Whether (v, i) beats (best_v, best_i): larger, or equal and earlier (the
// CPU's argmax keeps the first maximum). NaN never wins.
__device__ __forceinline__ bool better(float v, u32 i, float best_v, u32 best_i) {
    return v > best_v || (v == best_v && i < best_i);
}

// out[r] = the index of the largest of logits[r][0..vocab]; one block per row.
extern "C" __global__ void argmax_rows(const float *__restrict__ logits, u32 vocab, u32 *__restrict__ out) {
    __shared__ float warp_value[32];
    __shared__ u32 warp_index[32];
    const float *row = logits + (u64)blockIdx.x * vocab;
    float best_v = NEG_INFINITY;
    u32 best_i = 0xffffffffu;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        const float v = __shfl_xor_sync(FULL_MASK, best_v, offset);
        const u32 i = __shfl_xor_sync(FULL_MASK, best_i, offset);
        if (better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
    const u32 lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) {
        warp_value[warp] = best_v;
        warp_index[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const u32 n_warps = blockDim.x / WARP_SIZE;
        best_v = lane < n_warps ? warp_value[lane] : NEG_INFINITY;
        best_i = lane < n_warps ? warp_index[lane] : 0xffffffffu;
#pragma unroll
        for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
            const float v = __shfl_xor_sync(FULL_MASK, best_v, offset);
            const u32 i = __shfl_xor_sync(FULL_MASK, best_i, offset);
            if (better(v, i, best_v, best_i)) {
                best_v = v;
                best_i = i;
            }
        }
        if (lane == 0) out[blockIdx.x] = best_i == 0xffffffffu ? 0 : best_i;
    }
}
