// Gated activation kernels (see moeforge/kernels/swiglu.h). One thread per output column j of a
// row (grid-stride over rows * I): it reads the gate and up values of j, writes a[r, j] (forward)
// or grad_h[r, gate(j)] and grad_h[r, up(j)] (backward). Memory-bound; adjacent threads touch
// adjacent columns of both halves (silu) or adjacent pairs (gpt-oss), so accesses coalesce.
// The forward takes 16-byte vectors where the shapes and pointers allow (I a multiple of the
// vector width, 16-byte aligned h and out: every HF model's I), one thread per vector of
// consecutive outputs: measured on an H100 the scalar form moved 1.3 TB/s of the ~3 TB/s a copy
// gets. Each element's arithmetic is the scalar form's, so both give identical bits.
// The weighted backward needs a per-row dot product: a warp per row with 16-byte vectors where
// the forward's vector conditions hold, else one CTA per row (threads stride over the row's
// columns, then a fixed-order block reduction).
#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/swiglu.h"
#include "moeforge/kernels/swiglu_math.h"

namespace moeforge::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

int64_t grid_for(int64_t n) {
  return std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks);
}

// Columns of the gate and up values behind output column j of a row of 2I values.
struct GateUp {
  int64_t gate, up;
};
__device__ __forceinline__ GateUp columns(GluVariant v, int64_t j, int64_t inter) {
  return v == GluVariant::kGptOss ? GateUp{2 * j, 2 * j + 1} : GateUp{j, inter + j};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(const T* __restrict__ h,  // [rows, 2I]
                  T* __restrict__ out,      // [rows, I]
                  int64_t total, int64_t inter, GluVariant variant, acc_type_t<T> alpha,
                  acc_type_t<T> limit) {
  using acc_t = acc_type_t<T>;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / inter, j = i - r * inter;
    const T* row = h + r * 2 * inter;
    const GateUp c = columns(variant, j, inter);
    const acc_t g = to_acc(row[c.gate]), u = to_acc(row[c.up]);
    const acc_t a = variant == GluVariant::kSilu ? silu_glu(g, u) : gpt_oss_glu(g, u, alpha, limit);
    out[i] = from_acc<T>(a);
  }
}

// 16 bytes of T.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The gate and up values of output columns j0 .. j0 + kV of a row of h (16-byte loads): two
// vectors of the halves (silu) or two vectors of interleaved pairs, split (gpt-oss).
template <typename T>
__device__ __forceinline__ void load_gate_up(const T* row, int64_t j0, int64_t inter,
                                             GluVariant variant, Vec16<T>* gate, Vec16<T>* up) {
  using V = Vec16<T>;
  constexpr int kV = V::kSize;
  if (variant == GluVariant::kSilu) {
    *gate = *reinterpret_cast<const V*>(row + j0);
    *up = *reinterpret_cast<const V*>(row + inter + j0);
    return;
  }
  const V lo = *reinterpret_cast<const V*>(row + 2 * j0);
  const V hi = *reinterpret_cast<const V*>(row + 2 * j0 + kV);
#pragma unroll
  for (int t = 0; t < kV / 2; ++t) {
    gate->v[t] = lo.v[2 * t];
    up->v[t] = lo.v[2 * t + 1];
    gate->v[kV / 2 + t] = hi.v[2 * t];
    up->v[kV / 2 + t] = hi.v[2 * t + 1];
  }
}

