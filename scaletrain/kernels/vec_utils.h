// The vector layer of the CPU kernels: fp32 vectors of kLanes lanes loaded from and stored to bf16 or fp32
// memory, and the few operations the kernels use, for the two builds build.py makes:
//   AVX-512 (default): 16 lanes, bf16 and fp32 kernels (bf16 rounding needs AVX512_BF16, see store_rne);
//   AVX2 + FMA (SCALETRAIN_AVX2, CPUs without AVX-512): 8 lanes, fp32 kernels only (no bf16 code at all:
//   without AVX-512 oneDNN has no bf16 matmuls either, and train.precision auto picks fp32 there).
// Each operation is one instruction (or a short fixed sequence) of the build's ISA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#ifdef SCALETRAIN_AVX2
#define SCALETRAIN_BF16 0
#else
#define SCALETRAIN_BF16 1
#endif

namespace scaletrain {

#if SCALETRAIN_BF16
using VF = __m512;
constexpr int64_t kLanes = 16;
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VF vload(const c10::BFloat16* p) {  // a bf16 is the high half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline VF vset(float x) { return _mm512_set1_ps(x); }
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF vfmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
inline VF vfmsub(VF a, VF b, VF c) { return _mm512_fmsub_ps(a, b, c); }    // a b - c
inline VF vfnmadd(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline float vsum(VF a) { return _mm512_reduce_add_ps(a); }
inline float vmaxall(VF a) { return _mm512_reduce_max_ps(a); }
// 1 / d: a 14-bit estimate refined by one Newton step r (2 - d r)
inline VF vrecip(VF d) {
  const VF r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}
#else
using VF = __m256;
constexpr int64_t kLanes = 8;
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VF vset(float x) { return _mm256_set1_ps(x); }
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF vmin(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF vfmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vfmsub(VF a, VF b, VF c) { return _mm256_fmsub_ps(a, b, c); }
inline VF vfnmadd(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }
inline float vsum(VF a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
inline float vmaxall(VF a) {
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}
inline VF vrecip(VF d) { return _mm256_div_ps(_mm256_set1_ps(1.f), d); }  // rcp_ps has only 12 bits
#endif

// kLanes fp32 lanes to memory in the kernel's element type, rounding to nearest even for bf16 with
// AVX512_BF16's one-instruction VCVTNEPS2BF16 (a portable AVX-512F rounding takes eight and was ~a fifth of
// the cross-entropy kernel). Only code compiled for avx512bf16 can inline the bf16 one, and it runs only
// where the CPU has it (each kernel's Python side checks); the fp32 one runs on any CPU of the build's ISA.
#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
inline void store_rne(c10::BFloat16* p, VF v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#pragma GCC pop_options
inline void store_rne(float* p, VF v) { _mm512_storeu_ps(p, v); }
#else
inline void store_rne(float* p, VF v) { _mm256_storeu_ps(p, v); }
#endif

// The guard for the line above: a kernel entry point calls it before any bf16 code runs (`op` names the
// kernel in the error). fp32 tensors pass on any CPU.
inline void check_bf16_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() != at::kBFloat16 || (SCALETRAIN_BF16 && __builtin_cpu_supports("avx512bf16")), op,
              ": bf16 needs a CPU with AVX512_BF16");
}

// 2^x in ~10 instructions (ATen's exp_u20 takes ~20, and the softmax loops are bound by it): 2^n * q(f)
// with n = round(x), f = x - n in [-0.5, 0.5], q a degree-5 fit of 2^f (relative error 2.4e-7 in fp32).
// Lanes with x < -126 (masked -inf scores included) give exactly 0, NaN lanes stay NaN (a NaN logit or
// score must reach the loss guard, not count as probability 0); callers keep x <= 127 (their x are
// at most 0, or clamped). Callers fold log2(e) into their FMA.
inline VF exp2_fast(VF x) {
#if SCALETRAIN_BF16
  const VF n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const VF n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const VF f = vsub(x, n);
  VF q = vfmadd(vset(0.00132764f), f, vset(0.00967554f));
  q = vfmadd(q, f, vset(0.05550714f));
  q = vfmadd(q, f, vset(0.2402212f));
  q = vfmadd(q, f, vset(0.69314697f));
  q = vfmadd(q, f, vset(1.00000007f));
#if SCALETRAIN_BF16
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ), q, n);
#else
  // 2^n from its exponent bits (n + 127) << 23; lanes below -126 (n, f NaN for -inf) masked to 0, NaN kept
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const VF scaled = _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(scaled, _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_NLT_UQ));
#endif
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace scaletrain
