// GoogleTest for kernels/lora_expand.cu and kernels/lora_expand_wmma.cu: launch_lora_expand_add
// on cudaMalloc'd buffers against
//   * a host transcription of the SIMT kernel's arithmetic (the same fused multiply-adds in the
//     same order, std::fma on the host): bitwise equal wherever the SIMT path runs (float,
//     double, and 16-bit cases the tensor-core path does not take);
//   * a float64 reference: |got - ref| <= u_T |ref| + c (rank + 1) u_acc (|out| + |s| sum |u m|),
//     the final rounding into T plus the acc_t error of a rank-long dot product and one add
//     (c = 1 for the SIMT path; c = 2 on tensor cores, whose fp32 accumulation may truncate
//     instead of rounding to nearest).
// Rows of no expert (dropped, or past clamped offsets) must keep their bytes exactly (they hold
// random values, not zeros, so a stray write shows). Every launching case skips without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/lora_expand.h"

namespace moeforge::testing {
namespace {

using kernels::acc_type_t;
using kernels::from_acc;
using kernels::to_acc;

struct Case {
  std::string what;
  std::vector<int32_t> offsets;  // [E + 1], taken as given (may be corrupt)
  int64_t rows, n, rank;
  int64_t pad_out = 0, pad_m = 0;  // extra elements per row of out / of M_e's rows
};

template <typename T>
std::vector<T> random_elems(int64_t count, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(count);
  for (auto& x : v) {
    do {
      x = from_acc<T>(static_cast<acc_type_t<T>>(dist(gen)));
    } while (to_acc(x) == 0);  // never zero: a missing term must show
  }
  return v;
}

template <typename T>
void run_case(const Case& c, uint32_t seed) {
  using acc_t = acc_type_t<T>;
  SCOPED_TRACE(c.what);
  const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1;
  const int64_t ld_out = c.n + c.pad_out, ld_m = c.n + c.pad_m;
  const int64_t m_stride_e = c.rank * ld_m;
  const double scaling = 0.75;
  const std::vector<T> out0 = random_elems<T>(c.rows * ld_out, seed);
  const std::vector<T> u = random_elems<T>(c.rows * c.rank, seed + 1);
  const std::vector<T> m = random_elems<T>(E * m_stride_e, seed + 2, -0.5, 0.5);
  const std::vector<int64_t> bound = clamped_bounds(c.offsets, c.rows);

  DeviceBuffer<T> d_out(out0), d_u(u), d_m(m);
  DeviceBuffer<int32_t> d_offsets(c.offsets);
  bool tensor_cores = false;
  MOEFORGE_ASSERT_CUDA(
      kernels::lora_expand_add_uses_tensor_cores<T>(d_out.data(), ld_out, c.n, &tensor_cores));
  const double acc_factor = tensor_cores ? 2.0 : 1.0;
  MOEFORGE_ASSERT_CUDA(kernels::launch_lora_expand_add<T>(
      d_out.data(), ld_out, d_u.data(), c.rank, d_m.data(), m_stride_e, ld_m, d_offsets.data(), E,
      c.rows, c.n, c.rank, scaling, nullptr));
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<T> got = d_out.download();

  const acc_t s = static_cast<acc_t>(scaling);
  int bad = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = bound[e]; i < bound[e + 1]; ++i) {
      for (int64_t col = 0; col < c.n && bad < 8; ++col) {
        acc_t acc = 0;
        double exact = 0, mag = 0;
        for (int64_t j = 0; j < c.rank; ++j) {
          const acc_t mj = to_acc(m[e * m_stride_e + j * ld_m + col]);
          acc = std::fma(to_acc(u[i * c.rank + j]), mj, acc);
          exact += static_cast<double>(to_acc(u[i * c.rank + j])) * static_cast<double>(mj);
          mag += std::abs(static_cast<double>(to_acc(u[i * c.rank + j])) * mj);
        }
        const double o = as_double(out0[i * ld_out + col]);
        const T want = from_acc<T>(std::fma(s, acc, to_acc(out0[i * ld_out + col])));
        const T have = got[i * ld_out + col];
        const double ref = o + static_cast<double>(s) * exact;
        const double tol =
            unit_roundoff<T>() * std::abs(ref) +
            acc_factor * (c.rank + 1) * unit_roundoff<acc_t>() * (std::abs(o) + 0.75 * mag) +
            subnormal_rounding<T>();
        const bool transcription_differs =
            !tensor_cores && std::memcmp(&have, &want, sizeof(T)) != 0;
        if (transcription_differs || !(std::abs(as_double(have) - ref) <= tol)) {
          ADD_FAILURE() << "row " << i << " col " << col << " (expert " << e << "): got "
                        << as_double(have) << ", transcription " << as_double(want) << ", float64 "
                        << ref << " +- " << tol;
          ++bad;
        }
      }
    }
  }
  // Everything else keeps its bytes: rows of no expert, and the padding of routed rows.
  for (int64_t i = 0; i < c.rows && bad < 8; ++i) {
    const bool routed = i < bound[E];
    for (int64_t col = routed ? c.n : 0; col < ld_out; ++col) {
      if (std::memcmp(&got[i * ld_out + col], &out0[i * ld_out + col], sizeof(T)) != 0) {
        ADD_FAILURE() << "row " << i << " col " << col << " was written";
        if (++bad >= 8) break;
      }
    }
  }
}

