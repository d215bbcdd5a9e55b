// GoogleTest for kernels/sm90/grouped_wgrad_sm90.cu (the K-grouped weight gradient on wgmma,
// both operands MN-major): G_e = A_e^T B_e over each expert's rows against a float64 host
// reference, in an order that isolates its pieces on a first GPU run — one tile of one k block,
// a long k loop, p / q tails and padded strides, empty experts (G_e = 0), row tails, many
// experts, corrupt offsets, an operand read through the routing plan (bitwise equal to the dense
// kernel on the gathered rows), determinism and every pipeline (grouped_wgrad_sm90_ws.cu too). g
// starts as NaN bytes; every element of g must be written and its padding (row ends, between
// experts) left alone. Launching cases skip without an sm_90 GPU and a build that holds the kernel;
// the host kernel emulator runs them with wgmma emulated.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "sm90_test_utils.h"

namespace moeforge::testing {
namespace {

using bf16 = __nv_bfloat16;

struct WgradCase {
  std::string what;
  std::vector<int32_t> offsets;  // [E + 1]
  int64_t rows, p, q;
  int64_t pad_a = 0, pad_b = 0, pad_g = 0;
  int64_t pad_e = 0;  // g elements between experts (g_stride_e = p ldg + pad_e)

  int64_t ldg() const { return q + pad_g; }
  int64_t g_stride_e() const { return p * ldg() + pad_e; }
};

// g [E, p, q + pad_g] from a [rows, p + pad_a] and b [rows, q + pad_b]; when pairs is given, a
// (gather_a) or b is token-major [tokens, .] and read through it.
std::vector<bf16> run(const WgradCase& c, const std::vector<bf16>& a, const std::vector<bf16>& b,
                      int64_t tokens = 0, const std::vector<int32_t>* pairs = nullptr,
                      int64_t top_k = 1, bool gather_a = false) {
  const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1, ldg = c.ldg();
  DeviceBuffer<bf16> d_a(a), d_b(b), d_g(E * c.g_stride_e());
  DeviceBuffer<int32_t> d_off(c.offsets);
  DeviceBuffer<int32_t> d_pairs(pairs ? *pairs : std::vector<int32_t>(1, 0));
  d_g.poison(0xFF);
  kernels::GroupedWgradSm90Args args;
  args.a = d_a.data();
  args.lda = c.p + c.pad_a;
  args.b = d_b.data();
  args.ldb = c.q + c.pad_b;
  args.g = d_g.data();
  args.ldg = ldg;
  args.g_stride_e = c.g_stride_e();
  args.expert_offsets = d_off.data();
  args.num_rows = c.rows;
  args.p = c.p;
  args.q = c.q;
  args.num_experts = E;
  args.pipeline = g_pipeline;
  if (pairs != nullptr) {
    args.sorted_pairs = d_pairs.data();
    args.num_tokens = tokens;
    args.top_k = top_k;
    (gather_a ? args.gather_a : args.gather_b) = true;
  }
  EXPECT_EQ(kernels::launch_grouped_wgrad_sm90(args, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d_g.download();
}

// g against float64: sum over the expert's rows of a[r, i] b[r, j] with the fp32-accumulation
// and bf16-rounding bound; empty experts exactly zero; padding columns untouched (NaN bytes).
void check_case(const WgradCase& c, uint32_t seed) {
  SCOPED_TRACE(c.what);
  const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1;
  const int64_t lda = c.p + c.pad_a, ldb = c.q + c.pad_b, ldg = c.ldg();
  const std::vector<bf16> a = random_bf16(c.rows * lda, seed),
                          b = random_bf16(c.rows * ldb, seed + 1);
  const std::vector<bf16> g = run(c, a, b);
  const std::vector<int64_t> m = clamped_bounds(c.offsets, c.rows);
  int bad = 0;
  for (int64_t e = 0; e < E && bad < 6; ++e) {
    for (int64_t i = 0; i < c.p && bad < 6; ++i) {
      for (int64_t j = 0; j < ldg && bad < 6; ++j) {
        uint16_t bits;
        std::memcpy(&bits, &g[e * c.g_stride_e() + i * ldg + j], 2);
        if (j >= c.q) {
          if (bits != 0xFFFF) {
            ADD_FAILURE() << "g[" << e << ", " << i << ", " << j << "]: padding written";
            ++bad;
          }
          continue;
        }
        double acc = 0, mag = 0;
        for (int64_t r = m[e]; r < m[e + 1]; ++r) {
          const double prod = static_cast<double>(__bfloat162float(a[r * lda + i])) *
                              __bfloat162float(b[r * ldb + j]);
          acc += prod;
          mag += std::abs(prod);
        }
        const double rows = static_cast<double>(m[e + 1] - m[e]);
        const double tol =
            unit_roundoff<bf16>() * std::abs(acc) + 2.0 * rows * std::ldexp(1.0, -24) * mag + 1e-30;
        const double got = __bfloat162float(g[e * c.g_stride_e() + i * ldg + j]);
        if (!(std::abs(got - acc) <= tol)) {
          ADD_FAILURE() << "g[" << e << ", " << i << ", " << j << "] (tile row " << i % 128
                        << ", tile col " << j % 128 << ", expert rows " << rows << "): got " << got
                        << ", want " << acc << " +- " << tol;
          ++bad;
        }
      }
    }
    for (int64_t x = c.p * ldg; x < c.g_stride_e() && bad < 6; ++x) {  // between experts
      uint16_t bits;
      std::memcpy(&bits, &g[e * c.g_stride_e() + x], 2);
      if (bits != 0xFFFF) {
        ADD_FAILURE() << "g: padding after expert " << e << " written";
        ++bad;
      }
    }
  }
}

class GroupedWgradSm90 : public Sm90PipelineTest {};
// The weight gradient has three pipelines (no wide tiles: rejected, the Arguments case).
MOEFORGE_INSTANTIATE_FOR_PIPELINES(GroupedWgradSm90, kernels::Sm90Pipeline::kSerial,
                                   kernels::Sm90Pipeline::kOverlapped,
                                   kernels::Sm90Pipeline::kWarpSpecialized);

TEST_P(GroupedWgradSm90, OneTileOneKBlock) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"p = q = 128, 64 rows", {0, 64}, 64, 128, 128}, 1);
}

TEST_P(GroupedWgradSm90, LongKLoop) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"1000 rows, a row tail", {0, 1000}, 1000, 128, 128}, 2);
}

