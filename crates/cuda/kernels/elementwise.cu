// Elementwise kernels: the FFN's gated activation, and f32 -> f16 for the
// activations that go into cuBLAS.
#include "common.cuh"

// gate = silu(gate) * up (SwiGLU).
extern "C" __global__ void gated_silu(float *__restrict__ gate, const float *__restrict__ up, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// gate = gelu(gate) * up (GeGLU, GELU's tanh approximation).
extern "C" __global__ void gated_gelu_tanh(float *__restrict__ gate, const float *__restrict__ up, u64 n) {
    const float sqrt_2_over_pi = 0.7978846f;  // as the CPU backend writes it
    const float coef = 0.044715f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float x = gate[i];
        gate[i] = 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * (1.0f + coef * x * x))) * up[i];
    }
}

extern "C" __global__ void f32_to_f16(const float *__restrict__ x, __half *__restrict__ y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        y[i] = __float2half_rn(x[i]);
    }
}
