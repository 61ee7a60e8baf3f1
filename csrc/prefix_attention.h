// CPU kernels of fastprompt's prefix attention: forward and backward over a read-only prefix bank.
//
// Shapes (see fastprompt.prefix_attention): q [B, Hq, T, D]; k, v [B, Hkv, S, D];
// prefix_k, prefix_v [N, Hkv, P, D]; prefix_index int32 [B] or none (every row uses bank row 0);
// prefix_lens int32 [N] or none (every bank row is P long);
// key_padding_mask bool [B, S] or undefined. out [B, Hq, T, D], lse float32 [B, Hq, T].
//
// A work item holds every query head of one GQA group, so each key block is loaded once for Hq / Hkv
// heads. Keys are visited in blocks: first the row's prefix bank entry (up to its prefix_lens), then
// the sequence keys; the prefix is read in place and never concatenated or copied per batch row.
// Block products are small GEMMs on fp32 (fp64 for double) tiles, so fp16/bf16 accumulate in fp32.
//
// With ATen's flash attention over the sequence (fastprompt/attention/cpu_cascade.py) the kernels visit the
// prefix keys only: the forward resumes from that kernel's output and lse, the backward adds to its dq.
//
// Shared by prefix_attention_forward.cpp and prefix_attention_backward.cpp, two translation units so
// that a first-use build compiles them in parallel.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastprompt {
namespace {


using at::vec::Vectorized;

constexpr int64_t kBlockK = 128;    // keys per block (forward)
constexpr int64_t kBackwardBlockK = 128;  // keys per block (backward: key-block major, fewer and larger GEMMs)
constexpr int64_t kBlockRows = 128;  // query rows (positions x heads of a group) per block
constexpr int64_t kMaxKeySplits = 16;  // backward: most pieces the keys of one (b, kv head) are cut into

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Rows of a rank-4 tensor whose last dimension has unit stride.
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1, s2;
  T* at(int64_t i0, int64_t i1, int64_t i2) const { return data + i0 * s0 + i1 * s1 + i2 * s2; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// ---------------------------------------------------------------------------------------------
// GEMM on small tiles: C[M, N] (= or +=) A[M, K] @ B[K, N].
// A(i, k) = a[i * a_rs + k * a_cs], so a transposed A is just other strides; B and C are row-major.
// Register blocking: MR rows x NV vectors of C live in registers while K streams.

template <typename T>
struct Blocking {
  static constexpr int W = Vectorized<T>::size();
  // 16 vector registers on AVX2, 32 on AVX-512 and NEON.
  static constexpr int MR = 4;
  static constexpr int NV = W * sizeof(T) >= 64 || W * sizeof(T) <= 16 ? 4 : 2;
};

template <typename T, int MR, int NV>
inline void micro_kernel(int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c,
                         int64_t ldc, bool accumulate) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * W) : Vec(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = Vec::loadu(b + k * ldb + v * W);
    }
    for (int r = 0; r < MR; ++r) {
      const Vec av(a[r * a_rs + k * a_cs]);
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v].store(c + r * ldc + v * W);
    }
  }
}

template <typename T, int NV>
inline void gemm_columns(int64_t M, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb,
                         T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = Blocking<T>::MR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    micro_kernel<T, MR, NV>(K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate);
  }
  for (; i < M; ++i) {
    micro_kernel<T, 1, NV>(K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate);
  }
}

template <typename T>
void gemm_registers(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb,
                    T* c, int64_t ldc, bool accumulate) {
  constexpr int W = Blocking<T>::W;
  constexpr int NV = Blocking<T>::NV;
  int64_t j = 0;
  for (; j + NV * W <= N; j += NV * W) {
    gemm_columns<T, NV>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
  }
  for (; j + W <= N; j += W) {
    gemm_columns<T, 1>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
  }
  for (; j < N; ++j) {
    for (int64_t i = 0; i < M; ++i) {
      T sum = accumulate ? c[i * ldc + j] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        sum += a[i * a_rs + k * a_cs] * b[k * ldb + j];
      }
      c[i * ldc + j] = sum;
    }
  }
}

