// Causal attention backward for bf16 on CPUs with AMX, written as small GEMMs through PyTorch's own
// batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's AMX micro-kernels).
//
// Why: PyTorch's CPU flash-attention backward does its GEMMs through a generic bf16 GEMM that does not
// use AMX; at the bench's shape it ran at ~95 GFLOP/s and took a quarter of the training step, six times
// its own forward. The forward (PyTorch's, which does use AMX) is kept; this file replaces the backward.
//
// Per (batch, kv head) and per block of BQ query rows i, with L = the causal key prefix of the block:
//   S  = Q_i K[:L]^T            P  = exp(scale*S - lse_i)           (recomputed, exact: lse from forward)
//   dP = dO_i V[:L]^T           dS = scale * P * (dP - delta_i)     delta = rowsum(dO * O)
//   dQ_i = dS K[:L]             dK[:L]^T += Q_i^T dS                dV[:L]^T += dO_i^T P
// Every GEMM reads a *prefix* of a whole-sequence operand packed once per (batch, kv head) into the
// VNNI layout AMX wants ([K/2][N][2]); dK and dV are accumulated transposed (D x T) so that P and dS are
// the packed operand and no T x BQ transpose is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "vec_utils.h"

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace blas = at::native::cpublas;

// oneDNN's packing writes B in panels at most 64 columns wide (its `out_ld` must be 16/32/48/64), so every
// packed operand is a row of 64-column panels, each [K/2][64][2], and sequences are padded to 64.
constexpr int64_t kPanel = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out[c * ld_out + r] = in[r * ld_in + c] for r < rows, c < cols, in 32 x 32 AVX-512 tiles.
void transpose(const BFloat16* in, int64_t rows, int64_t cols, int64_t ld_in, BFloat16* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; r += 32)
    for (int64_t c = 0; c < cols; c += 32)
      at::vec::transpose_mxn<BFloat16>(in + r * ld_in + c, ld_in, out + c * ld_out + r, ld_out,
                                       std::min<int64_t>(32, rows - r), std::min<int64_t>(32, cols - c));
}

