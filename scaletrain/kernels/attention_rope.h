// RoPE inside the CPU attention kernel (cpu_attention.cpp): the rotation of q and k on their way into the
// GEMMs, and its adjoint on the gradients. Compiled for avx512bf16 like the kernel.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "attention_panels.h"  // transpose
#include "vec_utils.h"

#pragma GCC push_options
#pragma GCC target("avx512bf16")

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
      for (int64_t d = 0; d < h; d += 16) {
        const __m512 x1 = scaletrain::load16(xr + d), x2 = scaletrain::load16(xr + d + h);
        store_rne(o + d, _mm512_fmsub_ps(x1, scaletrain::load16(c + d), _mm512_mul_ps(x2, scaletrain::load16(s + d))));
        store_rne(o + d + h, _mm512_fmadd_ps(x2, scaletrain::load16(c + d + h), _mm512_mul_ps(x1, scaletrain::load16(s + d + h))));
      }
    }
  }
  // The adjoint on one fp32 row g (position t), in place.
  void unrotate(float* g, int64_t t) const {
    const int64_t h = D / 2;
    const E *c = cos + t * D, *s = sin + t * D;
    for (int64_t d = 0; d < h; d += 16) {
      const __m512 g1 = _mm512_loadu_ps(g + d), g2 = _mm512_loadu_ps(g + d + h);
      _mm512_storeu_ps(g + d, _mm512_fmadd_ps(g1, scaletrain::load16(c + d), _mm512_mul_ps(g2, scaletrain::load16(s + d + h))));
      _mm512_storeu_ps(g + d + h, _mm512_fmsub_ps(g2, scaletrain::load16(c + d + h), _mm512_mul_ps(g1, scaletrain::load16(s + d))));
    }
  }
  // The tables in fp32, transposed to [D, T] for unrotate_transposed (done once per backward call).
  void transposed_tables(int64_t T, std::vector<float>& cos_t, std::vector<float>& sin_t) const {
    std::vector<float> wide(T * D);
    for (auto [table, out] : {std::pair{cos, &cos_t}, std::pair{sin, &sin_t}}) {
      for (int64_t i = 0; i < T * D; i += 16) _mm512_storeu_ps(&wide[i], scaletrain::load16(table + i));
      out->resize(D * T);
      transpose(wide.data(), T, D, D, out->data(), T);
    }
  }
  // The adjoint on a transposed accumulator gt [D, ld] (column t = position t < T), in place; ct, st: the
  // tables transposed to fp32 [D, T] once per call, so 16 positions load as one vector.
  static void unrotate_transposed(float* gt, int64_t D, int64_t T, int64_t ld, const float* ct, const float* st) {
    const int64_t h = D / 2;
    for (int64_t d = 0; d < h; ++d) {
      float *g1 = gt + d * ld, *g2 = gt + (d + h) * ld;
      const float *c1 = ct + d * T, *c2 = ct + (d + h) * T, *s1 = st + d * T, *s2 = st + (d + h) * T;
      int64_t t = 0;
      for (; t + 16 <= T; t += 16) {
        const __m512 a = _mm512_loadu_ps(g1 + t), b = _mm512_loadu_ps(g2 + t);
        _mm512_storeu_ps(g1 + t, _mm512_fmadd_ps(a, _mm512_loadu_ps(c1 + t), _mm512_mul_ps(b, _mm512_loadu_ps(s2 + t))));
        _mm512_storeu_ps(g2 + t, _mm512_fmsub_ps(b, _mm512_loadu_ps(c2 + t), _mm512_mul_ps(a, _mm512_loadu_ps(s1 + t))));
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

#pragma GCC pop_options