// The BLAS that torch links (MKL in the x86 wheels) exports the Fortran sgemm_/dgemm_; declared weak, so a
// torch without them loads this library too and the register-blocked GEMM above runs instead. MKL's small-
// matrix kernels run these 64-wide tiles 2-3x faster than it. Inside at::parallel_for they run on one thread.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename T>
constexpr auto blas_gemm() {
  if constexpr (std::is_same_v<T, float>) {
    return &sgemm_;
  } else {
    return &dgemm_;
  }
}

// C[M, N] (= or +=) A[M, K] @ B[K, N]: the row-major C = A B is the column-major C^T = B^T A^T.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c,
          int64_t ldc, bool accumulate) {
  const auto blas = blas_gemm<T>();
  if (blas == nullptr || M == 0 || N == 0 || K == 0) {
    gemm_registers(M, N, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    return;
  }
  // A is row-major (a_cs == 1, leading dim a_rs) or column-major (a_rs == 1, leading dim a_cs)
  const bool a_rows = a_cs == 1 && (a_rs != 1 || M > 1 || K == 1);
  const char no = 'N', yes = 'T', transa_blas = no, transb_blas = a_rows ? no : yes;
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda = static_cast<int>(ldb), ldb_blas = static_cast<int>(std::max<int64_t>(a_rows ? a_rs : a_cs, a_rows ? K : M));
  const int ldc_blas = static_cast<int>(ldc);
  const T alpha = 1, beta = accumulate ? 1 : 0;
  blas(&transa_blas, &transb_blas, &m, &n, &k, &alpha, b, &lda, a, &ldb_blas, &beta, c, &ldc_blas);
}

// C[M, N] = A[M, K] @ B[N, K]^T, all row-major (leading dims lda, ldb, ldc), through the BLAS: a block's keys
// used in place as B. Returns false, doing nothing, when no BLAS is linked.
template <typename T>
bool gemm_abt_blas(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                   int64_t ldc) {
  const auto blas = blas_gemm<T>();
  if (blas == nullptr) {
    return false;
  }
  // Column-major, C^T [N, M] = B [N, K] (B^T stored column-major, ld ldb, transposed) @ A^T [K, M] (ld lda).
  const char yes = 'T', no = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda_blas = static_cast<int>(ldb), ldb_blas = static_cast<int>(lda), ldc_blas = static_cast<int>(ldc);
  const T alpha = 1, beta = 0;
  blas(&yes, &no, &m, &n, &k, &alpha, b, &lda_blas, a, &ldb_blas, &beta, c, &ldc_blas);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Row helpers on acc-type buffers.

// op over a vector's lanes, pairwise: a serial reduction of the lanes is a chain of dependent instructions.
template <typename T, typename Op>
T lanes_reduce(const Vectorized<T>& v, Op op) {
  constexpr int W = Vectorized<T>::size();
  T lanes[W];
  v.store(lanes);
  for (int width = W / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] = op(lanes[l], lanes[l + width]);
    }
  }
  return lanes[0];
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= W) {
    Vec m = Vec::loadu(x);
    for (j = W; j + W <= n; j += W) {
      m = at::vec::maximum(m, Vec::loadu(x + j));
    }
    best = lanes_reduce(m, [](T a, T b) { return std::max(a, b); });
  }
  for (; j < n; ++j) {
    best = std::max(best, x[j]);
  }
  return best;
}

// x[j] = exp(x[j] * mul - sub) in place; returns the sum. -inf inputs give 0.
template <typename T>
T exp_and_sum(T* x, int64_t n, T mul, T sub) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  const Vec vmul(mul), vsub(sub);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = at::vec::fmsub(Vec::loadu(x + j), vmul, vsub).exp();
    e.store(x + j);
    vsum = vsum + e;
  }
  T sum = lanes_reduce(vsum, [](T a, T b) { return a + b; });
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] * mul - sub);
    sum += x[j];
  }
  return sum;
}

