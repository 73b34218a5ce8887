// RoPE inside the CPU attention kernel (cpu_attention.cpp): the rotation of q and k on their way into the
// GEMMs, and its adjoint on the gradients. Compiled for avx512bf16 like the kernel (in the AVX-512 build).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "attention_panels.h"  // transpose
#include "vec_utils.h"

#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

namespace scaletrain::attention {

// RoPE (rotate-half form) inside the kernel, so the model passes q and k before rotation and no rotated copy
// of them goes through memory: x_rot[d] = x[d] c[d] - x[d + h] s[d], x_rot[d + h] = x[d + h] c[d + h] + x[d] s[d + h]
// for d < h = D/2, with the model's tables c, s [T, D] (in the compute dtype, as the model multiplies them).
// Its adjoint turns the gradient w.r.t. x_rot into the one w.r.t. x (in fp32, before rounding):
//   dx[d] = g[d] c[d] + g[d + h] s[d + h]        dx[d + h] = g[d + h] c[d + h] - g[d] s[d]
template <typename E>
struct Rope {
  const E* cos = nullptr;  // null: no rotation
  const E* sin = nullptr;
  int64_t D = 0;
  bool on() const { return cos != nullptr; }
  // n rows of x from position t0 as the GEMMs should read them: rotated into `scratch` where rope is on.
  // Returns where to read and the row stride.
  std::pair<const E*, int64_t> apply(const E* x, int64_t t0, int64_t n, int64_t ld, E* scratch) const {
    if (!on()) return {x, ld};
    rotate(x, t0, n, ld, scratch);
    return {scratch, D};
  }
  // n rows of x (row stride ld) starting at position t0, rotated into out (row stride D).
  void rotate(const E* x, int64_t t0, int64_t n, int64_t ld, E* out) const {
    const int64_t h = D / 2;
    for (int64_t r = 0; r < n; ++r) {
      const E *xr = x + r * ld, *c = cos + (t0 + r) * D, *s = sin + (t0 + r) * D;
      E* o = out + r * D;
      for (int64_t d = 0; d < h; d += kLanes) {
        const VF x1 = vload(xr + d), x2 = vload(xr + d + h);
        store_rne(o + d, vfmsub(x1, vload(c + d), vmul(x2, vload(s + d))));
        store_rne(o + d + h, vfmadd(x2, vload(c + d + h), vmul(x1, vload(s + d + h))));
      }
    }
  }
  // The adjoint on one fp32 row g (position t), in place.
  void unrotate(float* g, int64_t t) const {
    const int64_t h = D / 2;
    const E *c = cos + t * D, *s = sin + t * D;
    for (int64_t d = 0; d < h; d += kLanes) {
      const VF g1 = vload(g + d), g2 = vload(g + d + h);
      store_rne(g + d, vfmadd(g1, vload(c + d), vmul(g2, vload(s + d + h))));
      store_rne(g + d + h, vfmsub(g2, vload(c + d + h), vmul(g1, vload(s + d))));
    }
  }
  // The tables in fp32, transposed to [D, T] for unrotate_transposed (done once per backward call).
  void transposed_tables(int64_t T, std::vector<float>& cos_t, std::vector<float>& sin_t) const {
    std::vector<float> wide(T * D);
    for (auto [table, out] : {std::pair{cos, &cos_t}, std::pair{sin, &sin_t}}) {
      for (int64_t i = 0; i < T * D; i += kLanes) store_rne(&wide[i], vload(table + i));
      out->resize(D * T);
      transpose(wide.data(), T, D, D, out->data(), T);
    }
  }
  // The adjoint on a transposed accumulator gt [D, ld] (column t = position t < T), in place; ct, st: the
  // tables transposed to fp32 [D, T] once per call, so kLanes positions load as one vector.
  static void unrotate_transposed(float* gt, int64_t D, int64_t T, int64_t ld, const float* ct, const float* st) {
    const int64_t h = D / 2;
    for (int64_t d = 0; d < h; ++d) {
      float *g1 = gt + d * ld, *g2 = gt + (d + h) * ld;
      const float *c1 = ct + d * T, *c2 = ct + (d + h) * T, *s1 = st + d * T, *s2 = st + (d + h) * T;
      int64_t t = 0;
      for (; t + kLanes <= T; t += kLanes) {
        const VF a = vload(g1 + t), b = vload(g2 + t);
        store_rne(g1 + t, vfmadd(a, vload(c1 + t), vmul(b, vload(s2 + t))));
        store_rne(g2 + t, vfmsub(b, vload(c2 + t), vmul(a, vload(s1 + t))));
      }
      for (; t < T; ++t) {
        const float a = g1[t], b = g2[t];
        g1[t] = a * c1[t] + b * s2[t];
        g2[t] = b * c2[t] - a * s1[t];
      }
    }
  }
};

}  // namespace scaletrain::attention

#if SCALETRAIN_BF16
#pragma GCC pop_options
#endif
