// CPU fused router losses: one pass over every layer's logits computes the softmax, the top-k
// selection, the load-balancing statistics and logsumexp for the z-loss.
//
//   R        = number of kept rows over all layers (row_mask != 0; all rows without a mask)
//   count_e  = number of kept rows that selected expert e among their top_k
//   psum_e   = sum over kept rows of softmax(logits)_e
//   aux      = E * sum_e (count_e / R) * (psum_e / R)          (HF load_balancing_loss_func)
//   z        = (1 / R) * sum over kept rows of logsumexp(logits)^2   (ST-MoE z-loss)
// With R == 0 both losses are 0 (HF would return NaN). Top-k ranks by logit value (softmax is
// monotonic), ties go to the lower expert index. Deterministic: rows are split into fixed chunks
// whose partial sums are reduced in chunk order, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "validation.h"

namespace moeforge {
namespace {

constexpr int64_t kChunkRows = 512;

// Writes softmax probabilities of `row` into p[0..E) and returns logsumexp.
template <typename scalar_t, typename acc_t>
acc_t softmax_row(const scalar_t* row, int64_t num_experts, acc_t* p) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) mx = std::max(mx, acc_t(row[e]));
  acc_t sum = 0;
  for (int64_t e = 0; e < num_experts; ++e) sum += (p[e] = std::exp(acc_t(row[e]) - mx));
  for (int64_t e = 0; e < num_experts; ++e) p[e] /= sum;
  return mx + std::log(sum);
}

// Indices of the top_k largest logits (compared in float, double for float64; ties to the lower
// index), written into sel[0..top_k).
template <typename scalar_t>
void top_k_row(const scalar_t* row, int64_t num_experts, int64_t top_k, int64_t* sel) {
  using acc_t = at::opmath_type<scalar_t>;
  // NaN ranks lowest (as -inf), so a row of NaN logits still selects exactly top_k experts.
  const auto rank = [&](int64_t e) {
    const acc_t v = static_cast<acc_t>(row[e]);
    return std::isnan(v) ? -std::numeric_limits<acc_t>::infinity() : v;
  };
  int64_t n = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc_t v = rank(e);
    int64_t pos = n < top_k ? n++ : top_k;
    // Shift smaller entries down; strict '>' keeps the earlier (lower) index ahead on ties.
    while (pos > 0 && v > rank(sel[pos - 1])) {
      if (pos < top_k) sel[pos] = sel[pos - 1];
      --pos;
    }
    if (pos < top_k) sel[pos] = e;
  }
}

// The rows of all layers as one index space: (layer, row) of global row g.
struct Rows {
  std::vector<int64_t> starts;  // starts[l] = first global row of layer l; back() = total
  std::pair<int64_t, int64_t> locate(int64_t g) const {
    const auto it = std::upper_bound(starts.begin(), starts.end(), g);
    const int64_t l = (it - starts.begin()) - 1;
    return {l, g - starts[l]};
  }
};

Rows make_rows(const std::vector<at::Tensor>& logits) {
  Rows r;
  r.starts.push_back(0);
  for (const auto& t : logits) r.starts.push_back(r.starts.back() + t.size(0));
  return r;
}

std::vector<at::Tensor> contiguous_all(at::TensorList logits) {
  std::vector<at::Tensor> out;
  out.reserve(logits.size());
  for (const auto& t : logits) out.push_back(t.contiguous());
  return out;
}

// Keep flags per row, from the optional mask (nonzero = keep).
std::vector<uint8_t> keep_flags(const std::optional<at::Tensor>& row_mask) {
  if (!row_mask.has_value()) return {};
  const at::Tensor m = row_mask->ne(0).to(at::kByte).contiguous();
  const uint8_t* p = m.data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + m.numel());
}