template <typename T>
void scale_inplace(T* x, int64_t n, T s) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  const Vec vs(s);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    (Vec::loadu(x + j) * vs).store(x + j);
  }
  for (; j < n; ++j) {
    x[j] *= s;
  }
}

template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum += x[j] * y[j];
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Dropout: a counter-based hash of (seed, b, hq, t, column), so backward regenerates the forward mask.

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

struct Dropout {
  bool active;
  uint64_t seed;
  uint64_t threshold;  // keep iff 24 hash bits >= threshold
  double inv_keep;

  Dropout(double p, int64_t seed_) : active(p > 0), seed(static_cast<uint64_t>(seed_)) {
    threshold = static_cast<uint64_t>(p * static_cast<double>(1 << 24));
    inv_keep = active ? 1.0 / (1.0 - p) : 1.0;
  }

  uint64_t row_key(int64_t b, int64_t hq, int64_t t, int64_t Hq, int64_t T) const {
    return mix64(seed ^ mix64(static_cast<uint64_t>((b * Hq + hq) * T + t) + 0x9e3779b97f4a7c15ULL));
  }

  // mult[j] = inv_keep or 0 for columns first_col .. first_col + n.
  template <typename T>
  void row_multipliers(uint64_t key, int64_t first_col, int64_t n, T* mult) const {
    const T keep = static_cast<T>(inv_keep);
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t h = mix64(key + static_cast<uint64_t>(first_col + j) * 0xd1b54a32d192ed03ULL) >> 40;
      mult[j] = h >= threshold ? keep : T(0);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// What both passes share: sizes, inputs, and the key blocks a batch row visits.

enum KeyParts { kPrefixKeys = 1, kSequenceKeys = 2, kAllKeys = 3 };

template <typename scalar_t>
struct Problem {
  int64_t B, Hq, Hkv, G, T, S, P, D;
  bool causal;
  double scale;
  Rows<const scalar_t> q, k, v, pk, pv;
  const int32_t* prefix_index;
  const int32_t* prefix_lens;
  const bool* key_padding_mask;  // [B, S] or nullptr
  Dropout dropout;
  // The keys both passes visit. kPrefixKeys when another kernel (ATen's flash attention) attends the
  // sequence: the forward then resumes from that kernel's out [B, Hq, T, D] and lse [B, Hq, T] (in the
  // accumulation type), and the backward adds the prefix part to the dq it was handed.
  int parts = kAllKeys;
  Rows<const scalar_t> sequence_out{};
  const typename AccType<scalar_t>::type* sequence_lse = nullptr;

  int64_t prefix_len(int64_t b) const {
    const int32_t n = prefix_index[b];
    return n < 0 ? 0 : prefix_lens[n];
  }
  // Whether any key of sequence block [start, start + len) is a real token.
  bool block_has_keys(int64_t b, int64_t start, int64_t len) const {
    if (key_padding_mask == nullptr) {
      return true;
    }
    const bool* m = key_padding_mask + b * S + start;
    return std::any_of(m, m + len, [](bool x) { return x; });
  }
  bool block_has_padding(int64_t b, int64_t start, int64_t len) const {
    if (key_padding_mask == nullptr) {
      return false;
    }
    const bool* m = key_padding_mask + b * S + start;
    return !std::all_of(m, m + len, [](bool x) { return x; });
  }
};

struct KeyBlock {
  bool prefix;
  int64_t start, len;
};

// The additive padding mask of a sequence block, 0 for a real key and -inf for padding, written to buf; nullptr
// when the block holds no padding (a prefix block never does).
template <typename scalar_t, typename acc_t>
const acc_t* block_padding(const Problem<scalar_t>& p, int64_t b, const KeyBlock& blk, acc_t* buf) {
  if (blk.prefix || !p.block_has_padding(b, blk.start, blk.len)) {
    return nullptr;
  }
  const bool* m = p.key_padding_mask + b * p.S + blk.start;
  for (int64_t j = 0; j < blk.len; ++j) {
    buf[j] = m[j] ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  }
  return buf;
}

// Writes -inf over the invisible columns of one score row of a key block (causally hidden, or padding:
// `padding` from block_padding); returns false when the row sees none of the block's keys.
template <typename scalar_t, typename acc_t>
bool mask_row(const Problem<scalar_t>& p, int64_t t, const KeyBlock& blk, const acc_t* padding, acc_t* srow) {
  using Vec = Vectorized<acc_t>;
  constexpr int W = Vec::size();
  if (blk.prefix) {
    return true;
  }
  const int64_t visible =
      p.causal ? std::clamp<int64_t>(p.S - p.T + t - blk.start + 1, 0, blk.len) : blk.len;
  std::fill(srow + visible, srow + blk.len, -std::numeric_limits<acc_t>::infinity());
  if (padding != nullptr) {
    int64_t j = 0;
    for (; j + W <= visible; j += W) {
      (Vec::loadu(srow + j) + Vec::loadu(padding + j)).store(srow + j);
    }
    for (; j < visible; ++j) {
      srow[j] += padding[j];
    }
  }
  return visible > 0;
}

// Blocks of keys row b visits for queries up to t_last: prefix blocks then sequence blocks.
template <typename scalar_t>
std::vector<KeyBlock> key_blocks(const Problem<scalar_t>& p, int64_t b, int64_t t_last, int parts,
                                 int64_t block = kBlockK) {
  std::vector<KeyBlock> blocks;
  const int64_t L = parts & kPrefixKeys ? p.prefix_len(b) : 0;
  for (int64_t s = 0; s < L; s += block) {
    blocks.push_back({true, s, std::min(block, L - s)});
  }
  const int64_t s_end = !(parts & kSequenceKeys) ? 0 : p.causal ? std::min(p.S, p.S - p.T + t_last + 1) : p.S;
  for (int64_t s = 0; s < s_end; s += block) {
    const int64_t len = std::min(block, s_end - s);
    if (p.block_has_keys(b, s, len)) {
      blocks.push_back({false, s, len});
    }
  }
  return blocks;
}

template <typename scalar_t>
const scalar_t* key_row(const Problem<scalar_t>& p, const Rows<const scalar_t>& prefix,
                        const Rows<const scalar_t>& seq, int64_t b, int64_t hkv, const KeyBlock& blk) {
  return blk.prefix ? prefix.at(p.prefix_index[b], hkv, blk.start) : seq.at(b, hkv, blk.start);
}

template <typename scalar_t>
int64_t key_stride(const Rows<const scalar_t>& prefix, const Rows<const scalar_t>& seq, const KeyBlock& blk) {
  return blk.prefix ? prefix.s2 : seq.s2;
}

// dst[j, d] = src[j * ld + d] as acc_t (rows x D, row-major).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      dst[j * D + d] = static_cast<acc_t>(src[j * ld + d]);
    }
  }
}

