// 16-lane fp32 loads and stores from/to bf16 or fp32 memory (AVX-512), shared by the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace scaletrain {

inline __m512 load16(const c10::BFloat16* p) {  // a bf16 is the high half of an fp32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// 16 fp32 lanes to memory in the kernel's element type, rounding to nearest even for bf16 with AVX512_BF16's
// one-instruction VCVTNEPS2BF16 (a portable AVX-512F rounding takes eight and was ~a fifth of the
// cross-entropy kernel). Only code compiled for avx512bf16 can inline the bf16 one, and it runs only where
// the CPU has it (each kernel's Python side checks); the fp32 one runs on any AVX-512 CPU.
#pragma GCC push_options
#pragma GCC target("avx512bf16")
inline void store_rne(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#pragma GCC pop_options
inline void store_rne(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// The guard for the line above: a kernel entry point calls it before any bf16 code runs (`op` names the
// kernel in the error). fp32 tensors pass on any CPU.
inline void check_bf16_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() != at::kBFloat16 || __builtin_cpu_supports("avx512bf16"), op,
              ": bf16 needs a CPU with AVX512_BF16");
}

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
