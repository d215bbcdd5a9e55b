#include "checks.h"

namespace moeforge {

void check_dim(std::string_view op, std::string_view name, const at::Tensor& t, int64_t dim,
               std::string_view layout) {
  MOEFORGE_CHECK_VALUE(t.dim() == dim, op, name, " must be ", dim, "-D ", layout, ", got shape ",
                       t.sizes());
}

void check_size(std::string_view op, std::string_view name, const at::Tensor& t, int64_t d,
                int64_t expected, std::string_view what) {
  MOEFORGE_CHECK_VALUE(t.size(d) == expected, op, name, ".size(", d, ") must equal ", what, " (",
                       expected, "), got shape ", t.sizes());
}

void check_floating(std::string_view op, std::string_view name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  MOEFORGE_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                      op, name, " must be float32, float64, bfloat16 or float16, got ", s);
}

void check_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                 at::ScalarType dtype) {
  MOEFORGE_CHECK_TYPE(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ",
                      t.scalar_type());
}

void check_same_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                      std::string_view ref_name, const at::Tensor& ref) {
  MOEFORGE_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ",
                      ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(std::string_view op, std::string_view name, const at::Tensor& t,
                       std::string_view ref_name, const at::Tensor& ref) {
  MOEFORGE_CHECK_VALUE(t.device() == ref.device(), op, name, " must be on the device of ", ref_name,
                       " (", ref.device(), "), got ", t.device());
}

void check_contiguous(std::string_view op, std::string_view name, const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "moeforge.", op, ": internal: ", name,
                        " is not contiguous");
}

}  // namespace moeforge