template <typename T>
class LoraExpandTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using ElementTypes = ::testing::Types<float, double, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(LoraExpandTest, ElementTypes);

TYPED_TEST(LoraExpandTest, MatchesReferences) {
  using T = TypeParam;
  const std::vector<Case> cases = {
      {"one expert, vector path", {0, 37}, 37, 64, 16},
      {"empty experts, dropped rows", {0, 0, 19, 19, 50, 61}, 70, 48, 8},
      {"qwen-like widths", {0, 40, 41, 41, 96, 200}, 200, 1536, 16},
      {"rank 24: a long rank loop", {0, 33, 90}, 90, 256, 24},
      {"rank 1", {0, 10, 40}, 45, 40, 1},
      {"odd n: scalar path", {0, 17, 30}, 30, 131, 16},
      {"padded rows of out and M_e", {0, 25, 64}, 64, 96, 16, 8, 16},
      {"odd padding: scalar path", {0, 25, 64}, 64, 96, 4, 3, 1},
      {"wide rows: several packs per thread", {0, 20, 33}, 33, 4160, 8},
      {"rank 12: a part-filled rank chunk", {0, 50, 51, 130}, 130, 128, 12},
      {"rank 40: three rank chunks", {0, 70, 140}, 140, 64, 40},
      {"odd M_e row stride, n a multiple of 8", {0, 30, 70}, 70, 96, 16, 0, 3},
      {"corrupt offsets: negative, decreasing, past rows", {-5, 30, 12, 99, 70}, 60, 64, 16},
      {"every row dropped", {0, 0, 0}, 12, 64, 16},
  };
  uint32_t seed = 10;
  for (const Case& c : cases) ASSERT_NO_FATAL_FAILURE(run_case<T>(c, seed += 3));
}

TYPED_TEST(LoraExpandTest, RandomShapes) {
  // Random sizes around the tile edges of both kernels: widths a multiple of 8 (tensor cores for
  // 16-bit types) or not, ranks across 16-wide chunks, uneven and empty experts, dropped rows,
  // padded strides, sometimes corrupt offsets.
  using T = TypeParam;
  std::mt19937 gen(2026);
  const auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen);
  };
  for (int trial = 0; trial < 12; ++trial) {
    Case c{"random " + std::to_string(trial), {0}, 0, 0, 0};
    const int64_t num_experts = uniform(1, 12);
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t count = uniform(0, 3) == 0 ? 0 : uniform(1, 90);
      c.offsets.push_back(c.offsets.back() + static_cast<int32_t>(count));
    }
    c.rows = c.offsets.back() + uniform(0, 20);
    if (uniform(0, 5) == 0) c.offsets[uniform(1, num_experts)] = static_cast<int32_t>(c.rows + 7);
    c.n = uniform(0, 2) == 0 ? uniform(1, 300) : 8 * uniform(1, 40);
    c.rank = uniform(1, 40);
    c.pad_out = uniform(0, 1) == 0 ? 0 : 8 * uniform(0, 2) + uniform(0, 1);
    c.pad_m = uniform(0, 1) == 0 ? 0 : uniform(1, 9);
    ASSERT_NO_FATAL_FAILURE(run_case<T>(c, 300 + 7 * trial));
  }
}

TYPED_TEST(LoraExpandTest, ManyExperts) {
  // 256 experts (DeepSeek-V3) with uneven counts, some empty: the per-row expert walk crosses
  // many boundaries inside one chunk.
  using T = TypeParam;
  Case c{"256 experts", {0}, 0, 64, 8};
  std::mt19937 gen(5);
  for (int e = 0; e < 256; ++e) {
    c.offsets.push_back(c.offsets.back() + static_cast<int32_t>(gen() % 7 == 0 ? 0 : gen() % 9));
  }
  c.rows = c.offsets.back() + 5;
  ASSERT_NO_FATAL_FAILURE(run_case<T>(c, 77));
}

TYPED_TEST(LoraExpandTest, RowsOver131072) {
  // More rows than the SIMT kernel's 4096 blocks of 32 rows cover, and more row tiles than the
  // tensor-core kernel's capped grid (2048 blocks over the column tiles): blocks stride.
  using T = TypeParam;
  const Case c{"131072+ rows", {0, 70000, 70000, 140011}, 140011, 16, 4};
  ASSERT_NO_FATAL_FAILURE(run_case<T>(c, 91));
  const Case wide{"16 column tiles, 313 row tiles", {0, 9000, 9001, 20011}, 20011, 2048, 16};
  ASSERT_NO_FATAL_FAILURE(run_case<T>(wide, 93));
}

