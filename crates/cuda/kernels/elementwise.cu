// Elementwise kernels: the FFN's gated activation, and f32 -> f16 for the
// activations that go into cuBLAS.
#include "common.cuh"
#include "activation.cuh"

// gate = silu(gate) * up (SwiGLU).
extern "C" __global__ void gated_silu(float *__restrict__ gate, const float *__restrict__ up, u64 n) {
    allow_dependents();
    wait_for_prerequisites();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        gate[i] = silu_times(gate[i], up[i]);
    }
}

// gate = gelu(gate) * up (GeGLU, GELU's tanh approximation).
extern "C" __global__ void gated_gelu_tanh(float *__restrict__ gate, const float *__restrict__ up, u64 n) {
    allow_dependents();
    wait_for_prerequisites();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        gate[i] = gelu_tanh_times(gate[i], up[i]);
    }
}

extern "C" __global__ void f32_to_f16(const float *__restrict__ x, __half *__restrict__ y, u64 n) {
    allow_dependents();
    wait_for_prerequisites();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        y[i] = __float2half_rn(x[i]);
    }
}
