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
// Block products are small GEMMs on packed fp32 (fp64 for double) tiles, so fp16/bf16 accumulate in fp32.

#include <ATen/ATen.h>
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

constexpr int64_t kBlockK = 64;     // keys per block
constexpr int64_t kBlockRows = 64;  // query rows (positions x heads of a group) per block
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

// ---------------------------------------------------------------------------------------------
// Row helpers on acc-type buffers.

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
    T lanes[W];
    m.store(lanes);
    for (int l = 0; l < W; ++l) {
      best = std::max(best, lanes[l]);
    }
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
  T lanes[W];
  vsum.store(lanes);
  T sum = 0;
  for (int l = 0; l < W; ++l) {
    sum += lanes[l];
  }
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

// Writes -inf over the invisible columns of one score row of a key block; returns false when the
// row sees none of the block's keys.
template <typename scalar_t, typename acc_t>
bool mask_row(const Problem<scalar_t>& p, int64_t b, int64_t t, const KeyBlock& blk, bool padded, acc_t* srow) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (blk.prefix) {
    return true;
  }
  const int64_t visible =
      p.causal ? std::clamp<int64_t>(p.S - p.T + t - blk.start + 1, 0, blk.len) : blk.len;
  std::fill(srow + visible, srow + blk.len, neg_inf);
  if (padded) {
    const bool* m = p.key_padding_mask + b * p.S + blk.start;
    for (int64_t j = 0; j < visible; ++j) {
      if (!m[j]) {
        srow[j] = neg_inf;
      }
    }
  }
  return visible > 0;
}

