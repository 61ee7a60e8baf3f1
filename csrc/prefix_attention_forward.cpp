// Forward of fastprompt's prefix attention on the CPU (see prefix_attention.h).

#include "prefix_attention.h"

namespace fastprompt {
namespace {

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
  // Resuming, the output is the sequence part's, finished in place: each work item reads its rows' state
  // before it writes them, and no two items share a row.
  at::Tensor out = sequence_out.defined() ? sequence_out
                                          : at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
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
// dtype and sequence_lse [B, Hq, T] (-inf where a query saw no sequence key); returns the whole (out, lse),
// out being sequence_out, overwritten (its last dimension must have unit stride).
std::tuple<at::Tensor, at::Tensor> prefix_attention_resume_fwd_cpu(
    at::Tensor& sequence_out, const at::Tensor& sequence_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p == 0, "prefix_attention_resume_fwd_cpu: the sequence part carries no dropout");
  TORCH_CHECK(sequence_out.sizes() == q.sizes() && sequence_out.scalar_type() == q.scalar_type(),
              "prefix_attention_resume_fwd_cpu: sequence_out must have q's shape and dtype");
  TORCH_CHECK(sequence_lse.sizes() == q.sizes().slice(0, 3),
              "prefix_attention_resume_fwd_cpu: sequence_lse must be [B, Hq, T]");
  TORCH_CHECK(sequence_out.size(-1) <= 1 || sequence_out.stride(-1) == 1,
              "prefix_attention_resume_fwd_cpu: sequence_out's last dimension must have unit stride");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return forward(sequence_out, sequence_lse.to(acc).contiguous(), q, k, v, pk, pv, prefix_index,
                 prefix_lens, key_padding_mask, causal, scale, dropout_p, seed);
}

// sequence_dq: undefined, or the sequence part's dq (another kernel's), to which the prefix part is added.

}  // namespace
}  // namespace fastprompt

// The schemas are defined in Python from the argument record (fastprompt/attention/cpu_backend.py); the
// dispatcher checks these signatures against them when both are registered.
TORCH_LIBRARY_IMPL(fastprompt, CPU, m) {
  m.impl("prefix_attention_fwd_cpu", &fastprompt::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_resume_fwd_cpu", &fastprompt::prefix_attention_resume_fwd_cpu);
}