TEST_P(GroupedWgradSm90, TailsAndPaddedStrides) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"p, q tails, padded strides", {0, 70, 70, 200}, 210, 136, 72, 8, 24, 16}, 3);
  check_case({"p = q = 8", {0, 3, 10}, 12, 8, 8}, 4);
  check_case({"padding between experts", {0, 40, 90}, 90, 136, 72, 0, 0, 8, 24}, 9);
}

TEST_P(GroupedWgradSm90, EmptyExpertsAreZeroAndManyExperts) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"empty experts", {0, 0, 50, 50, 50, 300, 300}, 320, 64, 256}, 5);
  check_case({"E = 64 random", random_offsets(64, 2000, 6, 11), 2000, 64, 192}, 6);
  check_case({"corrupt offsets", {9, 40, -3, 90, 20, 500}, 100, 64, 128}, 7);
}

TEST_P(GroupedWgradSm90, QwenLikeShapes) {
  // dW of Qwen3's gate_up: p = 2I = 1536 (12 p tiles per expert); q = 256 and 300 rows keep the
  // emulator's run short.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"p = 1536, q = 256", random_offsets(6, 300, 8, 0), 300, 1536, 256}, 8);
}

TEST_P(GroupedWgradSm90, GatherEqualsDenseOnGatheredRows) {
  // One operand read through the plan: bitwise the kernel on the rows permute would write
  // (corrupt pairs give zero rows), for either operand.
  MOEFORGE_SKIP_WITHOUT_SM90();
  const int64_t T = 150, K = 4, S = T * K, p = 200, q = 136;  // p, q tails past one tile
  const WgradCase c{"gather", random_offsets(7, S, 9, 30), S, p, q};
  std::vector<int32_t> pairs(S);
  for (int64_t i = 0; i < S; ++i) pairs[i] = static_cast<int32_t>(i);
  std::shuffle(pairs.begin(), pairs.end(), std::mt19937(10));
  pairs[3] = -2;
  pairs[400] = static_cast<int32_t>(S + 5);
  for (const bool gather_a : {false, true}) {
    SCOPED_TRACE(gather_a ? "gather a" : "gather b");
    const int64_t width = gather_a ? p : q;
    const std::vector<bf16> tokens = random_bf16(T * width, 11);
    const std::vector<bf16> other = random_bf16(S * (gather_a ? q : p), 12);
    std::vector<bf16> rows(S * width, __float2bfloat16(0.0f));
    for (int64_t r = 0; r < S; ++r) {
      if (pairs[r] >= 0 && pairs[r] < S) {
        std::copy_n(tokens.begin() + (pairs[r] / K) * width, width, rows.begin() + r * width);
      }
    }
    const std::vector<bf16> gathered = gather_a ? run(c, tokens, other, T, &pairs, K, true)
                                                : run(c, other, tokens, T, &pairs, K, false);
    const std::vector<bf16> dense = gather_a ? run(c, rows, other) : run(c, other, rows);
    EXPECT_EQ(std::memcmp(gathered.data(), dense.data(), dense.size() * sizeof(bf16)), 0);
  }
}