// Blocks of keys row b visits for queries up to t_last: prefix blocks then sequence blocks.
template <typename scalar_t>
std::vector<KeyBlock> key_blocks(const Problem<scalar_t>& p, int64_t b, int64_t t_last, int parts) {
  std::vector<KeyBlock> blocks;
  const int64_t L = parts & kPrefixKeys ? p.prefix_len(b) : 0;
  for (int64_t s = 0; s < L; s += kBlockK) {
    blocks.push_back({true, s, std::min(kBlockK, L - s)});
  }
  const int64_t s_end = !(parts & kSequenceKeys) ? 0 : p.causal ? std::min(p.S, p.S - p.T + t_last + 1) : p.S;
  for (int64_t s = 0; s < s_end; s += kBlockK) {
    const int64_t len = std::min(kBlockK, s_end - s);
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

// dst[d, j] = src[j * ld + d] as acc_t (D x kBlockK, the transposed key/value tile).
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      dst[d * kBlockK + j] = static_cast<acc_t>(src[j * ld + d]);
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
  std::vector<acc_t> qp, kt, vbuf, s, acc, m, l, mult;
  explicit ForwardScratch(int64_t max_rows, int64_t D)
      : qp(max_rows * D), kt(D * kBlockK), vbuf(kBlockK * D), s(max_rows * kBlockK), acc(max_rows * D),
        m(max_rows), l(max_rows), mult(kBlockK) {}
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
  const bool padded = !blk.prefix && p.block_has_padding(b, blk.start, blk.len);
  const int64_t col0 = blk.prefix ? blk.start : p.P + blk.start;
  pack_transposed(key_row(p, p.pk, p.k, b, hkv, blk), key_stride(p.pk, p.k, blk), blk.len, D, w.kt.data());
  gemm<acc_t>(r1 - r0, blk.len, D, w.qp.data() + r0 * D, D, 1, w.kt.data(), kBlockK, w.s.data() + r0 * kBlockK,
              kBlockK, false);

  for (int64_t r = r0; r < r1; ++r) {
    acc_t* srow = w.s.data() + r * kBlockK;
    const int64_t t = rows.t0 + (r % per_batch) / G;
    const acc_t row_block_max = mask_row(p, b, t, blk, padded, srow) ? row_max(srow, blk.len) : neg_inf;
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

template <typename scalar_t>
void forward_kernel(const Problem<scalar_t>& p, const Rows<scalar_t>& out, float* lse) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t D = p.D, G = p.G;
  const int64_t positions = std::min(p.T, std::max<int64_t>(1, kBlockRows / G));
  const int64_t q_blocks = (p.T + positions - 1) / positions;
  // Few query rows per batch row (decode): attend several batch rows that share a bank row together,
  // as long as that leaves at least two items per thread.
  const int64_t parallel_cap = std::max<int64_t>(1, p.B * p.Hkv * q_blocks / (2 * at::get_num_threads()));
  const int64_t max_group = std::min(std::max<int64_t>(1, kBlockRows / (positions * G)), parallel_cap);
  const std::vector<int64_t> order = rows_by_bank_row(p.prefix_index, p.B);
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first index into order, count)
  for (int64_t i = 0; i < p.B;) {
    const int32_t n = p.prefix_index[order[i]];
    int64_t count = 1;
    while (n >= 0 && count < max_group && i + count < p.B && p.prefix_index[order[i + count]] == n) {
      ++count;
    }
    groups.emplace_back(i, count);
    i += count;
  }
  const int64_t max_rows = groups.empty() ? 0 : max_group * positions * G;
  const int64_t items = static_cast<int64_t>(groups.size()) * p.Hkv * q_blocks;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<acc_t> w(max_rows, D);
    for (int64_t item = begin; item < end; ++item) {
      const auto [first, count] = groups[item / (p.Hkv * q_blocks)];
      const int64_t hkv = (item / q_blocks) % p.Hkv;
      const int64_t t0 = (item % q_blocks) * positions;
      const RowBlock rows{order.data() + first, count, hkv, t0, std::min(positions, p.T - t0)};
      attend(p, rows, true, w, p.parts);
      const int64_t per_batch = rows.tn * G;
      for (int64_t r = 0; r < count * per_batch; ++r) {
        const int64_t b = rows.batch[r / per_batch], t = t0 + (r % per_batch) / G, hq = hkv * G + r % G;
        scalar_t* dst = out.at(b, hq, t);
        const acc_t inv = w.l[r] > 0 ? acc_t(1) / w.l[r] : acc_t(0);
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(w.acc[r * D + d] * inv);
        }
        lse[(b * p.Hq + hq) * p.T + t] = static_cast<float>(log_sum_exp(w.m[r], w.l[r]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: one item = (b, kv head, key split) owns dk/dv of its key blocks and accumulates dq of its
// group. With at least as many (b, kv head) pairs as threads there is one split and an item owns its
// dq too; otherwise the keys of a pair are split (balanced by attended queries) and the splits' dq are
// summed afterwards. Prefix gradients go to partial buffers, one per (chunk of items, bank row): items
// are ordered by bank row, so each chunk touches a few consecutive bank rows and the final sum runs in
// a fixed order (deterministic for a given thread count) with memory ~ (bank rows used + threads) x
// [Hkv, P, D].

struct PrefixSlots {
  std::vector<int64_t> order;       // items (b * Hkv + hkv) * splits + split, batch rows sorted by bank row
  std::vector<int64_t> chunk_start; // first item of each chunk (and the end)
  std::vector<int64_t> item_slot;   // slot of each ordered item (-1: the row has no prefix)
  std::vector<int64_t> first_slot;  // per bank row: its first slot and one past its last
  std::vector<int64_t> last_slot;
  int64_t slots = 0;
};

PrefixSlots plan_prefix_slots(const int32_t* prefix_index, int64_t B, int64_t Hkv, int64_t splits, int64_t N,
                              int64_t chunks) {
  PrefixSlots plan;
  const std::vector<int64_t> rows = rows_by_bank_row(prefix_index, B);
  const int64_t per_row = Hkv * splits, items = B * per_row;
  for (int64_t i = 0; i < items; ++i) {
    plan.order.push_back(rows[i / per_row] * per_row + i % per_row);
  }
  for (int64_t c = 0; c <= chunks; ++c) {
    plan.chunk_start.push_back(c * items / chunks);
  }
  plan.item_slot.assign(items, -1);
  plan.first_slot.assign(N, 0);
  plan.last_slot.assign(N, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t current = -1;
    for (int64_t i = plan.chunk_start[c]; i < plan.chunk_start[c + 1]; ++i) {
      const int32_t n = prefix_index[plan.order[i] / per_row];
      if (n < 0) {
        continue;
      }
      if (current != n) {
        if (plan.last_slot[n] == 0) {
          plan.first_slot[n] = plan.slots;
        }
        plan.last_slot[n] = plan.slots + 1;
        current = n;
        ++plan.slots;
      }
      plan.item_slot[i] = plan.slots - 1;
    }
  }
  return plan;
}

template <typename scalar_t>
void backward_kernel(const Problem<scalar_t>& p, const Rows<const scalar_t>& grad_out, const Rows<const scalar_t>& out,
                     const float* lse, const float* grad_lse, const Rows<scalar_t>& dq, const Rows<scalar_t>& dk,
                     const Rows<scalar_t>& dv, at::Tensor& dpk, at::Tensor& dpv, int64_t N) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t D = p.D, G = p.G, T = p.T;
  const int64_t positions = std::max<int64_t>(1, kBlockRows / G);
  const int64_t pairs = p.B * p.Hkv, threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(kMaxKeySplits, (threads + pairs - 1) / pairs);
  const int64_t items = pairs * splits;
  const int64_t chunks = std::min<int64_t>(items, threads);
  const PrefixSlots plan = plan_prefix_slots(p.prefix_index, p.B, p.Hkv, splits, N, chunks);
  const int64_t slot_size = p.Hkv * p.P * D;
  std::vector<acc_t> dk_slots(plan.slots * slot_size, acc_t(0)), dv_slots(plan.slots * slot_size, acc_t(0));
  const int64_t dq_size = T * G * D;  // one (b, kv head) pair's dq, rows in (position, head) order
  std::vector<acc_t> dq_parts(splits > 1 ? items * dq_size : 0);
  const acc_t scale = static_cast<acc_t>(p.scale);
  // Queries before the diagonal of a sequence key block see none of it.
  const auto first_query = [&](const KeyBlock& blk) {
    return blk.prefix || !p.causal ? int64_t(0) : std::max<int64_t>(0, blk.start - (p.S - T));
  };
  // dq arrives holding the sequence part's gradient when another kernel attended the sequence, else zeros
  const auto write_dq = [&](int64_t b, int64_t hkv, const acc_t* src) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* dst = dq.at(b, hkv * G + g, t);
        const acc_t* row = src + (t * G + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) + row[d]);
        }
      }
    }
  };

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t max_rows = positions * G;
    std::vector<acc_t> kp(kBlockK * D), kt(D * kBlockK), vt(D * kBlockK), dk_blk(kBlockK * D),
        dv_blk(kBlockK * D), qp(max_rows * D), dop(max_rows * D), prob(max_rows * kBlockK),
        dprob(max_rows * kBlockK), drop(max_rows * kBlockK), delta(T * G), lse_rows(T * G), dq_acc(dq_size);
    ForwardScratch<acc_t> lse_scratch(std::is_same_v<acc_t, double> ? max_rows : 0, D);
    for (int64_t i = plan.chunk_start[chunk_begin]; i < plan.chunk_start[chunk_end]; ++i) {
      const int64_t pair = plan.order[i] / splits, split = plan.order[i] % splits;
      const int64_t b = pair / p.Hkv, hkv = pair % p.Hkv;
      // delta = rowsum(dO * O) equals sum_j P_ij dP_ij also under dropout. A gradient reaching the lse adds
      // grad_lse_i * P_ij to dS_ij, which is the same as lowering delta_i by grad_lse_i.
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t hq = hkv * G + g;
          const scalar_t* o = out.at(b, hq, t);
          const scalar_t* go = grad_out.at(b, hq, t);
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) {
            sum += static_cast<acc_t>(o[d]) * static_cast<acc_t>(go[d]);
          }
          delta[t * G + g] = sum - (grad_lse ? static_cast<acc_t>(grad_lse[(b * p.Hq + hq) * T + t]) : acc_t(0));
          lse_rows[t * G + g] = static_cast<acc_t>(lse[(b * p.Hq + hq) * T + t]);
        }
      }
      if constexpr (std::is_same_v<acc_t, double>) {
        // The float32 lse would cap fp64 gradients at ~1e-7 relative error: recompute it in fp64.
        for (int64_t t0 = 0; t0 < T; t0 += positions) {
          const int64_t tn = std::min(positions, T - t0);
          attend(p, RowBlock{&b, 1, hkv, t0, tn}, false, lse_scratch, kAllKeys);
          for (int64_t r = 0; r < tn * G; ++r) {
            lse_rows[t0 * G + r] = log_sum_exp(lse_scratch.m[r], lse_scratch.l[r]);
          }
        }
      }
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));

      const std::vector<KeyBlock> blocks = key_blocks(p, b, T - 1, p.parts);
      int64_t total_cost = 0, cost_before = 0;
      for (const KeyBlock& blk : blocks) {
        total_cost += T - first_query(blk);
      }
      for (const KeyBlock& blk : blocks) {
        // A block belongs to the split holding the midpoint of its cost (queries attending it).
        const int64_t cost = T - first_query(blk);
        const int64_t owner = std::min(splits - 1, (2 * cost_before + cost) * splits / std::max<int64_t>(1, 2 * total_cost));
        cost_before += cost;
        if (owner != split) {
          continue;
        }
        const scalar_t* krow = key_row(p, p.pk, p.k, b, hkv, blk);
        const scalar_t* vrow = key_row(p, p.pv, p.v, b, hkv, blk);
        const int64_t ldk = key_stride(p.pk, p.k, blk), ldv = key_stride(p.pv, p.v, blk);
        const bool padded = !blk.prefix && p.block_has_padding(b, blk.start, blk.len);
        const int64_t col0 = blk.prefix ? blk.start : p.P + blk.start;
        const int64_t n = blk.len;
        const auto [kmat, ldkm] = rows_as_acc(krow, ldk, n, D, kp.data());
        pack_transposed(krow, ldk, n, D, kt.data());
        pack_transposed(vrow, ldv, n, D, vt.data());
        std::fill(dk_blk.begin(), dk_blk.end(), acc_t(0));
        std::fill(dv_blk.begin(), dv_blk.end(), acc_t(0));
        for (int64_t t0 = first_query(blk) / positions * positions; t0 < T; t0 += positions) {
          const int64_t tn = std::min(positions, T - t0);
          const int64_t M = tn * G;
          pack_queries(p.q, b, hkv, G, t0, tn, D, acc_t(1), qp.data());
          pack_queries(grad_out, b, hkv, G, t0, tn, D, acc_t(1), dop.data());
          gemm<acc_t>(M, n, D, qp.data(), D, 1, kt.data(), kBlockK, prob.data(), kBlockK, false);
          const acc_t* pd = p.dropout.active ? dprob.data() : prob.data();  // probabilities after dropout
          for (int64_t r = 0; r < M; ++r) {
            acc_t* prow = prob.data() + r * kBlockK;
            const int64_t t = t0 + r / G;
            const acc_t row_lse = lse_rows[t * G + r % G];
            if (row_lse == -std::numeric_limits<acc_t>::infinity() || !mask_row(p, b, t, blk, padded, prow)) {
              std::fill(prow, prow + n, acc_t(0));
            } else {
              exp_and_sum(prow, n, scale, row_lse);
            }
            if (p.dropout.active) {
              acc_t* mrow = drop.data() + r * kBlockK;
              p.dropout.row_multipliers(p.dropout.row_key(b, hkv * G + r % G, t, p.Hq, T), col0, n, mrow);
              acc_t* pdrow = dprob.data() + r * kBlockK;
              for (int64_t j = 0; j < n; ++j) {
                pdrow[j] = prow[j] * mrow[j];
              }
            }
          }
          // dV += Pd^T dO
          gemm<acc_t>(n, D, M, pd, 1, kBlockK, dop.data(), D, dv_blk.data(), D, true);
          // dP = dO V^T, then dS = P * (dP * dropout - delta) * scale (in place in dprob)
          gemm<acc_t>(M, n, D, dop.data(), D, 1, vt.data(), kBlockK, dprob.data(), kBlockK, false);
          for (int64_t r = 0; r < M; ++r) {
            const acc_t* prow = prob.data() + r * kBlockK;
            acc_t* dsrow = dprob.data() + r * kBlockK;
            const acc_t* mrow = drop.data() + r * kBlockK;
            const acc_t row_delta = delta[(t0 + r / G) * G + r % G];
            for (int64_t j = 0; j < n; ++j) {
              const acc_t dp = p.dropout.active ? dsrow[j] * mrow[j] : dsrow[j];
              dsrow[j] = prow[j] * (dp - row_delta) * scale;
            }
          }
          // dQ += dS K ; dK += dS^T Q
          gemm<acc_t>(M, D, n, dprob.data(), kBlockK, 1, kmat, ldkm, dq_acc.data() + t0 * G * D, D, true);
          gemm<acc_t>(n, D, M, dprob.data(), 1, kBlockK, qp.data(), D, dk_blk.data(), D, true);
        }

        for (int64_t j = 0; j < n; ++j) {
          if (blk.prefix) {
            const int64_t offset = plan.item_slot[i] * slot_size + (hkv * p.P + blk.start + j) * D;
            for (int64_t d = 0; d < D; ++d) {
              dk_slots[offset + d] += dk_blk[j * D + d];
              dv_slots[offset + d] += dv_blk[j * D + d];
            }
          } else {
            scalar_t* dkr = dk.at(b, hkv, blk.start + j);
            scalar_t* dvr = dv.at(b, hkv, blk.start + j);
            for (int64_t d = 0; d < D; ++d) {
              dkr[d] = static_cast<scalar_t>(dk_blk[j * D + d]);
              dvr[d] = static_cast<scalar_t>(dv_blk[j * D + d]);
            }
          }
        }
      }

      if (splits > 1) {
        std::copy(dq_acc.begin(), dq_acc.end(), dq_parts.begin() + (pair * splits + split) * dq_size);
      } else {
        write_dq(b, hkv, dq_acc.data());
      }
    }
  });

  if (splits > 1) {
    at::parallel_for(0, pairs, 1, [&](int64_t pair_begin, int64_t pair_end) {
      std::vector<acc_t> sum(dq_size);
      for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t split = 0; split < splits; ++split) {
          const acc_t* part = dq_parts.data() + (pair * splits + split) * dq_size;
          for (int64_t x = 0; x < dq_size; ++x) {
            sum[x] += part[x];
          }
        }
        write_dq(pair / p.Hkv, pair % p.Hkv, sum.data());
      }
    });
  }

  // Sum each bank row's slots in slot order.
  scalar_t* dpk_data = dpk.data_ptr<scalar_t>();
  scalar_t* dpv_data = dpv.data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    std::vector<acc_t> sum_k(slot_size), sum_v(slot_size);
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (plan.last_slot[n] == 0) {
        continue;
      }
      std::fill(sum_k.begin(), sum_k.end(), acc_t(0));
      std::fill(sum_v.begin(), sum_v.end(), acc_t(0));
      for (int64_t slot = plan.first_slot[n]; slot < plan.last_slot[n]; ++slot) {
        for (int64_t x = 0; x < slot_size; ++x) {
          sum_k[x] += dk_slots[slot * slot_size + x];
          sum_v[x] += dv_slots[slot * slot_size + x];
        }
      }
      for (int64_t x = 0; x < slot_size; ++x) {
        dpk_data[n * slot_size + x] = static_cast<scalar_t>(sum_k[x]);
        dpv_data[n * slot_size + x] = static_cast<scalar_t>(sum_v[x]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points.

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

// sequence_out, sequence_lse: undefined, or the state the prefix part resumes from (see Problem).
std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& sequence_out, const at::Tensor& sequence_lse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& pk_in, const at::Tensor& pv_in,
    const std::optional<at::Tensor>& prefix_index_in,
    const std::optional<at::Tensor>& prefix_lens_in, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed_in) {
  const at::Tensor prefix_index = index_or_default(prefix_index_in, q_in);
  const at::Tensor prefix_lens = lens_or_default(prefix_lens_in, pk_in);
  const int64_t seed = seed_value(seed_in);
  check_inputs(q_in, k_in, v_in, pk_in, pv_in, prefix_index, prefix_lens, key_padding_mask);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "prefix_attention_cpu: dropout_p must be in [0, 1)");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor pk = unit_last_stride(pk_in), pv = unit_last_stride(pv_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_attention_fwd_cpu", [&] {
    auto p = make_problem<scalar_t>(q, k, v, pk, pv, prefix_index, prefix_lens, key_padding_mask, causal, scale,
                                    dropout_p, seed);
    if (sequence_out.defined()) {
      p.parts = kPrefixKeys;
      p.sequence_out = rows_of<const scalar_t>(sequence_out);
      p.sequence_lse = sequence_lse.data_ptr<typename AccType<scalar_t>::type>();
    }
    forward_kernel<scalar_t>(p, rows_of<scalar_t>(out), lse.data_ptr<float>());
  });
  return {out, lse};
}