// swiglu_kernel on vectors: thread i writes out[r, j0 : j0 + V) for the i-th group of V outputs.
// Requires inter % V == 0 and 16-byte aligned h and out (launch_swiglu checks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_vec_kernel(const T* __restrict__ h,  // [rows, 2I]
                      T* __restrict__ out,      // [rows, I]
                      int64_t groups, int64_t inter, GluVariant variant, acc_type_t<T> alpha,
                      acc_type_t<T> limit) {
  using acc_t = acc_type_t<T>;
  using V = Vec16<T>;
  constexpr int kV = V::kSize;
  const int64_t groups_per_row = inter / kV;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < groups;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / groups_per_row, j0 = (i - r * groups_per_row) * kV;
    const T* row = h + r * 2 * inter;
    V gate, up, a;
    load_gate_up(row, j0, inter, variant, &gate, &up);
#pragma unroll
    for (int t = 0; t < kV; ++t) {
      const acc_t g = to_acc(gate.v[t]), u = to_acc(up.v[t]);
      a.v[t] = from_acc<T>(variant == GluVariant::kSilu ? silu_glu(g, u)
                                                        : gpt_oss_glu(g, u, alpha, limit));
    }
    *reinterpret_cast<V*>(out + r * inter + j0) = a;
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* __restrict__ grad_a,  // [rows, I]
                           const T* __restrict__ h,       // [rows, 2I]
                           T* __restrict__ grad_h,        // [rows, 2I]
                           int64_t total, int64_t inter, GluVariant variant, acc_type_t<T> alpha,
                           acc_type_t<T> limit) {
  using acc_t = acc_type_t<T>;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / inter, j = i - r * inter;
    const T* row = h + r * 2 * inter;
    T* grow = grad_h + r * 2 * inter;
    const GateUp c = columns(variant, j, inter);
    const acc_t g = to_acc(row[c.gate]), u = to_acc(row[c.up]), dy = to_acc(grad_a[i]);
    acc_t dg, du;
    if (variant == GluVariant::kSilu) {
      silu_glu_backward(dy, g, u, &dg, &du);
    } else {
      gpt_oss_glu_backward(dy, g, u, alpha, limit, &dg, &du);
    }
    grow[c.gate] = from_acc<T>(dg);
    grow[c.up] = from_acc<T>(du);
  }
}

// Sum of v over the CTA (kThreads threads), in a fixed order: warp butterflies, then the warp
// totals in warp order. The result is valid in thread 0. Block-collective; `partial` holds
// kThreads / 32 values and may be reused after the next barrier.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* partial) {
  constexpr int kWarp = 32;
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  if (threadIdx.x % kWarp == 0) partial[warp] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / kWarp; ++w) total += partial[w];
  }
  return total;
}

// h and grad_h may be the same array (weighted_swiglu_backward_): each thread reads the gate and
// up values it overwrites before it writes them, and no thread reads another's, so neither
// pointer is __restrict__ (the same holds for the vector kernel below).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weighted_swiglu_backward_kernel(const T* __restrict__ grad_aw,  // [rows, I]
                                    const T* h,                     // [rows, 2I]
                                    const acc_type_t<T>* __restrict__ row_weights,
                                    T* grad_h,                     // [rows, 2I]
                                    T* __restrict__ weighted_act,  // [rows, I] or nullptr
                                    acc_type_t<T>* __restrict__ grad_row_weights, int64_t rows,
                                    int64_t inter, GluVariant variant, acc_type_t<T> alpha,
                                    acc_type_t<T> limit) {
  using acc_t = acc_type_t<T>;
  __shared__ acc_t partial[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = h + r * 2 * inter;
    const T* grow_in = grad_aw + r * inter;
    T* grow = grad_h + r * 2 * inter;
    const acc_t w = row_weights[r];
    acc_t dot = acc_t(0);
    for (int64_t j = threadIdx.x; j < inter; j += kThreads) {
      const GateUp c = columns(variant, j, inter);
      const acc_t g = to_acc(row[c.gate]), u = to_acc(row[c.up]), dy = to_acc(grow_in[j]);
      acc_t dg, du;
      const acc_t a =
          glu_with_backward(variant == GluVariant::kGptOss, w * dy, g, u, alpha, limit, &dg, &du);
      dot += dy * a;
      grow[c.gate] = from_acc<T>(dg);
      grow[c.up] = from_acc<T>(du);
      if (weighted_act != nullptr) weighted_act[r * inter + j] = from_acc<T>(w * a);
    }
    dot = block_sum(dot, partial);
    if (threadIdx.x == 0) grad_row_weights[r] = dot;
    __syncthreads();  // partial is reused by the next row
  }
}