// dst[d, j] = src[j * ld + d] as acc_t (D x ld_dst, the transposed key/value tile).
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst, int64_t ld_dst = kBlockK) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      dst[d * ld_dst + j] = static_cast<acc_t>(src[j * ld + d]);
    }
  }
}

// Rows of a block as acc_t: the tensor itself when no conversion is needed, else packed into buf.
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> rows_as_acc(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {src, ld};
  } else {
    pack_rows(src, ld, rows, D, buf);
    return {buf, D};
  }
}

// Query rows of a block in (position, head) order: row r is t0 + r / G, head hkv * G + r % G.
template <typename scalar_t, typename acc_t>
void pack_queries(const Rows<const scalar_t>& x, int64_t b, int64_t hkv, int64_t G, int64_t t0, int64_t tn,
                  int64_t D, acc_t scale, acc_t* dst) {
  for (int64_t i = 0; i < tn; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* src = x.at(b, hkv * G + g, t0 + i);
      acc_t* row = dst + (i * G + g) * D;
      for (int64_t d = 0; d < D; ++d) {
        row[d] = static_cast<acc_t>(src[d]) * scale;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one item = (batch rows sharing a bank row, kv head, block of positions); online softmax
// over the key blocks.

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> qp, kt, vbuf, s, acc, m, l, mult, padding;
  explicit ForwardScratch(int64_t max_rows, int64_t D)
      : qp(max_rows * D), kt(D * kBlockK), vbuf(kBlockK * D), s(max_rows * kBlockK), acc(max_rows * D),
        m(max_rows), l(max_rows), mult(kBlockK), padding(kBlockK) {}
};

template <typename acc_t>
acc_t log_sum_exp(acc_t m, acc_t l) {
  return l > 0 ? m + std::log(l) : -std::numeric_limits<acc_t>::infinity();
}

// Query rows attended together: `count` batch rows (sharing one bank row when count > 1) x positions
// t0 .. t0 + tn x the heads of kv group hkv. Row r is batch[r / per_batch], position
// t0 + (r % per_batch) / G, head hkv * G + r % G, with per_batch = tn * G.
struct RowBlock {
  const int64_t* batch;
  int64_t count, hkv, t0, tn;
};

// Online-softmax update of rows r0 .. r1 of w with one key block of batch row b.
template <typename scalar_t, typename acc_t>
void attend_key_block(const Problem<scalar_t>& p, const RowBlock& rows, int64_t b, const KeyBlock& blk, int64_t r0,
                      int64_t r1, bool with_values, ForwardScratch<acc_t>& w) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t D = p.D, G = p.G, per_batch = rows.tn * G, hkv = rows.hkv;
  const acc_t* padding = block_padding(p, b, blk, w.padding.data());
  const int64_t col0 = blk.prefix ? blk.start : p.P + blk.start;
  const scalar_t* krow = key_row(p, p.pk, p.k, b, hkv, blk);
  const int64_t ldk = key_stride(p.pk, p.k, blk);
  bool scored = false;  // S = Q K^T: on the keys in place where the BLAS can read them, else on a packed K^T
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    scored = gemm_abt_blas<acc_t>(r1 - r0, blk.len, D, w.qp.data() + r0 * D, D, krow, ldk,
                                  w.s.data() + r0 * kBlockK, kBlockK);
  }
  if (!scored) {
    pack_transposed(krow, ldk, blk.len, D, w.kt.data());
    gemm<acc_t>(r1 - r0, blk.len, D, w.qp.data() + r0 * D, D, 1, w.kt.data(), kBlockK, w.s.data() + r0 * kBlockK,
                kBlockK, false);
  }

  for (int64_t r = r0; r < r1; ++r) {
    acc_t* srow = w.s.data() + r * kBlockK;
    const int64_t t = rows.t0 + (r % per_batch) / G;
    const acc_t row_block_max = mask_row(p, t, blk, padding, srow) ? row_max(srow, blk.len) : neg_inf;
    const acc_t m_new = std::max(w.m[r], row_block_max);
    if (m_new == neg_inf) {
      std::fill(srow, srow + blk.len, acc_t(0));
      continue;
    }
    const acc_t alpha = std::exp(w.m[r] - m_new);
    w.l[r] = w.l[r] * alpha + exp_and_sum(srow, blk.len, acc_t(1), m_new);
    w.m[r] = m_new;
    if (with_values && alpha != acc_t(1)) {
      scale_inplace(w.acc.data() + r * D, D, alpha);
    }
    if (with_values && p.dropout.active) {
      const uint64_t key = p.dropout.row_key(rows.batch[r / per_batch], hkv * G + r % G, t, p.Hq, p.T);
      p.dropout.row_multipliers(key, col0, blk.len, w.mult.data());
      for (int64_t j = 0; j < blk.len; ++j) {
        srow[j] *= w.mult[j];
      }
    }
  }
  if (with_values) {
    const scalar_t* vrow = key_row(p, p.pv, p.v, b, hkv, blk);
    const auto [vp, ldvp] = rows_as_acc(vrow, key_stride(p.pv, p.v, blk), blk.len, D, w.vbuf.data());
    gemm<acc_t>(r1 - r0, D, blk.len, w.s.data() + r0 * kBlockK, kBlockK, 1, vp, ldvp, w.acc.data() + r0 * D, D,
                true);
  }
}