// Arguments in the order of fastprompt.attention.args.AttentionArgs, whose fields generate the schema.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv,
    const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  return forward(at::Tensor(), at::Tensor(), q, k, v, pk, pv, prefix_index, prefix_lens, key_padding_mask, causal,
                 scale, dropout_p, seed);
}

// The prefix keys only, resuming from attention over the sequence keys: sequence_out [B, Hq, T, D] in q's
// dtype and sequence_lse [B, Hq, T] (-inf where a query saw no sequence key); returns the whole (out, lse).
std::tuple<at::Tensor, at::Tensor> prefix_attention_resume_fwd_cpu(
    const at::Tensor& sequence_out, const at::Tensor& sequence_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p == 0, "prefix_attention_resume_fwd_cpu: the sequence part carries no dropout");
  TORCH_CHECK(sequence_out.sizes() == q.sizes() && sequence_out.scalar_type() == q.scalar_type(),
              "prefix_attention_resume_fwd_cpu: sequence_out must have q's shape and dtype");
  TORCH_CHECK(sequence_lse.sizes() == q.sizes().slice(0, 3),
              "prefix_attention_resume_fwd_cpu: sequence_lse must be [B, Hq, T]");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return forward(unit_last_stride(sequence_out), sequence_lse.to(acc).contiguous(), q, k, v, pk, pv, prefix_index,
                 prefix_lens, key_padding_mask, causal, scale, dropout_p, seed);
}

