// Causal attention forward and backward on AVX-512 CPUs, bf16 (AMX or AVX-512-BF16) and fp32, written as
// small GEMMs through PyTorch's batch-reduce GEMM (at::native::cpublas::brgemm: oneDNN's AMX, AVX-512-BF16
// or AVX-512 fp32 micro-kernels) plus AVX-512 softmax code.
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

#include "vec_utils.h"

// The bf16 kernel runs only on CPUs with AVX512_BF16 (build.py's attention_ready; every AMX CPU has it too),
// so its tiles are rounded to bf16 by the one-instruction VCVTNEPS2BF16 (vec_utils.h's store_rne). The
// fp32 kernel executes no bf16 instruction and still runs on any AVX-512 CPU.
#pragma GCC push_options
#pragma GCC target("avx512bf16")

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace blas = at::native::cpublas;
using scaletrain::store_rne;

// oneDNN's packing writes B in panels at most 64 columns wide (its `out_ld` must be 16/32/48/64), so every
// packed operand is a row of 64-column panels, each [K/2][64][2], and sequences are padded to 64.
constexpr int64_t kPanel = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out[c * ld_out + r] = in[r * ld_in + c] for r < rows, c < cols: AVX-512 16 x 16 tiles (the 32 x 32 kernel
// spilled its 64 registers and was 2x slower per element), masked tiles at the edges.
template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, int64_t ld_in, T* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16) {
      const T* from = in + r * ld_in + c;
      T* to = out + c * ld_out + r;
      if (r + 16 <= rows && c + 16 <= cols)
        at::vec::transpose_mxn<T, 16, 16>(from, ld_in, to, ld_out);
      else
        at::vec::transpose_mxn<T>(from, ld_in, to, ld_out, std::min<int64_t>(16, rows - r),
                                         std::min<int64_t>(16, cols - c));
    }
}

// out[c * ld_out + r] = in[r * ld_in + c] rounded to E, for r < rows, c < cols: the fp32 dK^T / dV^T
// accumulators into dK / dV in one pass (16 x 16 tiles transposed in registers, each output row rounded and
// stored as it leaves), instead of a conversion pass and a bf16 transpose pass.
template <typename E>
void store_transposed(const float* in, int64_t rows, int64_t cols, int64_t ld_in, E* out, int64_t ld_out) {
  alignas(64) float tile[16 * 16];
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r), nc = std::min<int64_t>(16, cols - c);
      if (nr == 16 && nc == 16)
        at::vec::transpose_mxn<float, 16, 16>(in + r * ld_in + c, ld_in, tile, 16);
      else
        at::vec::transpose_mxn<float>(in + r * ld_in + c, ld_in, tile, 16, nr, nc);
      for (int64_t j = 0; j < nc; ++j) {
        E* to = out + (c + j) * ld_out + r;
        if (nr == 16) {
          store_rne(to, _mm512_load_ps(tile + j * 16));
        } else {
          alignas(64) E row[16];
          store_rne(row, _mm512_load_ps(tile + j * 16));
          std::memcpy(to, row, nr * sizeof(E));
        }
      }
    }
}

