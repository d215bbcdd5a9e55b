// Element types of the kernels and their accumulation type, shared by kernels/, the CUDA glue and
// the GoogleTest references. Element types: float, double, __half, __nv_bfloat16; arithmetic in
// AccType<T> (float, double for double). Conversions are host+device so host references round
// exactly as the kernels do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moeforge/kernels/host_device.h"

namespace moeforge::kernels {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type_t = typename AccType<scalar_t>::type;

MOEFORGE_HOST_DEVICE float to_acc(float v) {
  return v;
}
MOEFORGE_HOST_DEVICE double to_acc(double v) {
  return v;
}
MOEFORGE_HOST_DEVICE float to_acc(__half v) {
  return __half2float(v);
}
MOEFORGE_HOST_DEVICE float to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round an accumulator to element type T (round to nearest even).
template <typename T>
MOEFORGE_HOST_DEVICE T from_acc(acc_type_t<T> v);
template <>
MOEFORGE_HOST_DEVICE float from_acc<float>(float v) {
  return v;
}
template <>
MOEFORGE_HOST_DEVICE double from_acc<double>(double v) {
  return v;
}
template <>
MOEFORGE_HOST_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
MOEFORGE_HOST_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace moeforge::kernels
