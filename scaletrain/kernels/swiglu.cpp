// SwiGLU's elementwise part on CPU (AVX-512: bf16 or fp32; AVX2: fp32), forward and backward:
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
// one-instruction VCVTNEPS2BF16 (vec_utils.h's store_rne); the fp32 path executes no bf16 instruction and runs on any
// CPU of the build's ISA (AVX-512, or AVX2 in the build without bf16).
#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

namespace {

using at::BFloat16;
using namespace scaletrain;  // the vector layer (vec_utils.h)

// 1 / (1 + e^-g) to ~1 ulp of fp32 in spirit: exp2_fast is within 2.4e-7, vrecip within ~1e-8.
// The exponent is clamped at 126 so 1 + 2^x stays finite (g < -87 gives ~1e-38 instead of ~e^g: below
// any bf16 or normal fp32 gradient that matters).
inline VF sigmoid(VF g) {
  const VF x = vmin(vmul(g, vset(-kLog2e)), vset(126.f));
  return vrecip(vadd(vset(1.f), exp2_fast(x)));
}

inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

template <typename T>
void forward_range(const T* g, const T* u, T* h, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const VF gv = vload(g + i);
    store_rne(h + i, vmul(vmul(gv, sigmoid(gv)), vload(u + i)));
  }
  for (; i < end; ++i) {
    const float gf = static_cast<float>(g[i]);
    h[i] = static_cast<T>(gf * sigmoid(gf) * static_cast<float>(u[i]));
  }
}

template <typename T>
void backward_range(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t begin, int64_t end) {
  const VF one = vset(1.f);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const VF gv = vload(g + i), dhv = vload(dh + i), s = sigmoid(gv);
    const VF dh_s = vmul(dhv, s);
    store_rne(du + i, vmul(dh_s, gv));
    // 1 + g (1 - s) = g - g s + 1
    const VF slope = vfnmadd(gv, s, vadd(gv, one));
    store_rne(dg + i, vmul(vmul(dh_s, vload(u + i)), slope));
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

#if SCALETRAIN_BF16
#pragma GCC pop_options
#endif

at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u) {
  check({&g, &u});
  auto h = at::empty_like(g);
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
#if SCALETRAIN_BF16
    if (g.scalar_type() == at::kBFloat16)
      return forward_range(g.data_ptr<BFloat16>(), u.data_ptr<BFloat16>(), h.data_ptr<BFloat16>(), begin, end);
#endif
    forward_range(g.data_ptr<float>(), u.data_ptr<float>(), h.data_ptr<float>(), begin, end);
  });
  return h;
}

std::vector<at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check({&dh, &g, &u});
  auto dg = at::empty_like(g), du = at::empty_like(u);
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
#if SCALETRAIN_BF16
    if (g.scalar_type() == at::kBFloat16)
      return backward_range(dh.data_ptr<BFloat16>(), g.data_ptr<BFloat16>(), u.data_ptr<BFloat16>(),
                            dg.data_ptr<BFloat16>(), du.data_ptr<BFloat16>(), begin, end);
#endif
    backward_range(dh.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(), dg.data_ptr<float>(),
                   du.data_ptr<float>(), begin, end);
  });
  return {dg, du};
}
