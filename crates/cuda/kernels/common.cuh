// ggml's block formats as the GPU sees them, and the number conversions that
// every kernel shares.
//
// Each struct mirrors the `#[repr(C)]` block of the quant crate
// (crates/quant/src/{legacy,kquants}.rs) field by field: byte arrays only,
// so a block has alignment 1 and any byte offset of a tensor is a valid
// block pointer. Multi-byte fields are little-endian and read byte by byte.
// The sizes are asserted here as they are in Rust.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define QK_LEGACY 32  // values per block of the legacy formats
#define QK_K 256      // values per super-block of the K-quants
#define K_SCALE_SIZE 12

// 4.5 bits per value: x = d * (q - 8)
struct block_q4_0 {
    u8 d[2];               // scale, f16
    u8 qs[QK_LEGACY / 2];  // value j in the low nibble of byte j, value j + 16 in its high nibble
};
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");

// 5 bits per value: x = d * q + m
struct block_q4_1 {
    u8 d[2];               // scale, f16
    u8 m[2];               // offset (the block's minimum), f16
    u8 qs[QK_LEGACY / 2];  // nibbles as in block_q4_0
};
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");

// 5.5 bits per value: x = d * (q - 16)
struct block_q5_0 {
    u8 d[2];               // scale, f16
    u8 qh[4];              // fifth bit of value j: bit j of this little-endian u32
    u8 qs[QK_LEGACY / 2];  // low 4 bits, nibbles as in block_q4_0
};
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");

// 6 bits per value: x = d * q + m
struct block_q5_1 {
    u8 d[2];               // scale, f16
    u8 m[2];               // offset (the block's minimum), f16
    u8 qh[4];              // fifth bits as in block_q5_0
    u8 qs[QK_LEGACY / 2];  // low 4 bits, nibbles as in block_q4_0
};
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");

// 8.5 bits per value: x = q * d
struct block_q8_0 {
    u8 d[2];           // scale, f16
    i8 qs[QK_LEGACY];  // signed quants in order
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");

// 9 bits per value: block_q8_0 plus d * sum(qs)
struct block_q8_1 {
    u8 d[2];           // scale, f16
    u8 s[2];           // d * sum(qs), f16
    i8 qs[QK_LEGACY];  // signed quants in order
};
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 size");

// 2.625 bits per value: 16 sub-blocks of 16, x = d * sc * q - dmin * m
struct block_q2_k {
    u8 scales[QK_K / 16];  // per sub-block: scale in the low nibble, min in the high nibble
    u8 qs[QK_K / 4];       // value 128h + 32s + l: bits 2s..2s+2 of byte 32h + l
    u8 d[2];               // super-block scale for the scales, f16
    u8 dmin[2];            // super-block scale for the mins, f16
};
static_assert(sizeof(block_q2_k) == 84, "block_q2_k size");

// 3.4375 bits per value: 16 sub-blocks of 16, x = d * (sc - 32) * q, q in -4..=3
struct block_q3_k {
    u8 hmask[QK_K / 8];  // high bit, inverted: value 32b + l is bit b of byte l
    u8 qs[QK_K / 4];     // low 2 bits, laid out as in block_q2_k
    u8 scales[12];       // 16 6-bit scales: low nibbles in 0..8, high 2 bits in 8..12
    u8 d[2];             // super-block scale, f16
};
static_assert(sizeof(block_q3_k) == 110, "block_q3_k size");

// 4.5 bits per value: 8 sub-blocks of 32, x = d * sc * q - dmin * m
struct block_q4_k {
    u8 d[2];                    // super-block scale for the scales, f16
    u8 dmin[2];                 // super-block scale for the mins, f16
    u8 scales[K_SCALE_SIZE];    // 8 6-bit scales and 8 6-bit mins (scale_min_k4)
    u8 qs[QK_K / 2];            // value 64c + l: low nibble of byte 32c + l; 64c + 32 + l: its high nibble
};
static_assert(sizeof(block_q4_k) == 144, "block_q4_k size");

// 5.5 bits per value: block_q4_k plus a fifth bit per quant
struct block_q5_k {
    u8 d[2];                  // super-block scale for the scales, f16
    u8 dmin[2];               // super-block scale for the mins, f16
    u8 scales[K_SCALE_SIZE];  // as in block_q4_k
    u8 qh[QK_K / 8];          // fifth bit: value 32b + l is bit b of byte l
    u8 qs[QK_K / 2];          // low 4 bits, as in block_q4_k
};
static_assert(sizeof(block_q5_k) == 176, "block_q5_k size");

// 6.5625 bits per value: 16 sub-blocks of 16, x = d * sc * (q - 32)
struct block_q6_k {
    u8 ql[QK_K / 2];      // low 4 bits: value 128h + 64n + k in nibble n of byte 64h + k
    u8 qh[QK_K / 4];      // high 2 bits: value 128h + 32s + l in bits 2s..2s+2 of byte 32h + l
    i8 scales[QK_K / 16]; // signed 8-bit scale per sub-block
    u8 d[2];              // super-block scale, f16
};
static_assert(sizeof(block_q6_k) == 210, "block_q6_k size");

// 9.125 bits per value (the K-quant dot products' activations): x = d * q
struct block_q8_k {
    u8 d[4];            // scale, f32
    i8 qs[QK_K];        // signed quants in order
    u8 bsums[QK_K / 16][2];  // sum of each 16 quants, i16
};
static_assert(sizeof(block_q8_k) == 292, "block_q8_k size");

// ---------------------------------------------------------------------------
// Conversions. They reproduce the CPU reference bit for bit (the quant crate,
// itself numpy's rules), NaNs included where no arithmetic touched them.

__device__ __forceinline__ u16 load_u16(const u8 *p) {
    return (u16)p[0] | ((u16)p[1] << 8);
}

__device__ __forceinline__ u32 load_u32(const u8 *p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// f16 bits -> f32, keeping a NaN's payload and signalling bit as numpy does
// (the hardware conversion is exact for every other value).
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    if ((h & 0x7c00) == 0x7c00) {
        u32 bits = ((u32)(h & 0x8000) << 16) | 0x7f800000u | ((u32)(h & 0x03ff) << 13);
        return __uint_as_float(bits);
    }
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float load_f16(const u8 *p) {
    return f16_bits_to_f32(load_u16(p));
}

__device__ __forceinline__ float load_f32(const u8 *p) {
    return __uint_as_float(load_u32(p));
}

// f32 -> f16 bits, round to nearest even; a NaN is quieted and keeps the top
// of its payload (half::f16::from_f32 and x86's F16C agree on this).
__device__ __forceinline__ u16 f32_to_f16_bits(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (u16)(((bits >> 16) & 0x8000u) | 0x7e00u | ((bits & 0x007fffffu) >> 13));
    }
    return __half_as_ushort(__float2half_rn(x));
}

// f32 -> bf16 bits, round to nearest even; a NaN is quieted and keeps its
// sign and top payload bits (gguf-py's and ggml's rule, and half::bf16's).
__device__ __forceinline__ u16 f32_to_bf16_bits(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((bits >> 16) | 0x0040u);
    }
    return (u16)(((u64)bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// ---- programmatic dependent launch (Hopper and later) -----------------------
//
// Every forward-pass kernel is launched allowing the next kernel in the
// stream to start before it ends (kernels.rs, `Launch`). So each kernel
// first lets its dependents launch, does what needs nothing from the kernels
// before it (reading weights), and waits for those kernels to finish (and
// their writes to be visible) before it reads or writes any activation.
// Before Hopper both are no-ops and launches are ordered as usual.
__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prerequisites() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
