// Host kernel emulator: nvcuda::wmma for the emulated build (stands in for CUDA's <mma.h>).
//
// A fragment's element-to-lane mapping is unspecified by CUDA, so the emulator may choose any: here
// every lane holds the whole tile in row-major order. Each *_sync call is a warp collective: it
// first waits for all 32 lanes (a divergent call is reported), then checks what the hardware
// requires of its arguments (256-bit aligned pointer, ldm a multiple of 16 bytes) and traps
// otherwise. mma_sync accumulates in fp32 in k order; tensor cores may round differently, which
// the tests' tolerances must allow for anyway.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moeforge_emu/emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

// A warp collective on (p, ldm): every lane must pass the same pointer and ldm, as the hardware
// requires; the pointer must be 256-bit aligned and ldm a multiple of 16 bytes.
template <typename T>
void check_operands(const T* p, unsigned ldm) {
  struct Args {
    const void* p;
    unsigned long long ldm;
  };
  const Args mine{p, ldm};
  std::memcpy(::moeforge::emu::warp_exchange_slot(::moeforge::emu::current_lane()), &mine,
              sizeof mine);
  ::moeforge::emu::sync_warp(0xffffffffu);
  Args lane0;
  std::memcpy(&lane0, ::moeforge::emu::warp_exchange_slot(0), sizeof lane0);
  ::moeforge::emu::sync_warp(0xffffffffu);
  if (lane0.p != mine.p || lane0.ldm != mine.ldm) {
    ::moeforge::emu::trap("wmma: lanes of a warp passed different pointers or ldm");
  }
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ::moeforge::emu::trap("wmma: matrix pointer is not 256-bit aligned");
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    ::moeforge::emu::trap("wmma: ldm is not a multiple of 16 bytes");
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major, the same in every lane
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (auto& e : f.x) e = v;
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Layout, void>, "operand fragments carry their layout");
  detail::check_operands(p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major>
                                 ? p[static_cast<size_t>(r) * ldm + c]
                                 : p[static_cast<size_t>(c) * ldm + r];
    }
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  detail::check_operands(p, ldm);
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      f.x[r * N + c] = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c]
                                               : p[static_cast<size_t>(c) * ldm + r];
    }
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_operands(p, ldm);
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      T& out = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c]
                                       : p[static_cast<size_t>(c) * ldm + r];
      out = f.x[r * N + c];
    }
  }
}

// The lanes share the work as the hardware does (lane l computes the elements e = l mod 32, from
// its own copies of a, b and c), then every lane takes the whole result.
template <int M, int N, int K, typename TAB, typename LA, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TAB, LA>& a,
              const fragment<matrix_b, M, N, K, TAB, LB>& b,
              const fragment<accumulator, M, N, K, TC>& c) {
  static_assert(sizeof(TC) * M * N <= ::moeforge::emu::kWarpScratchBytes, "scratch holds d");
  TC* shared = static_cast<TC*>(::moeforge::emu::warp_scratch());
  ::moeforge::emu::sync_warp(0xffffffffu);  // the previous mma_sync has been read by all lanes
  for (int e = ::moeforge::emu::current_lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    float s = static_cast<float>(c.x[e]);
    for (int k = 0; k < K; ++k) {
      s += detail::to_float(a.x[i * K + k]) * detail::to_float(b.x[k * N + j]);
    }
    shared[e] = static_cast<TC>(s);
  }
  ::moeforge::emu::sync_warp(0xffffffffu);
  for (int e = 0; e < M * N; ++e) d.x[e] = shared[e];
}

}  // namespace nvcuda::wmma