template <typename T>
float row_dot(const T* a, const T* b, int64_t n) {  // n % 16 == 0
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(scaletrain::load16(a + i), scaletrain::load16(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

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

// One [k, 64] panel into VNNI order [k/2][64][2] (k even): row pairs interleaved, so each 32-bit word holds
// the two bf16 that one dot-product lane multiplies. oneDNN's brgemm reads bf16 B this way on AVX-512-BF16
// CPUs too, where PyTorch's `pack` refuses ("No need to pack") since it only packs for AMX.
void vnni_panel(const BFloat16* in, int64_t k, int64_t ld, BFloat16* out) {
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t r = 0; r < k; r += 2)
    for (int64_t c = 0; c < kPanel; c += 32) {  // 32 columns of two rows -> 64 interleaved values
      const __m512i lo = _mm512_loadu_si512(in + r * ld + c), hi = _mm512_loadu_si512(in + (r + 1) * ld + c);
      // unpack interleaves within 128-bit lanes (4 columns each); the permutes put the lanes in column order
      const __m512i a = _mm512_unpacklo_epi16(lo, hi), b = _mm512_unpackhi_epi16(lo, hi);
      _mm512_storeu_si512(out + r * kPanel + 2 * c, _mm512_permutex2var_epi64(a, first, b));
      _mm512_storeu_si512(out + r * kPanel + 2 * c + 32, _mm512_permutex2var_epi64(a, second, b));
    }
}

// fp32: a [k, 64] panel is plain rows (brgemm reads fp32 B row-major).
void plain_panel(const float* in, int64_t k, int64_t ld, float* out) {
  for (int64_t r = 0; r < k; ++r) std::memcpy(out + r * kPanel, in + r * ld, kPanel * sizeof(float));
}

void pack(const float* in, int64_t k, int64_t n, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; j += kPanel) plain_panel(in + j, k, ld, out + j * k);
}

// Row-major [k, n] (leading dimension ld) -> n / 64 VNNI panels; panel j starts at out + j * k * 64.
// On AMX CPUs oneDNN's own packing (the layout its tiles want); elsewhere ours.
void pack(const BFloat16* in, int64_t k, int64_t n, int64_t ld, BFloat16* out,
          bool onednn = blas::could_pack(at::kBFloat16)) {
  for (int64_t j = 0; j < n; j += kPanel) {
    if (onednn)
      blas::pack(k, kPanel, ld, kPanel, at::kBFloat16, at::kBFloat16, in + j, out + j * k);
    else
      vnni_panel(in + j, k, ld, out + j * k);
  }
}

// Rows r, r + 1 (r even), columns c..c+15 of a [k, n] operand, straight into the panels `pack` would make
// (bf16: a VNNI word per column holds the two rows, as in vnni_panel; fp32: two plain rows).
void store_pair(BFloat16* out, int64_t k, int64_t r, int64_t c, __m512 row0, __m512 row1) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(row1, row0));  // row0 low, row1 high
  _mm512_storeu_si512(out + (c / kPanel) * k * kPanel + r * kPanel + 2 * (c % kPanel),
                      _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both));
}
void store_pair(float* out, int64_t k, int64_t r, int64_t c, __m512 row0, __m512 row1) {
  float* at = out + (c / kPanel) * k * kPanel + r * kPanel + c % kPanel;
  _mm512_storeu_ps(at, row0);
  _mm512_storeu_ps(at + kPanel, row1);
}

// C[m, :n] (+)= A[m, :k] B[:k, :n] with B inside operands packed by `pack` from a matrix of `rows` rows:
// b_packed may point at a later column panel (+ j * rows) or a later even row (+ r * kPanel) of them.
// (Both layouts put row r of a panel at r * 64, r even for bf16, so the offsets are the same for T = float.)
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b_packed, int64_t rows,
          float* c, int64_t ldc, bool add) {
  for (int64_t j = 0; j < n; j += kPanel)
    blas::brgemm(m, kPanel, k, lda, kPanel, ldc, add, a, b_packed + j * rows, c + j);
}

// The causal diagonal: where a full 64-row query block's key chunk ends with its diagonal 64 x 64 block, that
// block's upper-right 32 x 32 quarter is all masked (key > query), so the GEMMs skip it: 5.6 % of the GEMM
// work at T=512, 2.9 % at T=1024. Only in our own panel layouts (`own_layout`); oneDNN's AMX packing has its
// own column order. `diagonal` says whether this chunk ends with such a block.
constexpr int64_t kHalf = kPanel / 2;

template <typename T>
bool own_layout() {
  return !std::is_same_v<T, BFloat16> || !blas::could_pack(at::kBFloat16);
}

// C[m, :n] = A B, columns = keys (S, dP); the diagonal block is the last 64 columns.
template <typename T>
void gemm_to_keys(bool diagonal, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b_packed,
                  int64_t rows, float* c, int64_t ldc) {
  if (!diagonal) return gemm(m, n, k, a, lda, b_packed, rows, c, ldc, false);
  const int64_t d = n - kPanel;
  gemm(m, d, k, a, lda, b_packed, rows, c, ldc, false);
  blas::brgemm(kHalf, kHalf, k, lda, kPanel, ldc, false, a, b_packed + d * rows, c + d);
  blas::brgemm(kHalf, kPanel, k, lda, kPanel, ldc, false, a + kHalf * lda, b_packed + d * rows, c + kHalf * ldc + d);
}

