// Causal attention forward and backward on CPU, bf16 (AMX or AVX-512-BF16) and fp32 (AVX-512, or AVX2 in the
// build for CPUs without it), written as small GEMMs through PyTorch's batch-reduce GEMM
// (at::native::cpublas::brgemm: oneDNN's AMX, AVX-512-BF16, AVX-512 or AVX2 fp32 micro-kernels) plus vector
// softmax code (vec_utils.h: 16 lanes on AVX-512, 8 on AVX2).
//
// Why: PyTorch's CPU flash-attention does its GEMMs through a generic bf16 GEMM that uses neither AMX nor
// AVX-512-BF16 dot products; at the bench's shape its backward ran at ~95 GFLOP/s on an AMX Xeon (a quarter
// of the training step, six times its own forward), and on an AVX-512-BF16 EPYC forward and backward took
// 43 % of the step (38 ms vs our 7 ms per layer, fwd+bwd). In fp32 its GEMMs are MKL's, which runs AVX2
// code on AMD CPUs.
//
// Layout: per (batch, kv head) K and V are packed once into 64-column panels (bf16: the VNNI layout the
// micro-kernels read, [K/2][64][2]; fp32: plain [K][64]), K^T and V^T too; every GEMM then reads a slice
// of those. Queries go in blocks of BQ rows (i), keys in chunks of KC (c, up to the causal limit), so the
// working set stays in L2 at any T.
// Forward (online softmax over chunks, as flash attention):
//   S = Q_i K_c^T * scale    m' = max(m, rowmax S)    P = exp(S - m')    l = l e^(m - m') + rowsum P
//   O_i = O_i e^(m - m') + P V_c          at the end O_i /= l, lse_i = m + log l
// Backward (P recomputed exactly from lse; delta = rowsum(dO * O)):
//   dP = dO_i V_c^T    dS = scale * P * (dP - delta)    dQ_i += dS K_c
//   dK_c^T += Q_i^T dS    dV_c^T += dO_i^T P   (dK, dV accumulate transposed so P and dS are the packed
//   operand: no [chunk x block] transpose; the softmax loop writes them into their panels directly)
// exp is 2^x (exp2_fast in vec_utils.h) with log2(e) folded into the scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_panels.h"
#include "attention_rope.h"
#include "vec_utils.h"

// The bf16 kernel runs only on CPUs with AVX512_BF16 (build.py's bf16_ready; every AMX CPU has it too),
// so its tiles are rounded to bf16 by the one-instruction VCVTNEPS2BF16 (vec_utils.h's store_rne). The
// fp32 kernel executes no bf16 instruction and still runs on any AVX-512 CPU (or AVX2 CPU, in that build).
#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

namespace {

using namespace scaletrain;
using namespace scaletrain::attention;

constexpr int64_t kChunk = 256;  // keys per chunk (KC); a multiple of kPanel and of the query block

struct Strides {  // element strides of a [B, H, T, D] view whose D is contiguous
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t ti) const { return bi * b + hi * h + ti * t; }
};
// Causal mask of one row of a [block x chunk] tile: columns past `valid` get -inf (exp gives 0).
void mask_row(float* row, int64_t valid, int64_t width) {
  std::fill(row + valid, row + width, -std::numeric_limits<float>::infinity());
}

void check_inputs(std::initializer_list<const at::Tensor*> xs, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v) {
  for (const auto* x : xs) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type() &&
                    (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
                "cpu attention: bf16 or fp32 tensors, all of one dtype");
    TORCH_CHECK(x->dim() == 4 && x->stride(3) == 1, "cpu attention: [B, H, T, D] with contiguous D");
  }
  scaletrain::check_bf16_cpu(q, "cpu attention");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2), "cpu attention: causal self-attention only (Tq == Tk)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(3) % kPanel == 0 && k.size(0) == q.size(0),
              "cpu attention: head count must divide by kv heads, head size must be a multiple of 64");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(3) == q.size(3), "cpu attention: k and v of one shape, q's head size");
}

