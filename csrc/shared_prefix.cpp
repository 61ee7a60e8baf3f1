// CPU kernel of the shared-prefix decode: the prefix part, each bank row read once for its whole group.
//
// Shapes (see fastprompt.shared_prefix): q [B, Hq, T, D]; prefix_k, prefix_v [N, Hkv, P, D]; the plan's
// order int32 [B] (batch rows grouped by bank row), group_starts int32 [G + 1], group_banks int32 [G],
// group_lens int32 [G]. Returns out [B, Hq, T, D] (q's dtype) and lse float32 [B, Hq, T]; rows of
// groups of length 0 (no prefix) get out 0 and lse -inf.
//
// One work item = (group, kv head): the queries of every row of the group that read that kv head are
// stacked into one [rows x T x Hq/Hkv, D] matrix, so each chunk of the bank row is multiplied once (two
// GEMMs) for all of them; the chunks' (out, lse) partials are merged by log-sum-exp. Every prefix key is
// visible to every query of its row, so a chunk's softmax needs no mask and its lse is finite. One
// parallel region (or none): a decode step pays for no extra thread barrier. Forward only (decode).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastprompt {
namespace {

constexpr int64_t kChunk = 2048;  // keys per chunk: bounds the [rows, chunk] score matrix of one pair

struct Group {
  int64_t first, count, bank, len, chunks;
};

struct Problem {
  at::Tensor q, pk, pv;  // contiguous
  const int32_t* order;
  int64_t G;
  double scale;
};

// The stacked queries of a group that read kv head hkv against one chunk of its bank row.
// Writes the chunk's normalised output [M, D] and lse [M].
template <typename scalar_t, typename acc_t>
void attend_chunk(const Problem& p, const Group& grp, int64_t hkv, int64_t chunk_index, std::vector<acc_t>& qs,
                  std::vector<acc_t>& kbuf, std::vector<acc_t>& vbuf, std::vector<acc_t>& scores,
                  std::vector<acc_t>& out, std::vector<acc_t>& lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t Hq = p.q.size(1), T = p.q.size(2), D = p.q.size(3), Hkv = p.pk.size(1), P = p.pk.size(2);
  const int64_t per_row = p.G * T, M = grp.count * per_row;
  const int64_t start = chunk_index * kChunk, n = std::min(kChunk, grp.len - start);
  const scalar_t* q = p.q.data_ptr<scalar_t>();
  qs.resize(M * D);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = p.order[grp.first + r / per_row], hq = hkv * p.G + (r / T) % p.G, t = r % T;
    const scalar_t* src = q + ((b * Hq + hq) * T + t) * D;
    for (int64_t d = 0; d < D; ++d) {
      qs[r * D + d] = static_cast<acc_t>(src[d]) * static_cast<acc_t>(p.scale);
    }
  }
  const int64_t offset = ((grp.bank * Hkv + hkv) * P + start) * D;
  const auto as_acc = [&](const at::Tensor& bank, std::vector<acc_t>& buf) -> const acc_t* {
    const scalar_t* src = bank.data_ptr<scalar_t>() + offset;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      buf.resize(n * D);
      for (int64_t x = 0; x < n * D; ++x) {
        buf[x] = static_cast<acc_t>(src[x]);
      }
      return buf.data();
    }
  };
  const acc_t* keys = as_acc(p.pk, kbuf);
  const acc_t* values = as_acc(p.pv, vbuf);
  scores.resize(M * n);
  out.resize(M * D);
  // Tensors over the buffers (no copies, no autograd history) for the two GEMMs.
  const at::TensorOptions acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto view = [&](const acc_t* data, int64_t rows, int64_t cols) {
    return at::from_blob(const_cast<acc_t*>(data), {rows, cols}, acc_options);
  };
  at::Tensor score_view = view(scores.data(), M, n), out_view = view(out.data(), M, D);
  at::mm_out(score_view, view(qs.data(), M, D), view(keys, n, D).t());
  lse.resize(M);
  std::vector<acc_t> inv(M);
  for (int64_t r = 0; r < M; ++r) {
    acc_t* row = scores.data() + r * n;
    const acc_t row_max = at::vec::reduce_all<acc_t>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, row, n);
    at::vec::map([row_max](Vec x) { return (x - Vec(row_max)).exp(); }, row, row, n);
    const acc_t total = at::vec::reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, row, n);
    lse[r] = row_max + std::log(total);
    inv[r] = acc_t(1) / total;
  }
  at::mm_out(out_view, score_view, view(values, n, D));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t d = 0; d < D; ++d) {
      out[r * D + d] *= inv[r];
    }
  }
}

