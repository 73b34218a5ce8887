// 16-lane fp32 loads and stores from/to bf16 or fp32 memory (AVX-512), shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace scaletrain {

inline __m512 load16(const c10::BFloat16* p) {  // a bf16 is the high half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// fp32 -> bf16 rounding to nearest even (as c10::BFloat16 does); NaN stays a quiet NaN.
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// 2^x in ~10 instructions (ATen's exp_u20 takes ~20, and the softmax loops are bound by it): 2^n * q(f)
// with n = round(x), f = x - n in [-0.5, 0.5], q a degree-5 fit of 2^f (relative error 2.4e-7 in fp32).
// Lanes with x < -126 (masked -inf scores included) give exactly 0. Callers fold log2(e) into their FMA.
inline __m512 exp2_fast(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.00132764f), f, _mm512_set1_ps(0.00967554f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.05550714f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.2402212f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.69314697f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.00000007f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ), q, n);
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace scaletrain
