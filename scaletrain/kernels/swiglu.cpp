// SwiGLU's elementwise part on AVX-512 CPUs, forward and backward, bf16 or fp32:
//   forward   s = sigmoid(g)    h = g s u
//   backward  dg = dh u s (1 + g (1 - s))    du = dh g s
//
// Why: inductor's fused kernels compute sigmoid with Sleef's exp and a division, and its backward computes
// exp(-g) twice; both run at a fraction of the memory bandwidth (compute-bound on exp). Here
// sigmoid(g) = 1 / (1 + 2^(-g log2 e)) through exp2_fast (vec_utils.h) and a reciprocal estimate refined by
// one Newton step, each element loaded once and each result stored once (issue 6; numbers in the README).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "vec_utils.h"

// bf16 runs only where the CPU has AVX512_BF16 (kernels/swiglu.py checks), so results round to bf16 by the
// one-instruction VCVTNEPS2BF16 (vec_utils.h's store_rne); the fp32 path executes no bf16 instruction and runs on any AVX-512 CPU.
#pragma GCC push_options
#pragma GCC target("avx512bf16")

namespace {

using at::BFloat16;
using scaletrain::load16;
using scaletrain::store_rne;

// 1 / (1 + e^-g) to ~1 ulp of fp32 in spirit: exp2_fast is within 2.4e-7, rcp14 + Newton within ~1e-8.
// The exponent is clamped at 126 so 1 + 2^x stays finite (g < -87 gives ~1e-38 instead of ~e^g: below
// any bf16 or normal fp32 gradient that matters).
inline __m512 sigmoid(__m512 g) {
  const __m512 x = _mm512_min_ps(_mm512_mul_ps(g, _mm512_set1_ps(-scaletrain::kLog2e)), _mm512_set1_ps(126.f));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), scaletrain::exp2_fast(x));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));  // r (2 - d r)
}

inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

template <typename T>
void forward_range(const T* g, const T* u, T* h, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 gv = load16(g + i);
    store_rne(h + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), load16(u + i)));
  }
  for (; i < end; ++i) {
    const float gf = static_cast<float>(g[i]);
    h[i] = static_cast<T>(gf * sigmoid(gf) * static_cast<float>(u[i]));
  }
}

template <typename T>
void backward_range(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t begin, int64_t end) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 gv = load16(g + i), dhv = load16(dh + i), s = sigmoid(gv);
    const __m512 dh_s = _mm512_mul_ps(dhv, s);
    store_rne(du + i, _mm512_mul_ps(dh_s, gv));
    // 1 + g (1 - s) = g - g s + 1
    const __m512 slope = _mm512_fnmadd_ps(gv, s, _mm512_add_ps(gv, one));
    store_rne(dg + i, _mm512_mul_ps(_mm512_mul_ps(dh_s, load16(u + i)), slope));
  }
  for (; i < end; ++i) {
    const float gf = static_cast<float>(g[i]), s = sigmoid(gf), dh_s = static_cast<float>(dh[i]) * s;
    du[i] = static_cast<T>(dh_s * gf);
    dg[i] = static_cast<T>(dh_s * static_cast<float>(u[i]) * (1.f + gf * (1.f - s)));
  }
}

void check(std::initializer_list<const at::Tensor*> xs) {
  const at::Tensor& first = **xs.begin();
  for (const auto* x : xs) {
    TORCH_CHECK(x->scalar_type() == first.scalar_type() &&
                    (x->scalar_type() == at::kBFloat16 || x->scalar_type() == at::kFloat),
                "swiglu: bf16 or fp32 tensors, all of one dtype");
    TORCH_CHECK(x->is_contiguous() && x->sizes() == first.sizes(), "swiglu: contiguous tensors of one shape");
  }
  scaletrain::check_bf16_cpu(first, "swiglu");
}

constexpr int64_t kGrain = 1 << 14;

}  // namespace

#pragma GCC pop_options

at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u) {
  check({&g, &u});
  auto h = at::empty_like(g);
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (g.scalar_type() == at::kBFloat16)
      forward_range(g.data_ptr<BFloat16>(), u.data_ptr<BFloat16>(), h.data_ptr<BFloat16>(), begin, end);
    else
      forward_range(g.data_ptr<float>(), u.data_ptr<float>(), h.data_ptr<float>(), begin, end);
  });
  return h;
}

std::vector<at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check({&dh, &g, &u});
  auto dg = at::empty_like(g), du = at::empty_like(u);
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (g.scalar_type() == at::kBFloat16)
      backward_range(dh.data_ptr<BFloat16>(), g.data_ptr<BFloat16>(), u.data_ptr<BFloat16>(),
                     dg.data_ptr<BFloat16>(), du.data_ptr<BFloat16>(), begin, end);
    else
      backward_range(dh.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(), dg.data_ptr<float>(),
                     du.data_ptr<float>(), begin, end);
  });
  return {dg, du};
}