TEST_P(GroupedWgradSm90, DeterministicAndPipelinesAgree) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  const WgradCase c{"determinism", random_offsets(5, 900, 13, 0), 900, 192, 128};
  const std::vector<bf16> a = random_bf16(c.rows * c.p, 14), b = random_bf16(c.rows * c.q, 15);
  const std::vector<bf16> first = run(c, a, b), second = run(c, a, b);
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(bf16)), 0);
  const kernels::Sm90Pipeline mine = g_pipeline;
  g_pipeline = other_pipeline(mine);
  const std::vector<bf16> other = run(c, a, b);
  g_pipeline = mine;
  EXPECT_EQ(std::memcmp(first.data(), other.data(), first.size() * sizeof(bf16)), 0);
}

TEST(GroupedWgradSm90Arguments, RejectsBadArguments) {
  kernels::GroupedWgradSm90Args ok;
  ok.a = ok.b = reinterpret_cast<const bf16*>(uintptr_t{256});
  ok.g = reinterpret_cast<bf16*>(uintptr_t{256});
  ok.expert_offsets = reinterpret_cast<const int32_t*>(uintptr_t{256});
  ok.num_rows = 16;
  ok.p = ok.lda = 64;
  ok.q = ok.ldb = ok.ldg = 32;
  ok.g_stride_e = 64 * 32;
  ok.num_experts = 2;
  EXPECT_TRUE(kernels::grouped_wgrad_sm90_args_valid(ok));
  auto bad = [&](auto mutate) {
    kernels::GroupedWgradSm90Args a = ok;
    mutate(a);
    EXPECT_FALSE(kernels::grouped_wgrad_sm90_args_valid(a));
    EXPECT_EQ(kernels::launch_grouped_wgrad_sm90(a, nullptr), cudaErrorInvalidValue);
  };
  bad([](auto& a) { a.p = 60; });
  bad([](auto& a) { a.ldg = 24; });
  bad([](auto& a) { a.g_stride_e = 8; });
  bad([](auto& a) { a.num_experts = 0; });
  bad([](auto& a) { a.b = reinterpret_cast<const bf16*>(uintptr_t{258}); });
  bad([](auto& a) { a.gather_a = a.gather_b = true; });
  bad([](auto& a) { a.gather_a = true; });  // no sorted_pairs
  bad([](auto& a) { a.pipeline = kernels::Sm90Pipeline::kWarpSpecializedWide; });
  bad([](auto& a) { a.pipeline = static_cast<kernels::Sm90Pipeline>(4); });
}

}  // namespace
}  // namespace moeforge::testing