// C[m, :n] (+)= A B, summed over keys (O += P V, dQ += dS K): query rows < 32 skip the last 32 keys.
template <typename T>
void gemm_over_keys(bool diagonal, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b_packed,
                    int64_t rows, float* c, int64_t ldc, bool add) {
  if (!diagonal) return gemm(m, n, k, a, lda, b_packed, rows, c, ldc, add);
  gemm(kHalf, n, k - kHalf, a, lda, b_packed, rows, c, ldc, add);
  gemm(m - kHalf, n, k, a + kHalf * lda, lda, b_packed, rows, c + kHalf * ldc, ldc, add);
}

// C[m, :n] += A B, columns = keys, summed over the block's queries (dV^T += dO^T P, dK^T += Q^T dS): the
// diagonal block's last 32 keys take only queries 32..63 (rows 32.. of B, columns 32.. of A).
template <typename T>
void gemm_keys_over_queries(bool diagonal, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                            const T* b_packed, int64_t rows, float* c, int64_t ldc) {
  if (!diagonal) return gemm(m, n, k, a, lda, b_packed, rows, c, ldc, true);
  const int64_t d = n - kPanel;
  constexpr int64_t per_column = 4 / sizeof(T);  // elements one panel column takes in a row (pair): bf16 2, fp32 1
  const T* block = b_packed + d * rows;
  gemm(m, d, k, a, lda, b_packed, rows, c, ldc, true);
  blas::brgemm(m, kHalf, k, lda, kPanel, ldc, true, a, block, c + d);
  blas::brgemm(m, kHalf, k - kHalf, lda, kPanel, ldc, true, a + kHalf, block + kHalf * kPanel + kHalf * per_column,
               c + d + kHalf);
}

constexpr int64_t kChunk = 256;  // keys per chunk (KC); a multiple of kPanel and of the query block

struct Strides {  // element strides of a [B, H, T, D] view whose D is contiguous
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t ti) const { return bi * b + hi * h + ti * t; }
};

// Per (batch, kv head): K and V packed for the GEMMs that read them. Buffers are sized on first use (the
// forward needs two of the four) and the zero padding past T is written once: later packs overwrite only
// rows < T.
template <typename T>
struct PackedKV {
  int64_t D, Tp;
  std::vector<T> tmp_t, tmp_r, kt, vt, k, v;  // kt/vt: [D, Tp] panels (S, dP); k/v: [Tp, D] panels (dQ, O)
  PackedKV(int64_t D_, int64_t Tp_) : D(D_), Tp(Tp_) {}

  // Our own panel layout (not oneDNN's AMX packing), rows a whole number of 32-bit words apart (the words
  // themselves may start at any bf16: the loads are unaligned ones).
  static bool direct(int64_t ld) {
    if constexpr (std::is_same_v<T, float>) return true;
    return !blas::could_pack(at::kBFloat16) && ld % 2 == 0;
  }

