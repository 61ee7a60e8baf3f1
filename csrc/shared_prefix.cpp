// CPU kernel of the shared-prefix decode: the prefix part, each bank row read once for its whole group.
//
// Shapes (see fastprompt.shared_prefix): q [B, Hq, T, D]; prefix_k, prefix_v [N, Hkv, P, D]; the plan's
// order int32 [B] (batch rows grouped by bank row), group_starts int32 [G + 1], group_banks int32 [G],
// group_lens int32 [G]. Returns out [B, Hq, T, D] (q's dtype) and lse float32 [B, Hq, T]; rows of
// groups of length 0 (no prefix) get out 0 and lse -inf.
//
// One work item = (group, kv head, chunk of the prefix): the queries of every row of the group that read
// that kv head are stacked into one [rows x T x Hq/Hkv, D] matrix, so the chunk is multiplied once
// (two GEMMs) for all of them. Chunks give the threads work when groups x heads are fewer than the
// threads; their (out, lse) partials are merged by log-sum-exp. Every prefix key is visible to every
// query of its row, so a chunk's softmax needs no mask and its lse is finite. Forward only (decode).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastprompt {
namespace {

constexpr int64_t kChunkAlign = 64;     // keys per chunk are a multiple of this
constexpr int64_t kMinChunk = 128;      // below this, the GEMMs are too small to pay for a partial
constexpr int64_t kMaxChunk = 2048;     // bounds the [rows, chunk] score matrix of one item

struct Group {
  int64_t first, count, bank, len, chunks, first_item;
};

struct Item {
  int64_t group, hkv, chunk;
};

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

  const at::ScalarType compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions opts = q.options().dtype(compute);
  const int64_t G = Hq / Hkv, per_row = G * T;
  at::Tensor out = at::zeros({B, Hq, T, D}, opts);
  at::Tensor lse = at::full({B, Hq, T}, -std::numeric_limits<double>::infinity(), opts);

  int64_t total_keys = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    total_keys += lens[g];
  }
  const int64_t want_items = 2 * at::get_num_threads();
  int64_t chunk = (total_keys * Hkv + want_items - 1) / want_items;
  chunk = std::clamp((chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign, kMinChunk, kMaxChunk);

  std::vector<Group> groups;
  std::vector<Item> items;
  for (int64_t g = 0; g < n_groups; ++g) {
    if (lens[g] == 0) {
      continue;
    }
    const int64_t chunks = (lens[g] + chunk - 1) / chunk;
    groups.push_back({starts[g], starts[g + 1] - starts[g], banks[g], lens[g], chunks,
                      static_cast<int64_t>(items.size())});
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t c = 0; c < chunks; ++c) {
        items.push_back({static_cast<int64_t>(groups.size()) - 1, h, c});
      }
    }
  }
  std::vector<at::Tensor> part_out(items.size()), part_lse(items.size());

  // Tensors over the inputs' memory carry no autograd history, and the workers run in inference mode:
  // the ATen calls below are plain arithmetic whatever the caller's grad mode.
  const at::Tensor q_c = q.contiguous(), pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  const at::Tensor q_raw = at::from_blob(q_c.data_ptr(), q_c.sizes(), q_c.options());
  const at::Tensor pk_raw = at::from_blob(pk.data_ptr(), pk.sizes(), pk.options());
  const at::Tensor pv_raw = at::from_blob(pv.data_ptr(), pv.sizes(), pv.options());

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const Group& grp = groups[item.group];
      // [rows x T x G, D]: row r is batch row order[first + r / per_row], head hkv * G + (r / T) % G, t = r % T
      const at::Tensor rows = at::from_blob(const_cast<int32_t*>(order_p + grp.first), {grp.count},
                                            order.options()).to(at::kLong);
      const at::Tensor stacked =
          q_raw.narrow(1, item.hkv * G, G).index_select(0, rows).reshape({grp.count * per_row, D}).to(compute);
      const int64_t start = item.chunk * chunk, len = std::min(chunk, grp.len - start);
      const at::Tensor keys = pk_raw[grp.bank][item.hkv].narrow(0, start, len).to(compute);
      const at::Tensor values = pv_raw[grp.bank][item.hkv].narrow(0, start, len).to(compute);
      at::Tensor logits = at::mm(stacked, keys.t()).mul_(scale);  // [M, len]
      const at::Tensor row_max = logits.amax(1, true);
      logits.sub_(row_max).exp_();
      const at::Tensor total = logits.sum(1, true);
      part_out[i] = at::mm(logits, values).div_(total);     // [M, D]
      part_lse[i] = (row_max + total.log()).squeeze(1);    // [M]
    }
  });

  // Merge the chunks of each (group, kv head) and scatter the stacked rows back to [B, Hq, T].
  at::parallel_for(0, static_cast<int64_t>(groups.size()) * Hkv, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    for (int64_t gh = begin; gh < end; ++gh) {
      const Group& grp = groups[gh / Hkv];
      const int64_t hkv = gh % Hkv, first_item = grp.first_item + hkv * grp.chunks;
      at::Tensor merged_out = part_out[first_item], merged_lse = part_lse[first_item];
      if (grp.chunks > 1) {
        const at::Tensor lses = at::stack(at::ArrayRef<at::Tensor>(part_lse).slice(first_item, grp.chunks));
        merged_lse = at::logsumexp(lses, 0);
        const at::Tensor weights = (lses - merged_lse).exp_().unsqueeze(-1);
        merged_out = (at::stack(at::ArrayRef<at::Tensor>(part_out).slice(first_item, grp.chunks)) * weights).sum(0);
      }
      const at::Tensor rows = at::from_blob(const_cast<int32_t*>(order_p + grp.first), {grp.count},
                                            order.options()).to(at::kLong);
      // out[rows, hkv * G : (hkv + 1) * G] = merged (rows of distinct groups and heads never overlap)
      out.narrow(1, hkv * G, G).index_copy_(0, rows, merged_out.view({grp.count, G, T, D}));
      lse.narrow(1, hkv * G, G).index_copy_(0, rows, merged_lse.view({grp.count, G, T}));
    }
  });
  return {out.to(q.scalar_type()), lse.to(at::kFloat)};
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
