// Backward of fastprompt's prefix attention on the CPU (see prefix_attention.h).

#include "prefix_attention.h"

namespace fastprompt {
namespace {

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
    constexpr int64_t BK = kBackwardBlockK;
    std::vector<acc_t> kp(BK * D), kt(D * BK), vt(D * BK), dk_blk(BK * D), dv_blk(BK * D), qp(max_rows * D),
        dop(max_rows * D), prob(max_rows * BK), dprob(max_rows * BK), drop(max_rows * BK), delta(T * G),
        lse_rows(T * G), dq_acc(dq_size), padding_buf(BK);
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

      const std::vector<KeyBlock> blocks = key_blocks(p, b, T - 1, p.parts, BK);
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
        const acc_t* padding = block_padding(p, b, blk, padding_buf.data());
        const int64_t col0 = blk.prefix ? blk.start : p.P + blk.start;
        const int64_t n = blk.len;
        const auto [kmat, ldkm] = rows_as_acc(krow, ldk, n, D, kp.data());
        // S = Q K^T and dP = dO V^T read K and V in place where the BLAS can, else packed transposed
        constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;
        const bool blas = in_place && blas_gemm<acc_t>() != nullptr;
        if (!blas) {
          pack_transposed(krow, ldk, n, D, kt.data(), BK);
          pack_transposed(vrow, ldv, n, D, vt.data(), BK);
        }
        const auto scores = [&](const acc_t* a, const scalar_t* rows_in_place, const std::vector<acc_t>& packed,
                                int64_t ld_in_place, int64_t M, acc_t* c) {
          if constexpr (in_place) {
            if (blas) {
              gemm_abt_blas<acc_t>(M, n, D, a, D, rows_in_place, ld_in_place, c, BK);
              return;
            }
          }
          gemm<acc_t>(M, n, D, a, D, 1, packed.data(), BK, c, BK, false);
        };
        std::fill(dk_blk.begin(), dk_blk.end(), acc_t(0));
        std::fill(dv_blk.begin(), dv_blk.end(), acc_t(0));
        for (int64_t t0 = first_query(blk) / positions * positions; t0 < T; t0 += positions) {
          const int64_t tn = std::min(positions, T - t0);
          const int64_t M = tn * G;
          pack_queries(p.q, b, hkv, G, t0, tn, D, acc_t(1), qp.data());
          pack_queries(grad_out, b, hkv, G, t0, tn, D, acc_t(1), dop.data());
          scores(qp.data(), krow, kt, ldk, M, prob.data());
          const acc_t* pd = p.dropout.active ? dprob.data() : prob.data();  // probabilities after dropout
          for (int64_t r = 0; r < M; ++r) {
            acc_t* prow = prob.data() + r * BK;
            const int64_t t = t0 + r / G;
            const acc_t row_lse = lse_rows[t * G + r % G];
            if (row_lse == -std::numeric_limits<acc_t>::infinity() || !mask_row(p, t, blk, padding, prow)) {
              std::fill(prow, prow + n, acc_t(0));
            } else {
              exp_and_sum(prow, n, scale, row_lse);
            }
            if (p.dropout.active) {
              acc_t* mrow = drop.data() + r * BK;
              p.dropout.row_multipliers(p.dropout.row_key(b, hkv * G + r % G, t, p.Hq, T), col0, n, mrow);
              acc_t* pdrow = dprob.data() + r * BK;
              for (int64_t j = 0; j < n; ++j) {
                pdrow[j] = prow[j] * mrow[j];
              }
            }
          }
          // dV += Pd^T dO
          gemm<acc_t>(n, D, M, pd, 1, BK, dop.data(), D, dv_blk.data(), D, true);
          // dP = dO V^T, then dS = P * (dP * dropout - delta) * scale (in place in dprob)
          scores(dop.data(), vrow, vt, ldv, M, dprob.data());
          for (int64_t r = 0; r < M; ++r) {
            const acc_t* prow = prob.data() + r * BK;
            acc_t* dsrow = dprob.data() + r * BK;
            const acc_t* mrow = drop.data() + r * BK;
            const acc_t row_delta = delta[(t0 + r / G) * G + r % G];
            for (int64_t j = 0; j < n; ++j) {
              const acc_t dp = p.dropout.active ? dsrow[j] * mrow[j] : dsrow[j];
              dsrow[j] = prow[j] * (dp - row_delta) * scale;
            }
          }
          // dQ += dS K ; dK += dS^T Q
          gemm<acc_t>(M, D, n, dprob.data(), BK, 1, kmat, ldkm, dq_acc.data() + t0 * G * D, D, true);
          gemm<acc_t>(n, D, M, dprob.data(), 1, BK, qp.data(), D, dk_blk.data(), D, true);
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
  m.impl("prefix_attention_bwd_cpu", &fastprompt::prefix_attention_bwd_cpu);
  m.impl("prefix_attention_resume_bwd_cpu", &fastprompt::prefix_attention_resume_bwd_cpu);
}
