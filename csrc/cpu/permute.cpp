// CPU permute / combine / routed_dot: row gathers and token-major reductions over the routing
// plan, threaded over rows with at::parallel_for, accumulating in float (double for float64).
// Deterministic: every output element is written by exactly one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "validation.h"

namespace moeforge {
namespace {

constexpr int64_t kRowGrain = 64;

// Routing weights as a contiguous tensor of the accumulation type, or undefined.
at::Tensor weights_as(const std::optional<at::Tensor>& weights, at::ScalarType acc) {
  return weights.has_value() ? weights->to(acc).contiguous() : at::Tensor();
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& sorted_pairs_in,
                       const at::Tensor& pair_to_row_in, const std::optional<at::Tensor>& weights) {
  check_permute_inputs(x_in, sorted_pairs_in, pair_to_row_in, weights);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_rows = sorted_pairs.numel(), top_k = pair_to_row.size(1), hidden = x.size(1);
  at::Tensor out = at::empty({num_rows, hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "moeforge.permute", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor w = weights_as(weights, c10::CppTypeToScalarType<acc_t>::value);
        const acc_t* w_ptr = w.defined() ? w.data_ptr<acc_t>() : nullptr;
        const scalar_t* x_ptr = x.data_ptr<scalar_t>();
        const int32_t* pairs = sorted_pairs.data_ptr<int32_t>();
        const int32_t* rows = pair_to_row.data_ptr<int32_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t p = pairs[i];
            MOEFORGE_CHECK_VALUE(p >= 0 && p < num_rows, "permute", "sorted_pairs[", i,
                                 "] must be in [0, ", num_rows, "), got ", p);
            scalar_t* dst = o + i * hidden;
            if (rows[p] < 0) {  // dropped pair
              std::fill(dst, dst + hidden, scalar_t(0));
              continue;
            }
            MOEFORGE_CHECK_VALUE(rows[p] == i, "permute",
                                 "pair_to_row and sorted_pairs disagree: ", "sorted_pairs[", i,
                                 "]=", p, " but pair_to_row.flatten()[", p, "]=", rows[p]);
            const scalar_t* src = x_ptr + (p / top_k) * hidden;
            const acc_t scale = w_ptr ? w_ptr[p] : acc_t(1);
            for (int64_t h = 0; h < hidden; ++h)
              dst[h] = static_cast<scalar_t>(scale * acc_t(src[h]));
          }
        });
      });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& y_in, const at::Tensor& sorted_pairs,
                       const at::Tensor& pair_to_row_in, const std::optional<at::Tensor>& weights) {
  check_combine_inputs(y_in, sorted_pairs, pair_to_row_in, weights);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_tokens = pair_to_row.size(0), top_k = pair_to_row.size(1);
  const int64_t num_rows = y.size(0), hidden = y.size(1);
  at::Tensor out = at::empty({num_tokens, hidden}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "moeforge.combine", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor w = weights_as(weights, c10::CppTypeToScalarType<acc_t>::value);
        const acc_t* w_ptr = w.defined() ? w.data_ptr<acc_t>() : nullptr;
        const scalar_t* y_ptr = y.data_ptr<scalar_t>();
        const int32_t* rows = pair_to_row.data_ptr<int32_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> acc(hidden);
          for (int64_t t = begin; t < end; ++t) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t k = 0; k < top_k; ++k) {
              const int64_t row = rows[t * top_k + k];
              if (row < 0) continue;  // dropped pair
              MOEFORGE_CHECK_VALUE(row < num_rows, "combine", "pair_to_row[", t, ", ", k,
                                   "] must be < num_rows of y (", num_rows, "), got ", row);
              const acc_t scale = w_ptr ? w_ptr[t * top_k + k] : acc_t(1);
              const scalar_t* src = y_ptr + row * hidden;
              for (int64_t h = 0; h < hidden; ++h) acc[h] += scale * acc_t(src[h]);
            }
            scalar_t* dst = o + t * hidden;
            for (int64_t h = 0; h < hidden; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
          }
        });
      });
  return out;
}

at::Tensor routed_dot_cpu(const at::Tensor& rows_in, const at::Tensor& tokens_in,
                          const at::Tensor& pair_to_row_in) {
  check_routed_dot_inputs(rows_in, tokens_in, pair_to_row_in);
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor pair_to_row = pair_to_row_in.contiguous();
  const int64_t num_tokens = tokens.size(0), top_k = pair_to_row.size(1);
  const int64_t num_rows = rows.size(0), hidden = rows.size(1);
  at::Tensor out = at::empty({num_tokens, top_k}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows.scalar_type(), "moeforge.routed_dot", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* r_ptr = rows.data_ptr<scalar_t>();
        const scalar_t* t_ptr = tokens.data_ptr<scalar_t>();
        const int32_t* map = pair_to_row.data_ptr<int32_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            for (int64_t k = 0; k < top_k; ++k) {
              const int64_t row = map[t * top_k + k];
              acc_t dot = 0;
              if (row >= 0) {
                MOEFORGE_CHECK_VALUE(row < num_rows, "routed_dot", "pair_to_row[", t, ", ", k,
                                     "] must be < num_rows of rows (", num_rows, "), got ", row);
                const scalar_t* a = r_ptr + row * hidden;
                const scalar_t* b = t_ptr + t * hidden;
                for (int64_t h = 0; h < hidden; ++h) dot += acc_t(a[h]) * acc_t(b[h]);
              }
              o[t * top_k + k] = static_cast<scalar_t>(dot);
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeforge, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("routed_dot", &routed_dot_cpu);
}

}  // namespace moeforge
