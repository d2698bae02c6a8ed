// RMSNorm of activation rows (f32), one block per row.
#include "common.cuh"
#include "warp.cuh"

// 1 / sqrt(mean(x^2) + eps) over the block's row, for every thread.
__device__ __forceinline__ float rms_scale(const float *__restrict__ x, u32 dim, float eps, float *scratch) {
    float sum = 0.0f;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) sum += x[i] * x[i];
    sum = block_sum(sum, scratch);
    return 1.0f / sqrtf(sum / (float)dim + eps);
}

// out[i] = x[rows[i]] (or x[i] when rows is null), normalized and times w.
extern "C" __global__ void rms_norm(const float *__restrict__ x, const u32 *__restrict__ rows,
                                    const float *__restrict__ w, float eps, u32 dim, float *__restrict__ out) {
    allow_dependents();
    wait_for_prerequisites();
    __shared__ float scratch[32];
    const u32 src = rows ? rows[blockIdx.x] : blockIdx.x;
    const float *row = x + (u64)src * dim;
    const float scale = rms_scale(row, dim, eps, scratch);
    float *dst = out + (u64)blockIdx.x * dim;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = row[i] * scale * w[i];
}

// x[i] += RMSNorm(y[i]) * w: a block's output normalized before it joins the
// residual stream (gemma3's post-attention and post-FFN norms).
extern "C" __global__ void add_rms_norm(float *__restrict__ x, const float *__restrict__ y,
                                        const float *__restrict__ w, float eps, u32 dim) {
    allow_dependents();
    wait_for_prerequisites();
    __shared__ float scratch[32];
    const float *row = y + (u64)blockIdx.x * dim;
    const float scale = rms_scale(row, dim, eps, scratch);
    float *dst = x + (u64)blockIdx.x * dim;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) dst[i] += row[i] * scale * w[i];
}