template <typename E>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Rope<E>& rope,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KH = k.size(1);
  const int64_t G = H / KH, Tp = round_up(T, kPanel), BQ = kPanel, KC = kChunk;
  const Strides sq(q), sk(k), sv(v), so(out);
  const E *q_p = q.data_ptr<E>(), *k_p = k.data_ptr<E>(), *v_p = v.data_ptr<E>();
  E* o_p = out.data_ptr<E>();
  float* lse_p = lse.data_ptr<float>();
  const float fscale = static_cast<float>(scale), neg_inf = -std::numeric_limits<float>::infinity();
  const bool own = own_layout<E>();

  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    PackedKV<E> kv(D, Tp);
    std::vector<float> s(BQ * KC), o_acc(BQ * D), row_max(BQ), row_sum(BQ);
    std::vector<E> p_tile(BQ * KC), k_rot(rope.on() ? T * D : 0), q_rot(rope.on() ? BQ * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, kh = task % KH;
      const auto [kb, ldk] = rope.apply(k_p + sk.at(b, kh, 0), 0, T, sk.t, k_rot.data());
      kv.transposed(kb, T, ldk, kv.kt);
      kv.rows(v_p + sv.at(b, kh, 0), T, sv.t, kv.v);
      for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
        for (int64_t q0 = 0; q0 < T; q0 += BQ) {
          const int64_t m = std::min(BQ, T - q0), L = q0 + m;
          const auto [qi, ldq] = rope.apply(q_p + sq.at(b, h, q0), q0, m, sq.t, q_rot.data());
          std::fill(row_max.begin(), row_max.end(), neg_inf);
          std::fill(row_sum.begin(), row_sum.end(), 0.f);
          std::fill(o_acc.begin(), o_acc.end(), 0.f);
          for (int64_t k0 = 0; k0 < L; k0 += KC) {
            const int64_t kc = std::min(KC, L - k0), kcp = round_up(kc, kPanel);
            const bool diagonal = ends_on_diagonal(own, m, q0, k0, kcp);
            gemm_to_keys(diagonal, m, kcp, D, qi, ldq, kv.kt.data() + k0 * D, D, s.data(), KC);
            for (int64_t r = 0; r < m; ++r) {
              float* srow = &s[r * KC];
              // Past `live` (the causal limit rounded up to a vector) every score is masked: P is 0 there.
              const int64_t valid = std::clamp<int64_t>(q0 + r + 1 - k0, 0, kc), live = round_up(valid, kLanes);
              mask_row(srow, valid, live);
              VF lanes_max = vset(neg_inf);
              for (int64_t c = 0; c < live; c += kLanes) lanes_max = vmax(lanes_max, vload(srow + c));
              const float mx = std::max(row_max[r], vmaxall(lanes_max) * fscale);
              const float alpha = row_max[r] == neg_inf ? 0.f : std::exp(row_max[r] - mx);
              const VF vscale2 = vset(fscale * kLog2e), vmx2 = vset(mx * kLog2e);
              VF lanes_sum = vzero();
              for (int64_t c = 0; c < live; c += kLanes) {  // exp(s * scale - mx) = 2^(s * scale log2e - mx log2e)
                const VF p = exp2_fast(vfmsub(vload(srow + c), vscale2, vmx2));
                lanes_sum = vadd(lanes_sum, p);
                store_rne(&p_tile[r * KC + c], p);
              }
              for (int64_t c = live; c < kcp; c += kLanes) store_rne(&p_tile[r * KC + c], vzero());
              row_sum[r] = row_sum[r] * alpha + vsum(lanes_sum);
              row_max[r] = mx;
              float* orow = &o_acc[r * D];
              for (int64_t d = 0; d < D; d += kLanes) store_rne(orow + d, vmul(vload(orow + d), vset(alpha)));
            }
            gemm_over_keys(diagonal, m, D, kcp, p_tile.data(), KC, kv.v.data() + k0 * kPanel, Tp, o_acc.data(), D, true);
          }
          E* oi = o_p + so.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) {
            const VF inv = vset(1.f / row_sum[r]);
            for (int64_t d = 0; d < D; d += kLanes) store_rne(oi + r * so.t + d, vmul(vload(&o_acc[r * D + d]), inv));
            lse_p[(b * H + h) * T + q0 + r] = row_max[r] + std::log(row_sum[r]);
          }
        }
      }
    }
    blas::brgemm_release();
  });
}