// Running max m, sum l (natural-log units) and, with_values, the unnormalised output acc of a RowBlock over
// the keys of `parts`; with kPrefixKeys and a sequence state in p, starting from that state (an output and
// its lse are the state m = lse, l = 1, acc = output), which merges the two parts by log-sum-exp for free.
// The shared prefix is attended by all its rows at once, so each prefix tile is packed once per block.
template <typename scalar_t, typename acc_t>
void attend(const Problem<scalar_t>& p, const RowBlock& rows, bool with_values, ForwardScratch<acc_t>& w,
            int parts) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t D = p.D, G = p.G, per_batch = rows.tn * G, M = rows.count * per_batch;
  const int64_t t_last = rows.t0 + rows.tn - 1;
  for (int64_t i = 0; i < rows.count; ++i) {
    pack_queries(p.q, rows.batch[i], rows.hkv, G, rows.t0, rows.tn, D, static_cast<acc_t>(p.scale),
                 w.qp.data() + i * per_batch * D);
  }
  if (parts == kPrefixKeys && p.sequence_lse != nullptr) {
    for (int64_t r = 0; r < M; ++r) {
      const int64_t b = rows.batch[r / per_batch], t = rows.t0 + (r % per_batch) / G, hq = rows.hkv * G + r % G;
      const acc_t lse = p.sequence_lse[(b * p.Hq + hq) * p.T + t];
      const scalar_t* src = p.sequence_out.at(b, hq, t);
      for (int64_t d = 0; d < D; ++d) {
        w.acc[r * D + d] = static_cast<acc_t>(src[d]);
      }
      w.m[r] = lse;
      w.l[r] = lse == neg_inf ? acc_t(0) : acc_t(1);
    }
  } else {
    std::fill(w.acc.begin(), w.acc.begin() + M * D, acc_t(0));
    std::fill(w.m.begin(), w.m.begin() + M, neg_inf);
    std::fill(w.l.begin(), w.l.begin() + M, acc_t(0));
  }
  for (const KeyBlock& blk : key_blocks(p, rows.batch[0], t_last, parts & kPrefixKeys)) {
    attend_key_block(p, rows, rows.batch[0], blk, 0, M, with_values, w);
  }
  for (int64_t i = 0; i < rows.count; ++i) {
    for (const KeyBlock& blk : key_blocks(p, rows.batch[i], t_last, parts & kSequenceKeys)) {
      attend_key_block(p, rows, rows.batch[i], blk, i * per_batch, (i + 1) * per_batch, with_values, w);
    }
  }
}