template <typename scalar_t>
void grouped_kernel(const Problem& p, const std::vector<Group>& groups, at::Tensor& out, at::Tensor& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t Hq = p.q.size(1), T = p.q.size(2), D = p.q.size(3), Hkv = p.pk.size(1), per_row = p.G * T;
  const int64_t pairs = static_cast<int64_t>(groups.size()) * Hkv;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  float* lse_p = lse.data_ptr<float>();
  const auto attend_pairs = [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;  // plain arithmetic on buffers: skip autograd dispatch
    std::vector<acc_t> qs, kbuf, vbuf, scores, merged(D);
    std::vector<std::vector<acc_t>> part_out, part_lse;
    for (int64_t gh = begin; gh < end; ++gh) {
      const Group& grp = groups[gh / Hkv];
      const int64_t hkv = gh % Hkv;
      part_out.resize(grp.chunks);
      part_lse.resize(grp.chunks);
      for (int64_t c = 0; c < grp.chunks; ++c) {
        attend_chunk<scalar_t, acc_t>(p, grp, hkv, c, qs, kbuf, vbuf, scores, part_out[c], part_lse[c]);
      }
      // Merge the chunks by log-sum-exp and scatter the stacked rows to [B, Hq, T].
      for (int64_t r = 0; r < grp.count * per_row; ++r) {
        acc_t row_max = -std::numeric_limits<acc_t>::infinity();
        for (int64_t c = 0; c < grp.chunks; ++c) {
          row_max = std::max(row_max, part_lse[c][r]);
        }
        std::fill(merged.begin(), merged.end(), acc_t(0));
        acc_t total = 0;
        for (int64_t c = 0; c < grp.chunks; ++c) {
          const acc_t w = std::exp(part_lse[c][r] - row_max);
          total += w;
          for (int64_t d = 0; d < D; ++d) {
            merged[d] += w * part_out[c][r * D + d];
          }
        }
        const int64_t b = p.order[grp.first + r / per_row], hq = hkv * p.G + (r / T) % p.G, t = r % T;
        const int64_t row = (b * Hq + hq) * T + t;
        for (int64_t d = 0; d < D; ++d) {
          out_p[row * D + d] = static_cast<scalar_t>(merged[d] / total);
        }
        lse_p[row] = static_cast<float>(row_max + std::log(total));
      }
    }
  };
  // One (group, kv head) pair per thread when there are enough; otherwise one pair at a time, with each
  // GEMM spread over the threads by ATen (a parallel region would run it on one thread).
  if (pairs >= at::get_num_threads()) {
    at::parallel_for(0, pairs, 1, attend_pairs);
  } else {
    attend_pairs(0, pairs);
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_prefix_attention_cpu(
    const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& order,
    const at::Tensor& group_starts, const at::Tensor& group_banks, const at::Tensor& group_lens, double scale) {
  TORCH_CHECK(q.dim() == 4 && prefix_k.dim() == 4 && prefix_k.sizes() == prefix_v.sizes(),
              "grouped_prefix_attention_cpu: q must be [B, Hq, T, D] and prefix_k, prefix_v [N, Hkv, P, D]");
  TORCH_CHECK(q.device().is_cpu() && prefix_k.device().is_cpu() && prefix_v.device().is_cpu(),
              "grouped_prefix_attention_cpu: expected CPU tensors");
  TORCH_CHECK(prefix_k.scalar_type() == q.scalar_type() && prefix_v.scalar_type() == q.scalar_type(),
              "grouped_prefix_attention_cpu: q, prefix_k, prefix_v must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t N = prefix_k.size(0), Hkv = prefix_k.size(1), P = prefix_k.size(2);
  TORCH_CHECK(prefix_k.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
              "grouped_prefix_attention_cpu: head dims differ or Hq is not a multiple of Hkv");
  for (const at::Tensor* t : {&order, &group_starts, &group_banks, &group_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->dim() == 1 && t->device().is_cpu(),
                "grouped_prefix_attention_cpu: the plan's tensors must be contiguous int32 CPU vectors");
  }
  const int64_t n_groups = group_banks.numel();
  TORCH_CHECK(order.numel() == B && group_starts.numel() == n_groups + 1 && group_lens.numel() == n_groups,
              "grouped_prefix_attention_cpu: the plan does not match the batch");
  const int32_t* order_p = order.data_ptr<int32_t>();
  const int32_t* starts = group_starts.data_ptr<int32_t>();
  const int32_t* banks = group_banks.data_ptr<int32_t>();
  const int32_t* lens = group_lens.data_ptr<int32_t>();
  // Values become memory offsets: check them all (B + G values, once per call).
  TORCH_CHECK(starts[0] == 0 && starts[n_groups] == B, "grouped_prefix_attention_cpu: group_starts must span [0, B]");
  for (int64_t g = 0; g < n_groups; ++g) {
    TORCH_CHECK(starts[g] <= starts[g + 1] && banks[g] >= -1 && banks[g] < N && lens[g] >= 0 && lens[g] <= P &&
                    (banks[g] >= 0 || lens[g] == 0),
                "grouped_prefix_attention_cpu: group ", g, " is malformed");
  }
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(order_p[i] >= 0 && order_p[i] < B, "grouped_prefix_attention_cpu: order[", i, "] is not a row");
  }

  const int64_t G = Hq / Hkv;

  std::vector<Group> groups;
  for (int64_t g = 0; g < n_groups; ++g) {
    if (lens[g] > 0) {
      groups.push_back({starts[g], starts[g + 1] - starts[g], banks[g], lens[g], (lens[g] + kChunk - 1) / kChunk});
    }
  }
  at::Tensor out = at::zeros({B, Hq, T, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::full({B, Hq, T}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  const Problem problem{q.contiguous(), prefix_k.contiguous(), prefix_v.contiguous(), order_p, G, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "grouped_prefix_attention_cpu", [&] {
    grouped_kernel<scalar_t>(problem, groups, out, lse);
  });
  return {out, lse};
}

}  // namespace
}  // namespace fastprompt

TORCH_LIBRARY_FRAGMENT(fastprompt, m) {
  m.def(
      "grouped_prefix_attention_cpu(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor order, "
      "Tensor group_starts, Tensor group_banks, Tensor group_lens, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("grouped_prefix_attention_cpu", &fastprompt::grouped_prefix_attention_cpu);
}