template <typename E>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, double scale, const Rope<E>& rope, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KH = k.size(1);
  const int64_t G = H / KH, Tp = round_up(T, kPanel), BQ = kPanel, KC = kChunk;
  const Strides sq(q), sk(k), sv(v), so(out), sdo(dout), sdq(dq), sdk(dk), sdv(dv);
  const auto lse_a = lse.accessor<float, 3>();
  const E *q_p = q.data_ptr<E>(), *k_p = k.data_ptr<E>(), *v_p = v.data_ptr<E>();
  const E *o_p = out.data_ptr<E>(), *do_p = dout.data_ptr<E>();
  E *dq_p = dq.data_ptr<E>(), *dk_p = dk.data_ptr<E>(), *dv_p = dv.data_ptr<E>();
  const float fscale = static_cast<float>(scale);
  const bool own = own_layout<E>();  // our panel layouts: P and dS are written into them directly
  const VF vscale = vset(fscale), vscale2 = vset(fscale * kLog2e);
  std::vector<float> cos_t, sin_t;  // the rope tables transposed to fp32 [D, T], for dK^T's adjoint
  if (rope.on()) rope.transposed_tables(T, cos_t, sin_t);

  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    PackedKV<E> kv(D, Tp);
    std::vector<float> dkt(D * Tp), dvt(D * Tp), s(BQ * KC), dp(BQ * KC), dq_acc(BQ * D), delta(BQ);
    std::vector<E> p_tile(own ? 0 : BQ * KC), p_pk(BQ * KC), ds_tile(BQ * KC), ds_pk(BQ * KC), qt(D * BQ),
        dot(D * BQ), k_rot(rope.on() ? T * D : 0), q_rot(rope.on() ? BQ * D : 0);  // p_tile: row-major P, only
                                                                                // where oneDNN packs it (AMX)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, kh = task % KH;
      const auto [kb, ldk] = rope.apply(k_p + sk.at(b, kh, 0), 0, T, sk.t, k_rot.data());
      kv.transposed(kb, T, ldk, kv.kt);
      kv.transposed(v_p + sv.at(b, kh, 0), T, sv.t, kv.vt);
      kv.rows(kb, T, ldk, kv.k);
      std::fill(dkt.begin(), dkt.end(), 0.f);
      std::fill(dvt.begin(), dvt.end(), 0.f);
      for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
        for (int64_t q0 = 0; q0 < T; q0 += BQ) {
          const int64_t m = std::min(BQ, T - q0), mp = round_up(m, kPanel), L = q0 + m;
          const auto [qi, ldq] = rope.apply(q_p + sq.at(b, h, q0), q0, m, sq.t, q_rot.data());
          const E* doi = do_p + sdo.at(b, h, q0);
          const E* oi = o_p + so.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) delta[r] = row_dot(doi + r * sdo.t, oi + r * so.t, D);
          std::fill(dot.begin(), dot.end(), E(0.f));
          std::fill(qt.begin(), qt.end(), E(0.f));
          transpose(doi, m, D, sdo.t, dot.data(), mp);
          transpose(qi, m, D, ldq, qt.data(), mp);
          for (int64_t k0 = 0; k0 < L; k0 += KC) {
            const int64_t kc = std::min(KC, L - k0), kcp = round_up(kc, kPanel);
            const bool diagonal = ends_on_diagonal(own, m, q0, k0, kcp);
            gemm_to_keys(diagonal, m, kcp, D, qi, ldq, kv.kt.data() + k0 * D, D, s.data(), KC);
            gemm_to_keys(diagonal, m, kcp, D, doi, sdo.t, kv.vt.data() + k0 * D, D, dp.data(), KC);
            // P and dS two rows at a time (rows past m are padding: zeros). dS row-major for the dQ GEMM; both
            // into the panels of the dV/dK GEMMs directly, unless oneDNN packs (AMX: its layout, its pack).
            for (int64_t r = 0; r < mp; r += 2) {
              VF vlse2[2], vdelta[2];
              bool valid[2];
              // Past `live` (the pair's causal limit rounded up to a vector) P and dS are 0 for both rows.
              const int64_t live = round_up(std::clamp<int64_t>(q0 + std::min(r + 1, m - 1) + 1 - k0, 0, kc), kLanes);
              for (int64_t i = 0; i < 2; ++i) {
                valid[i] = r + i < m;
                if (!valid[i]) continue;
                mask_row(&s[(r + i) * KC], std::clamp<int64_t>(q0 + r + i + 1 - k0, 0, kc), live);
                vlse2[i] = vset(lse_a[b][h][q0 + r + i] * kLog2e);
                vdelta[i] = vset(delta[r + i]);
              }
              for (int64_t c = 0; c < kcp; c += kLanes) {
                VF p[2], ds[2];
                for (int64_t i = 0; i < 2; ++i) {
                  if (!valid[i] || c >= live) {
                    p[i] = ds[i] = vzero();
                    if (valid[i]) store_rne(&ds_tile[(r + i) * KC + c], ds[i]);
                    continue;
                  }
                  p[i] = exp2_fast(vfmsub(vload(&s[(r + i) * KC + c]), vscale2, vlse2[i]));
                  ds[i] = vmul(vmul(p[i], vsub(vload(&dp[(r + i) * KC + c]), vdelta[i])), vscale);
                  store_rne(&ds_tile[(r + i) * KC + c], ds[i]);
                }
                if (own) {
                  store_pair(p_pk.data(), mp, r, c, p[0], p[1]);
                  store_pair(ds_pk.data(), mp, r, c, ds[0], ds[1]);
                } else {
                  for (int64_t i = 0; i < 2; ++i) {
                    store_rne(&p_tile[(r + i) * KC + c], p[i]);
                    if (!valid[i]) store_rne(&ds_tile[(r + i) * KC + c], ds[i]);
                  }
                }
              }
            }
            gemm_over_keys(diagonal, m, D, kcp, ds_tile.data(), KC, kv.k.data() + k0 * kPanel, Tp, dq_acc.data(), D, k0 > 0);
            if (!own) {
              pack(p_tile.data(), mp, kcp, KC, p_pk.data());
              pack(ds_tile.data(), mp, kcp, KC, ds_pk.data());
            }
            gemm_keys_over_queries(diagonal, D, kcp, mp, dot.data(), mp, p_pk.data(), mp, dvt.data() + k0, Tp);
            gemm_keys_over_queries(diagonal, D, kcp, mp, qt.data(), mp, ds_pk.data(), mp, dkt.data() + k0, Tp);
          }
          E* dqi = dq_p + sdq.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) {
            if (rope.on()) rope.unrotate(&dq_acc[r * D], q0 + r);
            for (int64_t d = 0; d < D; d += kLanes) store_rne(dqi + r * sdq.t + d, vload(&dq_acc[r * D + d]));
          }
        }
      }
      if (rope.on()) Rope<E>::unrotate_transposed(dkt.data(), D, T, Tp, cos_t.data(), sin_t.data());
      store_transposed(dkt.data(), D, T, Tp, dk_p + sdk.at(b, kh, 0), sdk.t);
      store_transposed(dvt.data(), D, T, Tp, dv_p + sdv.at(b, kh, 0), sdv.t);
    }
    blas::brgemm_release();
  });
}

}  // namespace