// sequence_dq: undefined, or the sequence part's dq (another kernel's), to which the prefix part is added.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& sequence_dq, const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& pk_in, const at::Tensor& pv_in,
    const std::optional<at::Tensor>& prefix_index_in, const std::optional<at::Tensor>& prefix_lens_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed_in) {
  const at::Tensor prefix_index = index_or_default(prefix_index_in, q_in);
  const at::Tensor prefix_lens = lens_or_default(prefix_lens_in, pk_in);
  const int64_t seed = seed_value(seed_in);
  check_inputs(q_in, k_in, v_in, pk_in, pv_in, prefix_index, prefix_lens, key_padding_mask);
  TORCH_CHECK(!grad_lse_in.has_value() || grad_lse_in->sizes() == lse_in.sizes(),
              "prefix_attention_cpu: grad_lse must have lse's shape [B, Hq, T]");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "prefix_attention_cpu: dropout_p must be in [0, 1)");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention_cpu: grad_out and out must have q's shape");
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "prefix_attention_cpu: grad_out and out must have q's dtype");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3,
              "prefix_attention_cpu: lse must be float32 [B, Hq, T]");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor pk = unit_last_stride(pk_in), pv = unit_last_stride(pv_in);
  const at::Tensor grad_out = unit_last_stride(grad_out_in), out = unit_last_stride(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.has_value() ? grad_lse_in->to(at::kFloat).contiguous() : at::Tensor();
  const bool prefix_only = sequence_dq.defined();
  at::Tensor dq = prefix_only ? unit_last_stride(sequence_dq)
                              : at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // The prefix-only pass writes no sequence gradient: dk, dv stay empty.
  at::Tensor dk = at::zeros(prefix_only ? at::IntArrayRef{0} : k.sizes(), k.options());
  at::Tensor dv = at::zeros(prefix_only ? at::IntArrayRef{0} : v.sizes(), v.options());
  at::Tensor dpk = at::zeros(pk.sizes(), pk.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dpv = at::zeros(pv.sizes(), pv.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) {
    return {dq, dk, dv, dpk, dpv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_attention_bwd_cpu", [&] {
    auto p = make_problem<scalar_t>(q, k, v, pk, pv, prefix_index, prefix_lens, key_padding_mask, causal, scale,
                                    dropout_p, seed);
    p.parts = prefix_only ? kPrefixKeys : kAllKeys;
    const Rows<scalar_t> no_rows{nullptr, 0, 0, 0};
    backward_kernel<scalar_t>(p, rows_of<const scalar_t>(grad_out), rows_of<const scalar_t>(out),
                              lse.data_ptr<float>(), grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr,
                              rows_of<scalar_t>(dq), prefix_only ? no_rows : rows_of<scalar_t>(dk),
                              prefix_only ? no_rows : rows_of<scalar_t>(dv), dpk, dpv, pk.size(0));
  });
  return {dq, dk, dv, dpk, dpv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& pk, const at::Tensor& pv, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  return backward(at::Tensor(), grad_out, out, lse, grad_lse, q, k, v, pk, pv, prefix_index, prefix_lens,
                  key_padding_mask, causal, scale, dropout_p, seed);
}

// The prefix keys' part of the backward, added to the sequence part's sequence_dq [B, Hq, T, D]: returns
// (dq, dprefix_k, dprefix_v). out and lse are the whole attention's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_attention_resume_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& sequence_dq,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv,
    const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p == 0, "prefix_attention_resume_bwd_cpu: the sequence part carries no dropout");
  TORCH_CHECK(sequence_dq.sizes() == q.sizes() && sequence_dq.scalar_type() == q.scalar_type(),
              "prefix_attention_resume_bwd_cpu: sequence_dq must have q's shape and dtype");
  auto [dq, dk, dv, dpk, dpv] = backward(sequence_dq, grad_out, out, lse, std::nullopt, q, k, v, pk, pv,
                                         prefix_index, prefix_lens, key_padding_mask, causal, scale, dropout_p, seed);
  return {dq, dpk, dpv};
}

}  // namespace
}  // namespace fastprompt

// The schemas are defined in Python from the argument record (fastprompt/attention/cpu_backend.py); the
// dispatcher checks these signatures against them when both are registered.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("prefix_attention_fwd_cpu", &fastprompt::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd_cpu", &fastprompt::prefix_attention_bwd_cpu);
  m.impl("prefix_attention_resume_fwd_cpu", &fastprompt::prefix_attention_resume_fwd_cpu);
  m.impl("prefix_attention_resume_bwd_cpu", &fastprompt::prefix_attention_resume_bwd_cpu);
}
