//! F32, F16 and BF16 weights: widen 8 values at a time, FMA. (Their Q8
//! mode is this too, as in llama.cpp, whose F16 kernels keep activations
//! in a float format.)

use super::*;

/// The F32 kernel of a plain float format of `$size` bytes per value:
/// `$load8(p)` widens the 8 values at `p`, `$load1(bytes)` one value.
macro_rules! dot_float {
    ($marker:ty, $size:expr, |$p:ident| $load8:expr, |$bytes:ident| $load1:expr) => {
        impl DotF32 for $marker {
            const NEEDS_SUMS: bool = false;
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn dot<const T: usize>(
                row: &[u8],
                x: &[&[f32]; T],
                _sums: &[&[f32]; T],
            ) -> [f32; T] {
                let cols = row.len() / $size;
                for x in x {
                    assert_eq!(x.len(), cols, "activations do not match the row");
                }
                let base = row.as_ptr();
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                let mut c = 0;
                while c + 16 <= cols {
                    let w = {
                        let $p = base.add($size * c);
                        let w0 = $load8;
                        let $p = base.add($size * (c + 8));
                        [w0, $load8]
                    };
                    for t in 0..T {
                        let x = x[t].as_ptr().add(c);
                        acc[t][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[t][0]);
                        acc[t][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[t][1]);
                    }
                    c += 16;
                }
                let mut tail = [0f32; T];
                for c in c..cols {
                    let $bytes: [u8; $size] = row[$size * c..$size * (c + 1)]
                        .try_into()
                        .expect("one value");
                    let w = $load1;
                    for t in 0..T {
                        tail[t] += w * x[t][c];
                    }
                }
                std::array::from_fn(|t| hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + tail[t])
            }
        }
    };
}

dot_float!(F32, 4, |p| _mm256_loadu_ps(p.cast()), |b| {
    f32::from_le_bytes(b)
});
dot_float!(
    F16,
    2,
    |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
    |b| crate::float::f16_to_f32(u16::from_le_bytes(b))
);
dot_float!(
    BF16,
    2,
    |p| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
        _mm_loadu_si128(p.cast())
    ))),
    |b| f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
);