float row_dot(const BFloat16* a, const BFloat16* b, int64_t n) {  // n % 16 == 0
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(scaletrain::load16(a + i), scaletrain::load16(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// Row-major [k, n] (leading dimension ld) -> n / 64 VNNI panels; panel j starts at out + j * k * 64.
void pack(const BFloat16* in, int64_t k, int64_t n, int64_t ld, BFloat16* out) {
  for (int64_t j = 0; j < n; j += kPanel)
    blas::pack(k, kPanel, ld, kPanel, at::kBFloat16, at::kBFloat16, in + j, out + j * k);
}

// C[m, :n] (+)= A[m, :k] B[:k, :n] with B packed by `pack` from a matrix of `rows` rows (k <= rows: a prefix).
void gemm(int64_t m, int64_t n, int64_t k, const BFloat16* a, int64_t lda, const BFloat16* b_packed, int64_t rows,
          float* c, int64_t ldc, bool add) {
  for (int64_t j = 0; j < n; j += kPanel)
    blas::brgemm(m, kPanel, k, lda, kPanel, ldc, add, a, b_packed + j * rows, c + j);
}

struct Strides {  // element strides of a [B, H, T, D] view whose D is contiguous
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t ti) const { return bi * b + hi * h + ti * t; }
};

}  // namespace

std::vector<at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           double scale, int64_t block) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  dout.scalar_type() == at::kBFloat16,
              "amx attention backward: bf16 tensors only");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "amx attention backward: lse must be float32");
  for (const auto* x : {&dout, &q, &k, &v, &out})
    TORCH_CHECK(x->dim() == 4 && x->stride(3) == 1, "amx attention backward: [B, H, T, D] with contiguous D");
  TORCH_CHECK(block % kPanel == 0, "block must be a multiple of ", kPanel);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KH = k.size(1);
  TORCH_CHECK(k.size(2) == T && v.size(2) == T, "amx attention backward: causal self-attention only (Tq == Tk)");
  TORCH_CHECK(H % KH == 0 && D % kPanel == 0, "amx attention backward: head size must be a multiple of 64");
  const int64_t G = H / KH, Tp = round_up(T, kPanel), BQ = std::min(block, Tp);

  auto dq = at::empty({B, H, T, D}, q.options());
  auto dk = at::empty({B, KH, T, D}, k.options());
  auto dv = at::empty({B, KH, T, D}, v.options());
  const Strides sq(q), sk(k), sv(v), so(out), sdo(dout), sdq(dq), sdk(dk);
  const auto lse_a = lse.accessor<float, 3>();
  const BFloat16 *q_p = q.data_ptr<BFloat16>(), *k_p = k.data_ptr<BFloat16>(), *v_p = v.data_ptr<BFloat16>();
  const BFloat16 *o_p = out.data_ptr<BFloat16>(), *do_p = dout.data_ptr<BFloat16>();
  BFloat16 *dq_p = dq.data_ptr<BFloat16>(), *dk_p = dk.data_ptr<BFloat16>(), *dv_p = dv.data_ptr<BFloat16>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    // Whole-sequence packed operands (per kv head) and per-block scratch, reused across tasks.
    std::vector<BFloat16> tmp(std::max(D * Tp, Tp * D)), kt_pk(D * Tp), vt_pk(D * Tp), k_pk(Tp * D);
    std::vector<float> dkt(D * Tp), dvt(D * Tp), s(BQ * Tp), dp(BQ * Tp), dq_acc(BQ * D), delta(BQ);
    std::vector<BFloat16> p_bf(BQ * Tp), p_pk(BQ * Tp), ds_bf(BQ * Tp), ds_pk(BQ * Tp), qt(D * BQ), dot(D * BQ);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, kh = task % KH;
      const BFloat16* kb = k_p + sk.at(b, kh, 0);
      const BFloat16* vb = v_p + sv.at(b, kh, 0);
      // K^T and V^T as [D, Tp] (zero past T), K as [Tp, D]; then VNNI-pack each.
      std::fill(tmp.begin(), tmp.end(), BFloat16(0.f));
      transpose(kb, T, D, sk.t, tmp.data(), Tp);
      pack(tmp.data(), D, Tp, Tp, kt_pk.data());
      transpose(vb, T, D, sv.t, tmp.data(), Tp);
      pack(tmp.data(), D, Tp, Tp, vt_pk.data());
      std::fill(tmp.begin(), tmp.end(), BFloat16(0.f));
      for (int64_t t = 0; t < T; ++t) std::memcpy(&tmp[t * D], kb + t * sk.t, D * sizeof(BFloat16));
      pack(tmp.data(), Tp, D, D, k_pk.data());
      std::fill(dkt.begin(), dkt.end(), 0.f);
      std::fill(dvt.begin(), dvt.end(), 0.f);

      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        for (int64_t q0 = 0; q0 < T; q0 += BQ) {
          const int64_t m = std::min(BQ, T - q0), mp = round_up(m, kPanel);
          const int64_t L = q0 + m, Lp = round_up(L, kPanel);
          const BFloat16* qi = q_p + sq.at(b, h, q0);
          const BFloat16* doi = do_p + sdo.at(b, h, q0);
          const BFloat16* oi = o_p + so.at(b, h, q0);

          gemm(m, Lp, D, qi, sq.t, kt_pk.data(), D, s.data(), Tp, false);
          gemm(m, Lp, D, doi, sdo.t, vt_pk.data(), D, dp.data(), Tp, false);
          for (int64_t r = 0; r < m; ++r) delta[r] = row_dot(doi + r * sdo.t, oi + r * so.t, D);
          for (int64_t r = 0; r < mp; ++r) {
            float* srow = &s[r * Tp];
            float* dprow = &dp[r * Tp];
            const int64_t valid = r < m ? q0 + r + 1 : 0;  // causal: keys 0..q0+r
            const Vec vscale(fscale), vlse(r < m ? lse_a[b][h][q0 + r] : 0.f), vdelta(r < m ? delta[r] : 0.f);
            for (int64_t c = 0; c < valid; c += Vec::size()) {
              const int64_t n = std::min<int64_t>(Vec::size(), valid - c);
              const Vec p = (Vec::loadu(srow + c, n) * vscale - vlse).exp_u20();
              const Vec ds = p * (Vec::loadu(dprow + c, n) - vdelta) * vscale;
              p.store(srow + c, n);
              ds.store(dprow + c, n);
            }
            std::fill(srow + valid, srow + Lp, 0.f);
            std::fill(dprow + valid, dprow + Lp, 0.f);
            at::vec::convert(srow, &p_bf[r * Tp], Lp);
            at::vec::convert(dprow, &ds_bf[r * Tp], Lp);
          }
          // dQ_i = dS K[:Lp]
          gemm(m, D, Lp, ds_bf.data(), Tp, k_pk.data(), Tp, dq_acc.data(), D, false);
          BFloat16* dqi = dq_p + sdq.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) at::vec::convert(&dq_acc[r * D], dqi + r * sdq.t, D);
          // dV^T[:, :Lp] += dO_i^T P ; dK^T[:, :Lp] += Q_i^T dS
          std::fill(dot.begin(), dot.end(), BFloat16(0.f));
          std::fill(qt.begin(), qt.end(), BFloat16(0.f));
          transpose(doi, m, D, sdo.t, dot.data(), mp);
          transpose(qi, m, D, sq.t, qt.data(), mp);
          pack(p_bf.data(), mp, Lp, Tp, p_pk.data());
          pack(ds_bf.data(), mp, Lp, Tp, ds_pk.data());
          gemm(D, Lp, mp, dot.data(), mp, p_pk.data(), mp, dvt.data(), Tp, true);
          gemm(D, Lp, mp, qt.data(), mp, ds_pk.data(), mp, dkt.data(), Tp, true);
        }
      }
      at::vec::convert(dkt.data(), tmp.data(), D * Tp);
      transpose(tmp.data(), D, T, Tp, dk_p + sdk.at(b, kh, 0), sdk.t);
      at::vec::convert(dvt.data(), tmp.data(), D * Tp);
      transpose(tmp.data(), D, T, Tp, dv_p + sdk.at(b, kh, 0), sdk.t);
    }
    blas::brgemm_release();
  });
  return {dq, dk, dv};
}