TEST(LoraExpandTensorCores, TakenForAlignedHalfTypesOnSm80) {
  // The fast path must not fall back silently: 16-bit types with n, ld_out multiples of 8 and an
  // aligned out take it on sm80+; float, odd widths and misaligned out never do.
  MOEFORGE_SKIP_WITHOUT_GPU();
  int device = 0, major = 0;
  MOEFORGE_ASSERT_CUDA(cudaGetDevice(&device));
  MOEFORGE_ASSERT_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  DeviceBuffer<__nv_bfloat16> bf(4096);
  DeviceBuffer<__half> half(4096);
  DeviceBuffer<float> f32(4096);
  bool uses = true;
  MOEFORGE_ASSERT_CUDA(kernels::lora_expand_add_uses_tensor_cores(bf.data(), 1536, 1536, &uses));
  EXPECT_EQ(uses, major >= 8);
  MOEFORGE_ASSERT_CUDA(kernels::lora_expand_add_uses_tensor_cores(half.data(), 2888, 2880, &uses));
  EXPECT_EQ(uses, major >= 8);
  MOEFORGE_ASSERT_CUDA(kernels::lora_expand_add_uses_tensor_cores(bf.data(), 131, 131, &uses));
  EXPECT_FALSE(uses);
  MOEFORGE_ASSERT_CUDA(kernels::lora_expand_add_uses_tensor_cores(bf.data(), 1540, 1536, &uses));
  EXPECT_FALSE(uses);
  MOEFORGE_ASSERT_CUDA(
      kernels::lora_expand_add_uses_tensor_cores(bf.data() + 1, 1536, 1536, &uses));
  EXPECT_FALSE(uses);
  MOEFORGE_ASSERT_CUDA(kernels::lora_expand_add_uses_tensor_cores(f32.data(), 1536, 1536, &uses));
  EXPECT_FALSE(uses);
}

TEST(LoraExpandTensorCores, BlocksStrideOverRowTiles) {
  // 1024 column tiles leave the capped grid 2 blocks per column tile for 5 row tiles: blocks
  // take several row tiles (scratch and staging reused across them), on the emulator as well.
  MOEFORGE_SKIP_WITHOUT_GPU();
  const Case c{"1024 column tiles, 5 row tiles", {0, 100, 100, 300}, 300, 131072, 4};
  ASSERT_NO_FATAL_FAILURE(run_case<__nv_bfloat16>(c, 95));
}

// Argument checks happen before any CUDA call: no device needed.
TEST(LoraExpandArguments, RejectsBadArguments) {
  using T = float;
  T* p = reinterpret_cast<T*>(uintptr_t{256});
  const int32_t* o = reinterpret_cast<const int32_t*>(uintptr_t{256});
  const auto launch = [&](int64_t ld_out, int64_t ld_u, int64_t se, int64_t sj, int64_t E,
                          int64_t rows, int64_t n, int64_t rank) {
    return kernels::launch_lora_expand_add<T>(p, ld_out, p, ld_u, p, se, sj, o, E, rows, n, rank,
                                              1.0, nullptr);
  };
  EXPECT_EQ(launch(8, 4, 32, 8, 2, -1, 8, 4), cudaErrorInvalidValue);  // rows < 0
  EXPECT_EQ(launch(8, 4, 32, 8, 2, 4, -8, 4), cudaErrorInvalidValue);  // n < 0
  EXPECT_EQ(launch(8, 4, 32, 8, 2, 4, 8, -4), cudaErrorInvalidValue);  // rank < 0
  EXPECT_EQ(launch(8, 4, 32, 8, 0, 4, 8, 4), cudaErrorInvalidValue);   // no experts
  EXPECT_EQ(launch(8, 4, 32, 8, kernels::kLoraExpandMaxExperts + 1, 4, 8, 4),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch(7, 4, 32, 8, 2, 4, 8, 4), cudaErrorInvalidValue);  // ld_out < n
  EXPECT_EQ(launch(8, 3, 32, 8, 2, 4, 8, 4), cudaErrorInvalidValue);  // ld_u < rank
  EXPECT_EQ(launch(8, 4, -1, 8, 2, 4, 8, 4), cudaErrorInvalidValue);  // negative stride
  EXPECT_EQ(
      kernels::launch_lora_expand_add<T>(nullptr, 8, p, 4, p, 32, 8, o, 2, 4, 8, 4, 1.0, nullptr),
      cudaErrorInvalidValue);
  // Nothing to add: no launch, no pointer needed.
  EXPECT_EQ(kernels::launch_lora_expand_add<T>(nullptr, 8, nullptr, 4, nullptr, 32, 8, nullptr, 2,
                                               0, 8, 4, 1.0, nullptr),
            cudaSuccess);
}

}  // namespace
}  // namespace moeforge::testing
