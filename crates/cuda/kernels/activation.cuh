// The FFN's gated activations, shared by the elementwise kernels and the
// fused gate/up product, written as the CPU backend computes them.
#pragma once

// silu(g) * u (SwiGLU).
__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// gelu(g) * u with GELU's tanh approximation (GeGLU).
__device__ __forceinline__ float gelu_tanh_times(float x, float u) {
    const float sqrt_2_over_pi = 0.7978846f;  // as the CPU backend writes it
    const float coef = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * (1.0f + coef * x * x))) * u;
}