// Batch rows sorted by bank row (stable), so rows sharing a prefix are neighbours.
std::vector<int64_t> rows_by_bank_row(const int32_t* prefix_index, int64_t B) {
  std::vector<int64_t> rows(B);
  for (int64_t b = 0; b < B; ++b) {
    rows[b] = b;
  }
  std::stable_sort(rows.begin(), rows.end(), [&](int64_t x, int64_t y) { return prefix_index[x] < prefix_index[y]; });
  return rows;
}


// ---------------------------------------------------------------------------------------------
// What the entry points of both translation units check and fill in.

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v, const at::Tensor& prefix_index, const at::Tensor& prefix_lens,
                  const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && prefix_k.dim() == 4 && prefix_v.dim() == 4,
              "prefix_attention_cpu: q, k, v, prefix_k, prefix_v must be 4-D");
  TORCH_CHECK(q.device().is_cpu(), "prefix_attention_cpu: expected CPU tensors, got ", q.device());
  for (const at::Tensor* t : {&k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "prefix_attention_cpu: all five tensors must share q's dtype");
    TORCH_CHECK(t->size(-1) == q.size(-1), "prefix_attention_cpu: head dims differ");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0), "prefix_attention_cpu: k, v must be [B, Hkv, S, D]");
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes() && prefix_k.size(1) == k.size(1),
              "prefix_attention_cpu: prefix_k, prefix_v must be [N, Hkv, P, D]");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "prefix_attention_cpu: Hq must be a positive multiple of Hkv");
  TORCH_CHECK(k.size(2) >= q.size(2), "prefix_attention_cpu: S must be >= T");
  TORCH_CHECK(prefix_index.scalar_type() == at::kInt && prefix_index.is_contiguous() &&
                  prefix_index.numel() == q.size(0),
              "prefix_attention_cpu: prefix_index must be contiguous int32 [B]");
  TORCH_CHECK(prefix_lens.scalar_type() == at::kInt && prefix_lens.is_contiguous() &&
                  prefix_lens.numel() == prefix_k.size(0),
              "prefix_attention_cpu: prefix_lens must be contiguous int32 [N]");
  // Values are checked too: they become memory offsets.
  const int32_t* index = prefix_index.data_ptr<int32_t>();
  for (int64_t b = 0; b < prefix_index.numel(); ++b) {
    TORCH_CHECK(index[b] >= -1 && index[b] < prefix_k.size(0), "prefix_attention_cpu: prefix_index[", b, "] = ",
                index[b], " is outside [-1, ", prefix_k.size(0), ")");
  }
  const int32_t* lens = prefix_lens.data_ptr<int32_t>();
  for (int64_t n = 0; n < prefix_lens.numel(); ++n) {
    TORCH_CHECK(lens[n] >= 0 && lens[n] <= prefix_k.size(2), "prefix_attention_cpu: prefix_lens[", n, "] = ", lens[n],
                " is outside [0, ", prefix_k.size(2), "]");
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 && m.size(0) == q.size(0) &&
                    m.size(1) == k.size(2),
                "prefix_attention_cpu: key_padding_mask must be contiguous bool [B, S]");
  }
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                               const at::Tensor& pv, const at::Tensor& prefix_index, const at::Tensor& prefix_lens,
                               const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
                               double dropout_p, int64_t seed) {
  Problem<scalar_t> p{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), pk.size(2),
                      q.size(3), causal, scale,
                      rows_of<const scalar_t>(q), rows_of<const scalar_t>(k), rows_of<const scalar_t>(v),
                      rows_of<const scalar_t>(pk), rows_of<const scalar_t>(pv),
                      prefix_index.data_ptr<int32_t>(), prefix_lens.data_ptr<int32_t>(),
                      key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr,
                      Dropout(dropout_p, seed)};
  return p;
}

// "No index" means every row uses bank row 0, "no lengths" every bank row is P long: made here, so the
// caller passes nothing.
at::Tensor index_or_default(const std::optional<at::Tensor>& prefix_index, const at::Tensor& q) {
  return prefix_index.has_value() ? *prefix_index : at::zeros({q.size(0)}, q.options().dtype(at::kInt));
}

at::Tensor lens_or_default(const std::optional<at::Tensor>& prefix_lens, const at::Tensor& prefix_k) {
  return prefix_lens.has_value() ? *prefix_lens : at::full({prefix_k.size(0)}, prefix_k.size(2),
                                                           prefix_k.options().dtype(at::kInt));
}

int64_t seed_value(const std::optional<at::Tensor>& seed) { return seed.has_value() ? seed->item<int64_t>() : 0; }

}  // namespace
}  // namespace fastprompt
