// Small helpers that make every input check read like a sentence:
//   moeforge.permute: topk_ids must be 2-D [num_tokens, top_k], got shape [4, 2, 3]
// Each names the op, the argument, the rule and the value it got. User errors are TORCH_CHECK
// (RuntimeError / ValueError / TypeError in Python); TORCH_INTERNAL_ASSERT is for our own
// invariants.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string_view>

namespace moeforge {

// Generic rule with a free-form message.
#define MOEFORGE_CHECK(cond, op, ...) TORCH_CHECK((cond), "moeforge.", op, ": ", __VA_ARGS__)
#define MOEFORGE_CHECK_VALUE(cond, op, ...) \
  TORCH_CHECK_VALUE((cond), "moeforge.", op, ": ", __VA_ARGS__)
#define MOEFORGE_CHECK_TYPE(cond, op, ...) \
  TORCH_CHECK_TYPE((cond), "moeforge.", op, ": ", __VA_ARGS__)

// `t` must have `dim` dimensions; `layout` names them, e.g. "[num_tokens, top_k]".
void check_dim(std::string_view op, std::string_view name, const at::Tensor& t, int64_t dim,
               std::string_view layout);

// `t.size(d)` must equal `expected`; `what` says where the expected value comes from.
void check_size(std::string_view op, std::string_view name, const at::Tensor& t, int64_t d,
                int64_t expected, std::string_view what);

// float32, float64, bfloat16 or float16.
void check_floating(std::string_view op, std::string_view name, const at::Tensor& t);

// Exactly `dtype` (index tensors the op produced itself, e.g. int32 routing metadata).
void check_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                 at::ScalarType dtype);

// Same dtype as `ref` (named `ref_name`).
void check_same_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                      std::string_view ref_name, const at::Tensor& ref);

// Same device as `ref` (named `ref_name`).
void check_same_device(std::string_view op, std::string_view name, const at::Tensor& t,
                       std::string_view ref_name, const at::Tensor& ref);

// The tensors a kernel indexes with raw pointers must be contiguous. Callers make contiguous
// copies of user inputs where needed; this guards our own invariants.
void check_contiguous(std::string_view op, std::string_view name, const at::Tensor& t);

}  // namespace moeforge