#if SCALETRAIN_BF16
#pragma GCC pop_options
#endif

namespace {

// The rope tables as the kernel reads them, or no rotation when absent.
template <typename E>
Rope<E> rope_tables(const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, const at::Tensor& q) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cpu attention: rope needs both cos and sin");
  if (!cos.has_value()) return {};
  for (const auto* t : {&*cos, &*sin})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->dim() == 2 && t->size(0) == q.size(2) &&
                    t->size(1) == q.size(3) && t->is_contiguous(),
                "cpu attention: rope tables [T, D], contiguous, in q's dtype");
  return {cos->data_ptr<E>(), sin->data_ptr<E>(), q.size(3)};
}

}  // namespace

// cos/sin (optional, [T, D] in q's dtype): q and k are rotated inside (RoPE), and the gradients come back
// w.r.t. the unrotated q and k.
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          double scale, const c10::optional<at::Tensor>& cos,
                                          const c10::optional<at::Tensor>& sin) {
  check_inputs({&q, &k, &v}, q, k, v);
  // Outputs and gradients in their inputs' layout (empty_like keeps a dense tensor's strides): the model's
  // q, k, v are [B, T, heads, D] memory seen as [B, heads, T, D], so neither the output nor the gradients
  // need a transposing copy on their way to or from a linear layer, and contiguous inputs get contiguous ones.
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
#if SCALETRAIN_BF16
  if (q.scalar_type() == at::kBFloat16) {
    forward_impl<BFloat16>(q, k, v, scale, rope_tables<BFloat16>(cos, sin, q), out, lse);
    return {out, lse};
  }
#endif
  forward_impl<float>(q, k, v, scale, rope_tables<float>(cos, sin, q), out, lse);
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           double scale, const c10::optional<at::Tensor>& cos,
                                           const c10::optional<at::Tensor>& sin) {
  check_inputs({&dout, &q, &k, &v, &out}, q, k, v);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "cpu attention backward: [B, H, T] float32 lse");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
#if SCALETRAIN_BF16
  if (q.scalar_type() == at::kBFloat16) {
    backward_impl<BFloat16>(dout, q, k, v, out, lse, scale, rope_tables<BFloat16>(cos, sin, q), dq, dk, dv);
    return {dq, dk, dv};
  }
#endif
  backward_impl<float>(dout, q, k, v, out, lse, scale, rope_tables<float>(cos, sin, q), dq, dk, dv);
  return {dq, dk, dv};
}

// For tests: [k, n] bf16 (k even, n % 64 == 0) in the panel layout the GEMMs read, packed by oneDNN or by us.
at::Tensor pack_panels(const at::Tensor& x, bool onednn) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() && x.size(0) % 2 == 0 &&
              x.size(1) % kPanel == 0, "pack_panels: contiguous bf16 [k, n], k even, n a multiple of 64");
  TORCH_CHECK(!onednn || blas::could_pack(at::kBFloat16), "pack_panels: oneDNN packs only on AMX CPUs");
  TORCH_CHECK(SCALETRAIN_BF16, "pack_panels: the AVX2 build has no bf16 kernels");
  auto out = at::empty_like(x);
#if SCALETRAIN_BF16
  pack(x.data_ptr<BFloat16>(), x.size(0), x.size(1), x.size(1), out.data_ptr<BFloat16>(), onednn);
#endif
  return out;
}