  T* transposed(const T* x, int64_t len, int64_t ld, std::vector<T>& out) {
    if (direct(ld)) {
      // A panel of x^T is the transpose of 64 rows of x read as 32-bit words: fp32 [D][64], and bf16
      // [D/2][64][2], whose VNNI word for (d, t) is the pair x[t][d], x[t][d + 1], adjacent in x's row. One
      // 32-bit transpose instead of a bf16 transpose and a packing pass (fwd+bwd 1.3 % faster at T=1024, 3.7 %
      // at the bench's T=512; EPYC, one thread).
      out.resize(D * Tp);  // zeros on first use: the padding columns t >= len are never written
      const int64_t words = D * sizeof(T) / 4, ld_words = ld * sizeof(T) / 4;
      const float* from = reinterpret_cast<const float*>(x);
      float* to = reinterpret_cast<float*>(out.data());
      for (int64_t t = 0; t < len; t += kPanel)
        transpose(from + t * ld_words, std::min(kPanel, len - t), words, ld_words, to + t * words, kPanel);
      return out.data();
    }
    if (tmp_t.empty()) tmp_t.assign(D * Tp, T(0.f));
    transpose(x, len, D, ld, tmp_t.data(), Tp);
    out.resize(D * Tp);
    pack(tmp_t.data(), D, Tp, Tp, out.data());
    return out.data();
  }
  T* rows(const T* x, int64_t len, int64_t ld, std::vector<T>& out) {
    out.resize(D * Tp);
    if (len == Tp) {  // no padding rows: pack straight from x (packing takes its row stride)
      pack(x, Tp, D, ld, out.data());
      return out.data();
    }
    if (tmp_r.empty()) tmp_r.assign(D * Tp, T(0.f));
    for (int64_t t = 0; t < len; ++t) std::memcpy(&tmp_r[t * D], x + t * ld, D * sizeof(T));
    pack(tmp_r.data(), Tp, D, D, out.data());
    return out.data();
  }
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
  TORCH_CHECK(q.scalar_type() != at::kBFloat16 || __builtin_cpu_supports("avx512bf16"),
              "cpu attention: bf16 needs a CPU with AVX512_BF16");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2), "cpu attention: causal self-attention only (Tq == Tk)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(3) % kPanel == 0 && k.size(0) == q.size(0),
              "cpu attention: head count must divide by kv heads, head size must be a multiple of 64");
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
      const E* kb = k_p + sk.at(b, kh, 0);
      int64_t ldk = sk.t;
      if (rope.on()) {
        rope.rotate(kb, 0, T, ldk, k_rot.data());
        kb = k_rot.data(), ldk = D;
      }
      kv.transposed(kb, T, ldk, kv.kt);
      kv.rows(v_p + sv.at(b, kh, 0), T, sv.t, kv.v);
      for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
        for (int64_t q0 = 0; q0 < T; q0 += BQ) {
          const int64_t m = std::min(BQ, T - q0), L = q0 + m;
          const E* qi = q_p + sq.at(b, h, q0);
          int64_t ldq = sq.t;
          if (rope.on()) {
            rope.rotate(qi, q0, m, ldq, q_rot.data());
            qi = q_rot.data(), ldq = D;
          }
          std::fill(row_max.begin(), row_max.end(), neg_inf);
          std::fill(row_sum.begin(), row_sum.end(), 0.f);
          std::fill(o_acc.begin(), o_acc.end(), 0.f);
          for (int64_t k0 = 0; k0 < L; k0 += KC) {
            const int64_t kc = std::min(KC, L - k0), kcp = round_up(kc, kPanel);
            const bool diagonal = own && m == kPanel && q0 + kPanel == k0 + kcp;
            gemm_to_keys(diagonal, m, kcp, D, qi, ldq, kv.kt.data() + k0 * D, D, s.data(), KC);
            for (int64_t r = 0; r < m; ++r) {
              float* srow = &s[r * KC];
              // Past `live` (the causal limit rounded up to a vector) every score is masked: P is 0 there.
              const int64_t valid = std::clamp<int64_t>(q0 + r + 1 - k0, 0, kc), live = round_up(valid, 16);
              mask_row(srow, valid, live);
              Vec vmax(neg_inf);
              for (int64_t c = 0; c < live; c += 16) vmax = _mm512_max_ps(vmax, Vec::loadu(srow + c));
              const float mx = std::max(row_max[r], _mm512_reduce_max_ps(vmax) * fscale);
              const float alpha = row_max[r] == neg_inf ? 0.f : std::exp(row_max[r] - mx);
              const __m512 vscale2 = _mm512_set1_ps(fscale * scaletrain::kLog2e),
                           vmx2 = _mm512_set1_ps(mx * scaletrain::kLog2e);
              Vec vsum(0.f);
              for (int64_t c = 0; c < live; c += 16) {  // exp(s * scale - mx) = 2^(s * scale log2e - mx log2e)
                const Vec p = scaletrain::exp2_fast(_mm512_fmsub_ps(Vec::loadu(srow + c), vscale2, vmx2));
                vsum = vsum + p;
                store_rne(&p_tile[r * KC + c], p);
              }
              for (int64_t c = live; c < kcp; c += 16) store_rne(&p_tile[r * KC + c], _mm512_setzero_ps());
              row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(vsum);
              row_max[r] = mx;
              float* orow = &o_acc[r * D];
              for (int64_t d = 0; d < D; d += 16) (Vec::loadu(orow + d) * Vec(alpha)).store(orow + d);
            }
            gemm_over_keys(diagonal, m, D, kcp, p_tile.data(), KC, kv.v.data() + k0 * kPanel, Tp, o_acc.data(), D, true);
          }
          E* oi = o_p + so.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) {
            const Vec inv(1.f / row_sum[r]);
            for (int64_t d = 0; d < D; d += 16) store_rne(oi + r * so.t + d, Vec::loadu(&o_acc[r * D + d]) * inv);
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
  const Strides sq(q), sk(k), sv(v), so(out), sdo(dout), sdq(dq), sdk(dk);
  const auto lse_a = lse.accessor<float, 3>();
  const E *q_p = q.data_ptr<E>(), *k_p = k.data_ptr<E>(), *v_p = v.data_ptr<E>();
  const E *o_p = out.data_ptr<E>(), *do_p = dout.data_ptr<E>();
  E *dq_p = dq.data_ptr<E>(), *dk_p = dk.data_ptr<E>(), *dv_p = dv.data_ptr<E>();
  const float fscale = static_cast<float>(scale);
  const bool direct = own_layout<E>();
  const __m512 vscale = _mm512_set1_ps(fscale), vscale2 = _mm512_set1_ps(fscale * scaletrain::kLog2e);
  std::vector<float> cos_t, sin_t;  // the rope tables transposed to fp32 [D, T], for dK^T's adjoint
  if (rope.on()) {
    std::vector<float> wide(T * D);
    for (auto [table, out] : {std::pair{rope.cos, &cos_t}, std::pair{rope.sin, &sin_t}}) {
      for (int64_t i = 0; i < T * D; i += 16) _mm512_storeu_ps(&wide[i], scaletrain::load16(table + i));
      out->resize(D * T);
      transpose(wide.data(), T, D, D, out->data(), T);
    }
  }

  at::parallel_for(0, B * KH, 1, [&](int64_t begin, int64_t end) {
    PackedKV<E> kv(D, Tp);
    std::vector<float> dkt(D * Tp), dvt(D * Tp), s(BQ * KC), dp(BQ * KC), dq_acc(BQ * D), delta(BQ);
    std::vector<E> p_tile(direct ? 0 : BQ * KC), p_pk(BQ * KC), ds_tile(BQ * KC), ds_pk(BQ * KC), qt(D * BQ),
        dot(D * BQ), k_rot(rope.on() ? T * D : 0), q_rot(rope.on() ? BQ * D : 0);  // p_tile: row-major P, only
                                                                                // where oneDNN packs it (AMX)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KH, kh = task % KH;
      const E* kb = k_p + sk.at(b, kh, 0);
      int64_t ldk = sk.t;
      if (rope.on()) {
        rope.rotate(kb, 0, T, ldk, k_rot.data());
        kb = k_rot.data(), ldk = D;
      }
      kv.transposed(kb, T, ldk, kv.kt);
      kv.transposed(v_p + sv.at(b, kh, 0), T, sv.t, kv.vt);
      kv.rows(kb, T, ldk, kv.k);
      std::fill(dkt.begin(), dkt.end(), 0.f);
      std::fill(dvt.begin(), dvt.end(), 0.f);
      for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
        for (int64_t q0 = 0; q0 < T; q0 += BQ) {
          const int64_t m = std::min(BQ, T - q0), mp = round_up(m, kPanel), L = q0 + m;
          const E* qi = q_p + sq.at(b, h, q0);
          int64_t ldq = sq.t;
          if (rope.on()) {
            rope.rotate(qi, q0, m, ldq, q_rot.data());
            qi = q_rot.data(), ldq = D;
          }
          const E* doi = do_p + sdo.at(b, h, q0);
          const E* oi = o_p + so.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) delta[r] = row_dot(doi + r * sdo.t, oi + r * so.t, D);
          std::fill(dot.begin(), dot.end(), E(0.f));
          std::fill(qt.begin(), qt.end(), E(0.f));
          transpose(doi, m, D, sdo.t, dot.data(), mp);
          transpose(qi, m, D, ldq, qt.data(), mp);
          for (int64_t k0 = 0; k0 < L; k0 += KC) {
            const int64_t kc = std::min(KC, L - k0), kcp = round_up(kc, kPanel);
            const bool diagonal = direct && m == kPanel && q0 + kPanel == k0 + kcp;
            gemm_to_keys(diagonal, m, kcp, D, qi, ldq, kv.kt.data() + k0 * D, D, s.data(), KC);
            gemm_to_keys(diagonal, m, kcp, D, doi, sdo.t, kv.vt.data() + k0 * D, D, dp.data(), KC);
            // P and dS two rows at a time (rows past m are padding: zeros). dS row-major for the dQ GEMM; both
            // into the panels of the dV/dK GEMMs directly, unless oneDNN packs (AMX: its layout, its pack).
            for (int64_t r = 0; r < mp; r += 2) {
              __m512 vlse2[2], vdelta[2];
              bool valid[2];
              // Past `live` (the pair's causal limit rounded up to a vector) P and dS are 0 for both rows.
              const int64_t live = round_up(std::clamp<int64_t>(q0 + std::min(r + 1, m - 1) + 1 - k0, 0, kc), 16);
              for (int64_t i = 0; i < 2; ++i) {
                valid[i] = r + i < m;
                if (!valid[i]) continue;
                mask_row(&s[(r + i) * KC], std::clamp<int64_t>(q0 + r + i + 1 - k0, 0, kc), live);
                vlse2[i] = _mm512_set1_ps(lse_a[b][h][q0 + r + i] * scaletrain::kLog2e);
                vdelta[i] = _mm512_set1_ps(delta[r + i]);
              }
              for (int64_t c = 0; c < kcp; c += 16) {
                __m512 p[2], ds[2];
                for (int64_t i = 0; i < 2; ++i) {
                  if (!valid[i] || c >= live) {
                    p[i] = ds[i] = _mm512_setzero_ps();
                    if (valid[i]) store_rne(&ds_tile[(r + i) * KC + c], ds[i]);
                    continue;
                  }
                  p[i] = scaletrain::exp2_fast(_mm512_fmsub_ps(_mm512_loadu_ps(&s[(r + i) * KC + c]), vscale2, vlse2[i]));
                  ds[i] = _mm512_mul_ps(_mm512_mul_ps(p[i], _mm512_sub_ps(_mm512_loadu_ps(&dp[(r + i) * KC + c]), vdelta[i])), vscale);
                  store_rne(&ds_tile[(r + i) * KC + c], ds[i]);
                }
                if (direct) {
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
            if (!direct) {
              pack(p_tile.data(), mp, kcp, KC, p_pk.data());
              pack(ds_tile.data(), mp, kcp, KC, ds_pk.data());
            }
            gemm_keys_over_queries(diagonal, D, kcp, mp, dot.data(), mp, p_pk.data(), mp, dvt.data() + k0, Tp);
            gemm_keys_over_queries(diagonal, D, kcp, mp, qt.data(), mp, ds_pk.data(), mp, dkt.data() + k0, Tp);
          }
          E* dqi = dq_p + sdq.at(b, h, q0);
          for (int64_t r = 0; r < m; ++r) {
            if (rope.on()) rope.unrotate(&dq_acc[r * D], q0 + r);
            for (int64_t d = 0; d < D; d += 16) store_rne(dqi + r * sdq.t + d, Vec::loadu(&dq_acc[r * D + d]));
          }
        }
      }
      if (rope.on()) Rope<E>::unrotate_transposed(dkt.data(), D, T, Tp, cos_t.data(), sin_t.data());
      store_transposed(dkt.data(), D, T, Tp, dk_p + sdk.at(b, kh, 0), sdk.t);
      store_transposed(dvt.data(), D, T, Tp, dv_p + sdk.at(b, kh, 0), sdk.t);
    }
    blas::brgemm_release();
  });
}

}  // namespace

