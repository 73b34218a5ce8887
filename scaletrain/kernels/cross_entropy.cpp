// Softmax cross-entropy of one chunk of logits and its gradient, one row at a time, in place.
//
// Why: the chunked linear+CE (model/loss.py) spent more time on the softmax than on its matmul: compiled,
// it streamed a [chunk, vocab] fp32 copy of the logits through memory several times (max, sum, exp,
// scatter, scale, cast). A row of logits (vocab 8192 in bf16 = 16 KB) fits in L1, so here each row is
// read from memory once and written once: pass 1 max, pass 2 exp (kept in an fp32 scratch row, so each
// element's exp is computed once) and their sum, pass 3 the gradient from the scratch row.
//   loss[r] = lse_r - x[r, t_r]                 (fp32; the caller masks ignored rows)
//   grad[r] = (softmax(x[r]) - onehot(t_r)) * w[r], rounded to the logits' dtype
// with w = valid / count, so grad is d(mean CE)/d logits exactly as the fp32 log-softmax backward gives it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "vec_utils.h"

// bf16 runs only where the CPU has AVX512_BF16 (kernels/cross_entropy.py checks), so gradients round to bf16
// by the one-instruction VCVTNEPS2BF16 (vec_utils.h's store_rne); fp32 executes no bf16
// instruction and runs on any CPU of the build's ISA (AVX-512, or AVX2 in the build without bf16).
#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

namespace {

using at::BFloat16;
using namespace scaletrain;  // the vector layer (vec_utils.h)

// In place: row r of `logits` becomes its gradient. `e` is scratch for one row's exp(x - max), fp32.
template <typename T>
void rows(T* logits, const int64_t* targets, const float* weight, float* loss, int64_t begin, int64_t end,
          int64_t V, float* e) {
  const int64_t Vv = V / kLanes * kLanes;
  for (int64_t r = begin; r < end; ++r) {
    T* x = logits + r * V;
    VF lanes_max = vset(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < Vv; c += kLanes) lanes_max = vmax(lanes_max, vload(x + c));
    float mx = vmaxall(lanes_max);
    for (int64_t c = Vv; c < V; ++c) mx = std::max(mx, static_cast<float>(x[c]));
    const VF vlog2e = vset(kLog2e), vmx2 = vset(mx * kLog2e);
    VF lanes_sum = vzero();
    for (int64_t c = 0; c < Vv; c += kLanes) {  // exp(x - mx) = 2^(x log2e - mx log2e)
      const VF p = exp2_fast(vfmsub(vload(x + c), vlog2e, vmx2));
      store_rne(e + c, p);
      lanes_sum = vadd(lanes_sum, p);
    }
    float sum = vsum(lanes_sum);
    for (int64_t c = Vv; c < V; ++c) sum += (e[c] = std::exp(static_cast<float>(x[c]) - mx));
    const int64_t t = targets[r];
    const float w = weight[r], inv = w / sum;
    loss[r] = mx + std::log(sum) - static_cast<float>(x[t]);
    const VF vinv = vset(inv);
    for (int64_t c = 0; c < Vv; c += kLanes) store_rne(x + c, vmul(vload(e + c), vinv));
    for (int64_t c = Vv; c < V; ++c) x[c] = static_cast<T>(e[c] * inv);
    x[t] = static_cast<T>((e[t] / sum - 1.f) * w);
  }
}

}  // namespace

#if SCALETRAIN_BF16
#pragma GCC pop_options
#endif

// Overwrites `logits` with the gradient (a fresh [chunk, vocab] buffer would cost its page faults each
// time) and returns the per-row loss.
at::Tensor softmax_cross_entropy_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weight) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "softmax_cross_entropy: contiguous [n, V] logits");
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat,
              "softmax_cross_entropy: bf16 or fp32 logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "softmax_cross_entropy: int64 targets and fp32 weights, contiguous");
  scaletrain::check_bf16_cpu(logits, "softmax_cross_entropy");
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.numel() == n && weight.numel() == n, "softmax_cross_entropy: one target and weight per row");
  TORCH_CHECK(n == 0 || (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < V),
              "softmax_cross_entropy: targets must lie in [0, vocab)");
  auto loss = at::empty({n}, logits.options().dtype(at::kFloat));
  const int64_t* t = targets.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V);
#if SCALETRAIN_BF16
    if (logits.scalar_type() == at::kBFloat16)
      return rows(logits.data_ptr<BFloat16>(), t, w, loss.data_ptr<float>(), begin, end, V, e.data());
#endif
    rows(logits.data_ptr<float>(), t, w, loss.data_ptr<float>(), begin, end, V, e.data());
  });
  return loss;
}
