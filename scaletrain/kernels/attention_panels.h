// The CPU attention kernel's operands and GEMMs (cpu_attention.cpp): matrices packed once into 64-column
// panels in the layout oneDNN's brgemm micro-kernels read (bf16: VNNI row pairs, [K/2][64][2]; fp32: plain
// rows), the transposes that fill them, and the brgemm calls over them, including the causal diagonal's
// skipped quarter. Included by cpu_attention.cpp only; compiled for avx512bf16 like it in the AVX-512 build
// (its bf16 path runs only where the CPU has AVX512_BF16); the AVX2 build has the fp32 path only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_utils.h"

#if SCALETRAIN_BF16
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#endif

namespace scaletrain::attention {

using at::BFloat16;
namespace blas = at::native::cpublas;

// oneDNN's packing writes B in panels at most 64 columns wide (its `out_ld` must be 16/32/48/64), so every
// packed operand is a row of 64-column panels, each [K/2][64][2], and sequences are padded to 64.
constexpr int64_t kPanel = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out[c * ld_out + r] = in[r * ld_in + c] for r < rows, c < cols: 16 x 16 tiles (AVX-512; four 8 x 8 ones on
// AVX2; the 32 x 32 kernel spilled its 64 registers and was 2x slower per element), masked tiles at the edges.
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
          for (int64_t l = 0; l < 16; l += kLanes) store_rne(to + l, vload(tile + j * 16 + l));
        } else {
          alignas(64) E row[16];
          for (int64_t l = 0; l < 16; l += kLanes) store_rne(row + l, vload(tile + j * 16 + l));
          std::memcpy(to, row, nr * sizeof(E));
        }
      }
    }
}

template <typename T>
float row_dot(const T* a, const T* b, int64_t n) {  // n % kLanes == 0
  VF acc = vzero();
  for (int64_t i = 0; i < n; i += kLanes) acc = vfmadd(vload(a + i), vload(b + i), acc);
  return vsum(acc);
}

#if SCALETRAIN_BF16
// One [k, 64] panel into VNNI order [k/2][64][2] (k even): row pairs interleaved, so each 32-bit word holds
// the two bf16 that one dot-product lane multiplies. oneDNN's brgemm reads bf16 B this way on AVX-512-BF16
// CPUs too, where PyTorch's `pack` refuses ("No need to pack") since it only packs for AMX.
inline void vnni_panel(const BFloat16* in, int64_t k, int64_t ld, BFloat16* out) {
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
#endif  // SCALETRAIN_BF16

// fp32: a [k, 64] panel is plain rows (brgemm reads fp32 B row-major).
inline void plain_panel(const float* in, int64_t k, int64_t ld, float* out) {
  for (int64_t r = 0; r < k; ++r) std::memcpy(out + r * kPanel, in + r * ld, kPanel * sizeof(float));
}

inline void pack(const float* in, int64_t k, int64_t n, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; j += kPanel) plain_panel(in + j, k, ld, out + j * k);
}

#if SCALETRAIN_BF16
// Row-major [k, n] (leading dimension ld) -> n / 64 VNNI panels; panel j starts at out + j * k * 64.
// On AMX CPUs oneDNN's own packing (the layout its tiles want); elsewhere ours.
inline void pack(const BFloat16* in, int64_t k, int64_t n, int64_t ld, BFloat16* out,
          bool onednn = blas::could_pack(at::kBFloat16)) {
  for (int64_t j = 0; j < n; j += kPanel) {
    if (onednn)
      blas::pack(k, kPanel, ld, kPanel, at::kBFloat16, at::kBFloat16, in + j, out + j * k);
    else
      vnni_panel(in + j, k, ld, out + j * k);
  }
}

// Rows r, r + 1 (r even), columns c..c+kLanes-1 of a [k, n] operand, straight into the panels `pack` would
// make (bf16: a VNNI word per column holds the two rows, as in vnni_panel; fp32: two plain rows).
inline void store_pair(BFloat16* out, int64_t k, int64_t r, int64_t c, __m512 row0, __m512 row1) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(row1, row0));  // row0 low, row1 high
  _mm512_storeu_si512(out + (c / kPanel) * k * kPanel + r * kPanel + 2 * (c % kPanel),
                      _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both));
}
#endif  // SCALETRAIN_BF16

inline void store_pair(float* out, int64_t k, int64_t r, int64_t c, VF row0, VF row1) {
  float* at = out + (c / kPanel) * k * kPanel + r * kPanel + c % kPanel;
  store_rne(at, row0);
  store_rne(at + kPanel, row1);
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

// `diagonal` for the GEMMs below: the key chunk [k0, k0 + kcp) of a query block at q0 (m rows) ends with
// that block's diagonal, the block is full, and the panels are ours (`own`: own_layout, once per call).
inline bool ends_on_diagonal(bool own, int64_t m, int64_t q0, int64_t k0, int64_t kcp) {
  return own && m == kPanel && q0 + kPanel == k0 + kcp;
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

}  // namespace scaletrain::attention

#if SCALETRAIN_BF16
#pragma GCC pop_options
#endif