at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_loss_cpu(
    at::TensorList logits_in, const std::optional<at::Tensor>& row_mask, int64_t top_k) {
  check_router_loss_inputs("router_loss", logits_in, row_mask, top_k);
  const std::vector<at::Tensor> logits = contiguous_all(logits_in);
  const int64_t num_experts = logits[0].size(1);
  const Rows rows = make_rows(logits);
  const std::vector<uint8_t> keep = keep_flags(row_mask);
  const int64_t total = rows.starts.back();
  const int64_t num_chunks = (total + kChunkRows - 1) / kChunkRows;
  // Per chunk: [count_0..E) [psum_0..E) [zsum] [kept rows].
  const int64_t width = 2 * num_experts + 2;
  std::vector<double> partial(num_chunks * width, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits[0].scalar_type(), "moeforge.router_loss", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
          std::vector<acc_t> p(num_experts);
          std::vector<int64_t> sel(top_k);
          for (int64_t c = c0; c < c1; ++c) {
            double* part = partial.data() + c * width;
            const int64_t g_end = std::min(total, (c + 1) * kChunkRows);
            for (int64_t g = c * kChunkRows; g < g_end; ++g) {
              const auto [l, t] = rows.locate(g);
              if (!keep.empty() && !keep[t]) continue;
              const scalar_t* row = logits[l].data_ptr<scalar_t>() + t * num_experts;
              const acc_t lse = softmax_row(row, num_experts, p.data());
              top_k_row(row, num_experts, top_k, sel.data());
              for (int64_t k = 0; k < top_k; ++k) part[sel[k]] += 1.0;
              for (int64_t e = 0; e < num_experts; ++e) part[num_experts + e] += double(p[e]);
              part[2 * num_experts] += double(lse) * double(lse);
              part[2 * num_experts + 1] += 1.0;
            }
          }
        });
      });

  std::vector<double> sum(width, 0.0);
  for (int64_t c = 0; c < num_chunks; ++c) {
    for (int64_t i = 0; i < width; ++i) sum[i] += partial[c * width + i];
  }
  const double kept = sum[2 * num_experts + 1];
  double aux = 0.0, z = 0.0;
  at::Tensor counts = at::empty({num_experts}, logits[0].options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    cnt[e] = static_cast<int64_t>(sum[e]);
    aux += sum[e] * sum[num_experts + e];
  }
  if (kept > 0) {
    aux *= double(num_experts) / (kept * kept);
    z = sum[2 * num_experts] / kept;
  }
  const auto opts = logits[0].options().dtype(loss_dtype(logits[0]));
  return {at::scalar_tensor(aux, opts), at::scalar_tensor(z, opts), counts};
}

std::vector<at::Tensor> router_loss_backward_cpu(const at::Tensor& grad_aux,
                                                 const at::Tensor& grad_z, at::TensorList logits_in,
                                                 const std::optional<at::Tensor>& row_mask,
                                                 const at::Tensor& expert_counts, int64_t top_k) {
  constexpr std::string_view op = "router_loss_backward";
  check_router_loss_inputs(op, logits_in, row_mask, top_k);
  const std::vector<at::Tensor> logits = contiguous_all(logits_in);
  const int64_t num_experts = logits[0].size(1);
  MOEFORGE_CHECK_VALUE(expert_counts.dim() == 1 && expert_counts.size(0) == num_experts, op,
                       "expert_counts must be [num_experts] = [", num_experts, "], got ",
                       expert_counts.sizes());
  const std::vector<uint8_t> keep = keep_flags(row_mask);
  int64_t kept = 0;
  for (const auto& t : logits) kept += t.size(0);
  if (!keep.empty()) {
    int64_t per_layer = 0;
    for (uint8_t k : keep) per_layer += k;
    kept = per_layer * static_cast<int64_t>(logits.size());
  }
  const std::vector<double> counts = [&] {
    const at::Tensor c = expert_counts.to(at::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + num_experts);
  }();
  const double ga = grad_aux.item<double>(), gz = grad_z.item<double>();
  const double inv = kept > 0 ? 1.0 / double(kept) : 0.0;
  const double c_aux = ga * double(num_experts) * inv * inv;  // d aux / d psum_e = c_aux * count_e
  const double c_z = gz * 2.0 * inv;                          // d z / d lse = c_z * lse

  std::vector<at::Tensor> grads;
  for (const auto& lg : logits) {
    at::Tensor g = at::empty_like(lg);
    const int64_t n = lg.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, lg.scalar_type(), "moeforge.router_loss_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const scalar_t* in = lg.data_ptr<scalar_t>();
          scalar_t* out = g.data_ptr<scalar_t>();
          at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
            std::vector<acc_t> p(num_experts);
            for (int64_t t = begin; t < end; ++t) {
              scalar_t* grow = out + t * num_experts;
              if (!keep.empty() && !keep[t]) {
                std::fill(grow, grow + num_experts, scalar_t(0));
                continue;
              }
              const acc_t lse = softmax_row(in + t * num_experts, num_experts, p.data());
              acc_t dot = 0;
              for (int64_t e = 0; e < num_experts; ++e) dot += p[e] * acc_t(counts[e]);
              for (int64_t e = 0; e < num_experts; ++e) {
                const acc_t d =
                    acc_t(c_aux) * p[e] * (acc_t(counts[e]) - dot) + acc_t(c_z) * lse * p[e];
                grow[e] = static_cast<scalar_t>(d);
              }
            }
          });
        });
    grads.push_back(g);
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("router_loss", &router_loss_cpu);
  m.impl("router_loss_backward", &router_loss_backward_cpu);
}

}  // namespace moeforge