#pragma GCC pop_options

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
  if (q.scalar_type() == at::kBFloat16)
    forward_impl<BFloat16>(q, k, v, scale, rope_tables<BFloat16>(cos, sin, q), out, lse);
  else
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
  if (q.scalar_type() == at::kBFloat16)
    backward_impl<BFloat16>(dout, q, k, v, out, lse, scale, rope_tables<BFloat16>(cos, sin, q), dq, dk, dv);
  else
    backward_impl<float>(dout, q, k, v, out, lse, scale, rope_tables<float>(cos, sin, q), dq, dk, dv);
  return {dq, dk, dv};
}

// For tests: [k, n] bf16 (k even, n % 64 == 0) in the panel layout the GEMMs read, packed by oneDNN or by us.
at::Tensor pack_panels(const at::Tensor& x, bool onednn) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous() && x.size(0) % 2 == 0 &&
              x.size(1) % kPanel == 0, "pack_panels: contiguous bf16 [k, n], k even, n a multiple of 64");
  TORCH_CHECK(!onednn || blas::could_pack(at::kBFloat16), "pack_panels: oneDNN packs only on AMX CPUs");
  auto out = at::empty_like(x);
  pack(x.data_ptr<BFloat16>(), x.size(0), x.size(1), x.size(1), out.data_ptr<BFloat16>(), onednn);
  return out;
}
