// GoogleTest for kernels/routing.cu: drives launch_routing on cudaMalloc'd buffers and compares
// with a host counting sort (the CPU op's algorithm). Every case skips at run time without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_test_utils.h"
#include "moeforge/kernels/routing.h"

namespace moeforge::testing {
namespace {

// Runs launch_routing with outputs poisoned by `poison` bytes. `workspace_shift` offsets the
// workspace pointer (the launcher must accept any alignment).
template <typename index_t>
Plan gpu_plan(const std::vector<index_t>& ids, int64_t num_experts, unsigned char poison = 0xFF,
              cudaStream_t stream = nullptr, size_t workspace_shift = 0) {
  const int64_t n = static_cast<int64_t>(ids.size());
  DeviceBuffer<index_t> d_ids(ids);
  DeviceBuffer<int32_t> sorted_pairs(n), pair_to_row(n), offsets(num_experts + 1);
  sorted_pairs.poison(poison);
  pair_to_row.poison(poison);
  offsets.poison(poison);
  size_t bytes = 0;
  EXPECT_EQ(kernels::routing_workspace_bytes(n, num_experts, &bytes), cudaSuccess);
  DeviceBuffer<unsigned char> workspace(bytes + workspace_shift);
  workspace.poison(poison);
  EXPECT_EQ(
      kernels::launch_routing(d_ids.data(), n, num_experts, sorted_pairs.data(), pair_to_row.data(),
                              offsets.data(), workspace.data() + workspace_shift, bytes, stream),
      cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  return {sorted_pairs.download(), pair_to_row.download(), offsets.download()};
}

// Compares GPU and reference plans, with two poison patterns (0xFF reads as -1 in int32, the
// dropped marker, so a second pattern catches an unwritten pair_to_row entry).
template <typename index_t>
void expect_matches_reference(const std::vector<index_t>& ids, int64_t num_experts) {
  const Plan want = reference_plan(ids, num_experts);
  for (const unsigned char poison : {0xFF, 0x5A}) {
    const Plan got = gpu_plan(ids, num_experts, poison);
    EXPECT_EQ(got.sorted_pairs, want.sorted_pairs) << "poison " << int(poison);
    EXPECT_EQ(got.pair_to_row, want.pair_to_row) << "poison " << int(poison);
    EXPECT_EQ(got.offsets, want.offsets) << "poison " << int(poison);
  }
}

template <typename index_t>
class RoutingTest : public ::testing::Test {
 protected:
  void SetUp() override { MOEFORGE_SKIP_WITHOUT_GPU(); }
};
using IndexTypes = ::testing::Types<int32_t, int64_t>;
TYPED_TEST_SUITE(RoutingTest, IndexTypes);

TYPED_TEST(RoutingTest, ZeroTokens) {
  expect_matches_reference(std::vector<TypeParam>{}, 4);
  const Plan got = gpu_plan(std::vector<TypeParam>{}, 4);
  EXPECT_EQ(got.offsets, std::vector<int32_t>(5, 0));
}

TYPED_TEST(RoutingTest, HandWritten) {
  // topk_ids [3, 2] = [[1, 0], [2, 5], [0, -1]] with E = 3: pairs 3 (id 5) and 5 (id -1) drop.
  const std::vector<TypeParam> ids = {1, 0, 2, 5, 0, -1};
  const Plan got = gpu_plan(ids, 3);
  EXPECT_EQ(got.sorted_pairs, (std::vector<int32_t>{1, 4, 0, 2, 3, 5}));
  EXPECT_EQ(got.pair_to_row, (std::vector<int32_t>{2, 0, 3, -1, 1, -1}));
  EXPECT_EQ(got.offsets, (std::vector<int32_t>{0, 2, 3, 4}));
}

TYPED_TEST(RoutingTest, TopOne) {
  expect_matches_reference(random_ids<TypeParam>(257, 0, 8, 1), 8);
}

TYPED_TEST(RoutingTest, TopKEqualsNumExperts) {
  // Every token picks every expert once, in a random order.
  constexpr int64_t kTokens = 50, kExperts = 6;
  std::mt19937 gen(2);
  std::vector<TypeParam> ids;
  for (int64_t t = 0; t < kTokens; ++t) {
    std::vector<TypeParam> perm(kExperts);
    std::iota(perm.begin(), perm.end(), TypeParam{0});
    std::shuffle(perm.begin(), perm.end(), gen);
    ids.insert(ids.end(), perm.begin(), perm.end());
  }
  expect_matches_reference(ids, kExperts);
}

TYPED_TEST(RoutingTest, DroppedIds) {
  // Negative ids and ids >= E, mixed with valid ones.
  expect_matches_reference(random_ids<TypeParam>(1000, -4, 20, 3), 16);
}

TYPED_TEST(RoutingTest, AllDropped) {
  expect_matches_reference(random_ids<TypeParam>(99, -50, 0, 4), 7);
  expect_matches_reference(std::vector<TypeParam>(64, TypeParam{7}), 7);
}

TYPED_TEST(RoutingTest, KeyBitBoundaries) {
  // The sort uses only the bits that hold [0, E]; E = 2^b - 1 and 2^b are the edges.
  for (const int64_t experts : {1, 2, 3, 4, 7, 8, 255, 256, 1000}) {
    SCOPED_TRACE(experts);
    expect_matches_reference(random_ids<TypeParam>(777, -2, experts + 2, 5), experts);
  }
}

TYPED_TEST(RoutingTest, LargeRandom) {
  // Qwen3-MoE-like: 8 of 128 experts, enough pairs for several CUB tiles.
  expect_matches_reference(random_ids<TypeParam>(4096 * 8, -1, 129, 6), 128);
}

TYPED_TEST(RoutingTest, FewPairsManyExperts) {
  expect_matches_reference(random_ids<TypeParam>(6, 0, 100000, 7), 100000);
}

TYPED_TEST(RoutingTest, UnalignedWorkspace) {
  const auto ids = random_ids<TypeParam>(300, -1, 10, 8);
  EXPECT_EQ(gpu_plan(ids, 9, 0xFF, nullptr, /*workspace_shift=*/1), reference_plan(ids, 9));
}

TYPED_TEST(RoutingTest, Deterministic) {
  const auto ids = random_ids<TypeParam>(20000, -1, 65, 9);
  const Plan first = gpu_plan(ids, 64);
  for (int run = 0; run < 3; ++run) EXPECT_EQ(gpu_plan(ids, 64), first);
}

TYPED_TEST(RoutingTest, CapturedInCudaGraph) {
  // No host synchronisation inside: the launch must be capturable and replayable.
  const auto ids = random_ids<TypeParam>(5000, -1, 33, 10);
  const int64_t n = static_cast<int64_t>(ids.size()), experts = 32;
  DeviceBuffer<TypeParam> d_ids(ids);
  DeviceBuffer<int32_t> sorted_pairs(n), pair_to_row(n), offsets(experts + 1);
  size_t bytes = 0;
  MOEFORGE_ASSERT_CUDA(kernels::routing_workspace_bytes(n, experts, &bytes));
  DeviceBuffer<unsigned char> workspace(bytes);
  cudaStream_t stream = nullptr;
  MOEFORGE_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOEFORGE_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  EXPECT_EQ(
      kernels::launch_routing(d_ids.data(), n, experts, sorted_pairs.data(), pair_to_row.data(),
                              offsets.data(), workspace.data(), bytes, stream),
      cudaSuccess);
  MOEFORGE_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
  MOEFORGE_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  sorted_pairs.poison(0x5A);
  pair_to_row.poison(0x5A);
  offsets.poison(0x5A);
  MOEFORGE_ASSERT_CUDA(cudaDeviceSynchronize());  // the memsets ran on the legacy stream
  MOEFORGE_ASSERT_CUDA(cudaGraphLaunch(exec, stream));
  MOEFORGE_ASSERT_CUDA(cudaStreamSynchronize(stream));
  const Plan want = reference_plan(ids, experts);
  EXPECT_EQ(sorted_pairs.download(), want.sorted_pairs);
  EXPECT_EQ(pair_to_row.download(), want.pair_to_row);
  EXPECT_EQ(offsets.download(), want.offsets);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TYPED_TEST(RoutingTest, RejectsSmallWorkspace) {
  // A workspace smaller than asked for is refused before any launch.
  size_t bytes = 0;
  MOEFORGE_ASSERT_CUDA(kernels::routing_workspace_bytes(10, 4, &bytes));
  DeviceBuffer<TypeParam> ids(std::vector<TypeParam>(10, TypeParam{1}));
  DeviceBuffer<int32_t> sorted_pairs(10), pair_to_row(10), offsets(5);
  DeviceBuffer<unsigned char> workspace(bytes);
  EXPECT_EQ(kernels::launch_routing(ids.data(), 10, 4, sorted_pairs.data(), pair_to_row.data(),
                                    offsets.data(), workspace.data(), bytes - 1, nullptr),
            cudaErrorInvalidValue);
}

// Size checks happen before any CUDA call, so this one needs no device and runs everywhere.
TEST(RoutingArguments, RejectsBadSizes) {
  size_t bytes = 1;
  EXPECT_EQ(kernels::routing_workspace_bytes(10, 0, &bytes), cudaErrorInvalidValue);
  EXPECT_EQ(bytes, 0u);
  EXPECT_EQ(kernels::routing_workspace_bytes(-1, 4, &bytes), cudaErrorInvalidValue);
  EXPECT_EQ(kernels::routing_workspace_bytes(int64_t{1} << 31, 4, &bytes), cudaErrorInvalidValue);
  const int32_t* no_ids = nullptr;
  EXPECT_EQ(kernels::launch_routing(no_ids, 4, 0, nullptr, nullptr, nullptr, nullptr, 0, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launch_routing(no_ids, -4, 2, nullptr, nullptr, nullptr, nullptr, 0, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace moeforge::testing