// The weighted backward with 16-byte vectors (same conditions as swiglu_vec_kernel, every
// pointer aligned): one warp per row, each lane takes vectors of kV consecutive columns, and the
// row's dot product is a warp butterfly (no block barriers). The one-CTA-per-row form moved ~2.1
// of the ~3 TB/s a copy gets on an H100 at Qwen3's I = 768 (3 columns per thread, two barriers
// per row). grad_h and the weighted activation are bitwise the scalar kernel's (same per-element
// arithmetic); grad_row_weights sums in a different fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weighted_swiglu_backward_vec_kernel(const T* __restrict__ grad_aw,  // [rows, I]
                                        const T* h,                     // [rows, 2I]
                                        const acc_type_t<T>* __restrict__ row_weights,
                                        T* grad_h,                     // [rows, 2I]
                                        T* __restrict__ weighted_act,  // [rows, I] or nullptr
                                        acc_type_t<T>* __restrict__ grad_row_weights, int64_t rows,
                                        int64_t inter, GluVariant variant, acc_type_t<T> alpha,
                                        acc_type_t<T> limit) {
  using acc_t = acc_type_t<T>;
  using V = Vec16<T>;
  constexpr int kV = V::kSize;
  constexpr int kWarp = 32;
  const int lane = threadIdx.x % kWarp;
  const int64_t vecs = inter / kV;
  // r is warp-uniform: every lane takes the same trip count and reaches the shuffles.
  for (int64_t r = int64_t{blockIdx.x} * (kThreads / kWarp) + threadIdx.x / kWarp; r < rows;
       r += int64_t{gridDim.x} * (kThreads / kWarp)) {
    const T* row = h + r * 2 * inter;
    T* grow = grad_h + r * 2 * inter;
    const acc_t w = row_weights[r];
    acc_t dot = acc_t(0);
    for (int64_t q = lane; q < vecs; q += kWarp) {
      const int64_t j0 = q * kV;
      const V dy_v = *reinterpret_cast<const V*>(grad_aw + r * inter + j0);
      V gate, up;
      load_gate_up(row, j0, inter, variant, &gate, &up);
      V dgate, dup, act;
#pragma unroll
      for (int t = 0; t < kV; ++t) {
        const acc_t g = to_acc(gate.v[t]), u = to_acc(up.v[t]), dy = to_acc(dy_v.v[t]);
        acc_t dg, du;
        const acc_t a =
            glu_with_backward(variant == GluVariant::kGptOss, w * dy, g, u, alpha, limit, &dg, &du);
        dot += dy * a;
        dgate.v[t] = from_acc<T>(dg);
        dup.v[t] = from_acc<T>(du);
        act.v[t] = from_acc<T>(w * a);
      }
      if (variant == GluVariant::kSilu) {
        *reinterpret_cast<V*>(grow + j0) = dgate;
        *reinterpret_cast<V*>(grow + inter + j0) = dup;
      } else {
        V lo, hi;
#pragma unroll
        for (int t = 0; t < kV / 2; ++t) {
          lo.v[2 * t] = dgate.v[t];
          lo.v[2 * t + 1] = dup.v[t];
          hi.v[2 * t] = dgate.v[kV / 2 + t];
          hi.v[2 * t + 1] = dup.v[kV / 2 + t];
        }
        *reinterpret_cast<V*>(grow + 2 * j0) = lo;
        *reinterpret_cast<V*>(grow + 2 * j0 + kV) = hi;
      }
      if (weighted_act != nullptr) *reinterpret_cast<V*>(weighted_act + r * inter + j0) = act;
    }
#pragma unroll
    for (int d = kWarp / 2; d > 0; d /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, d);
    if (lane == 0) grad_row_weights[r] = dot;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_weighted_swiglu_backward(const T* grad_aw, const T* h,
                                            const acc_type_t<T>* row_weights, T* grad_h,
                                            T* weighted_act, acc_type_t<T>* grad_row_weights,
                                            int64_t rows, int64_t inter, GluVariant variant,
                                            double alpha, double limit, cudaStream_t stream) {
  if (rows < 0 || inter < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (grad_row_weights == nullptr || row_weights == nullptr) return cudaErrorInvalidValue;
  if (inter > 0 && (grad_aw == nullptr || h == nullptr || grad_h == nullptr)) {
    return cudaErrorInvalidValue;
  }
  using acc_t = acc_type_t<T>;
  constexpr int64_t kV = Vec16<T>::kSize;
  if (kV >= 2 && inter > 0 && inter % kV == 0 && aligned16(grad_aw) && aligned16(h) &&
      aligned16(grad_h) && (weighted_act == nullptr || aligned16(weighted_act))) {
    // A warp per row; at most 2^14 CTAs (131072 rows in flight), warps grid-stride beyond.
    constexpr int64_t kRowsPerBlock = kThreads / 32, kMaxVecBlocks = int64_t{1} << 14;
    const int64_t blocks =
        std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxVecBlocks);
    MOEFORGE_CUDA_CHECK(launch_kernel(weighted_swiglu_backward_vec_kernel<T>, blocks, kThreads, 0,
                                      stream, grad_aw, h, row_weights, grad_h, weighted_act,
                                      grad_row_weights, rows, inter, variant,
                                      static_cast<acc_t>(alpha), static_cast<acc_t>(limit)));
    return cudaSuccess;
  }
  const int64_t blocks = std::min<int64_t>(rows, kMaxBlocks);
  MOEFORGE_CUDA_CHECK(launch_kernel(weighted_swiglu_backward_kernel<T>, blocks, kThreads, 0, stream,
                                    grad_aw, h, row_weights, grad_h, weighted_act, grad_row_weights,
                                    rows, inter, variant, static_cast<acc_t>(alpha),
                                    static_cast<acc_t>(limit)));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_swiglu(const T* h, T* out, int64_t rows, int64_t inter, GluVariant variant,
                          double alpha, double limit, cudaStream_t stream) {
  if (rows < 0 || inter < 0) return cudaErrorInvalidValue;
  const int64_t total = rows * inter;
  if (total == 0) return cudaSuccess;
  using acc_t = acc_type_t<T>;
  constexpr int64_t kV = Vec16<T>::kSize;
  if (kV >= 2 && inter % kV == 0 && aligned16(h) && aligned16(out)) {
    const int64_t groups = total / kV;
    MOEFORGE_CUDA_CHECK(launch_kernel(swiglu_vec_kernel<T>, grid_for(groups), kThreads, 0, stream,
                                      h, out, groups, inter, variant, static_cast<acc_t>(alpha),
                                      static_cast<acc_t>(limit)));
    return cudaSuccess;
  }
  MOEFORGE_CUDA_CHECK(launch_kernel(swiglu_kernel<T>, grid_for(total), kThreads, 0, stream, h, out,
                                    total, inter, variant, static_cast<acc_t>(alpha),
                                    static_cast<acc_t>(limit)));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_swiglu_backward(const T* grad_a, const T* h, T* grad_h, int64_t rows,
                                   int64_t inter, GluVariant variant, double alpha, double limit,
                                   cudaStream_t stream) {
  if (rows < 0 || inter < 0) return cudaErrorInvalidValue;
  const int64_t total = rows * inter;
  if (total == 0) return cudaSuccess;
  using acc_t = acc_type_t<T>;
  MOEFORGE_CUDA_CHECK(launch_kernel(swiglu_backward_kernel<T>, grid_for(total), kThreads, 0, stream,
                                    grad_a, h, grad_h, total, inter, variant,
                                    static_cast<acc_t>(alpha), static_cast<acc_t>(limit)));
  return cudaSuccess;
}

#define MOEFORGE_INSTANTIATE_SWIGLU(T)                                                      \
  template cudaError_t launch_swiglu<T>(const T*, T*, int64_t, int64_t, GluVariant, double, \
                                        double, cudaStream_t);                              \
  template cudaError_t launch_swiglu_backward<T>(const T*, const T*, T*, int64_t, int64_t,  \
                                                 GluVariant, double, double, cudaStream_t); \
  template cudaError_t launch_weighted_swiglu_backward<T>(                                  \
      const T*, const T*, const acc_type_t<T>*, T*, T*, acc_type_t<T>*, int64_t, int64_t,   \
      GluVariant, double, double, cudaStream_t);

MOEFORGE_INSTANTIATE_SWIGLU(float)
MOEFORGE_INSTANTIATE_SWIGLU(double)
MOEFORGE_INSTANTIATE_SWIGLU(__half)
MOEFORGE_INSTANTIATE_SWIGLU(__nv_bfloat16)
#undef MOEFORGE_INSTANTIATE_SWIGLU

}  // namespace moeforge::kernels
