// GPU routing plan (see moeforge/kernels/routing.h for the contract). Three steps on one stream:
//
//   1. make_sort_keys: key[p] = topk_ids[p] if it is a valid expert id, else E (the "dropped"
//      bucket, which sorts after every expert); value[p] = p.
//   2. cub::DeviceRadixSort::SortPairs on (key, p) over the low ceil(log2(E+1)) key bits only.
//      LSD radix sort is stable, so p stays ascending within each bucket: this reproduces the
//      CPU counting sort exactly. The sorted values are written straight into sorted_pairs.
//   3. finish_plan: pair_to_row[sorted_pairs[i]] = i (or -1 in the dropped bucket) and
//      expert_offsets[e] = lower_bound(sorted keys, e) for e in [0, E].
//
// No host synchronisation and no host decision on data: every launch size depends only on S and
// E, so the whole plan is CUDA-graph capturable. Deterministic (no atomics).
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "launch.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/routing.h"

namespace moeforge::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest
constexpr size_t kAlign = 256;         // alignment of each workspace section

int64_t grid_for(int64_t n) {
  return std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks);
}

size_t align_up(size_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// Number of key bits that hold every key in [0, E]: smallest b with 2^b > E.
int key_bits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

// Step 1. keys [S]: expert id or E for dropped pairs; values [S]: p. O(S), one thread per pair.
template <typename index_t>
__global__ void make_sort_keys_kernel(const index_t* __restrict__ topk_ids,  // [S]
                                      int64_t num_pairs, int64_t num_experts,
                                      uint32_t* __restrict__ keys,     // [S]
                                      int32_t* __restrict__ values) {  // [S]
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < num_pairs;
       p += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = static_cast<int64_t>(topk_ids[p]);
    keys[p] = static_cast<uint32_t>((e >= 0 && e < num_experts) ? e : num_experts);
    values[p] = static_cast<int32_t>(p);
  }
}

// Step 3. One grid-stride loop over max(S, E + 1) indices:
//   i < S : pair_to_row[sorted_pairs[i]] = i, or -1 when sorted_keys[i] == E (dropped). Every p
//           occurs once in sorted_pairs, so each entry of pair_to_row is written once.
//   i <= E: expert_offsets[i] = first row whose key is >= i (binary search, O(log S)), so
//           offsets[0] = 0 and offsets[E] = number of valid rows.
// Deterministic: plain stores, each output written by exactly one thread.
__global__ void finish_plan_kernel(const uint32_t* __restrict__ sorted_keys,  // [S]
                                   const int32_t* __restrict__ sorted_pairs,  // [S]
                                   int64_t num_pairs, int64_t num_experts,
                                   int32_t* __restrict__ pair_to_row,       // [S] = [T, K]
                                   int32_t* __restrict__ expert_offsets) {  // [E + 1]
  const int64_t n = num_pairs > num_experts ? num_pairs : num_experts + 1;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    if (i < num_pairs) {
      const int32_t p = sorted_pairs[i];
      pair_to_row[p] =
          sorted_keys[i] < static_cast<uint32_t>(num_experts) ? static_cast<int32_t>(i) : -1;
    }
    if (i <= num_experts) {
      const uint32_t e = static_cast<uint32_t>(i);
      int64_t lo = 0, hi = num_pairs;  // first index in [lo, hi) with key >= e
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (sorted_keys[mid] < e) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      expert_offsets[i] = static_cast<int32_t>(lo);
    }
  }
}

bool valid_sizes(int64_t num_pairs, int64_t num_experts) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  return num_pairs >= 0 && num_pairs < kMax && num_experts >= 1 && num_experts < kMax;
}

// CUB's temporary storage for sorting `num_pairs` pairs (0 when there is nothing to sort).
cudaError_t cub_sort_bytes(int64_t num_pairs, int64_t num_experts, size_t* bytes) {
  *bytes = 0;
  if (num_pairs == 0) return cudaSuccess;
  return cub::DeviceRadixSort::SortPairs(
      nullptr, *bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(num_pairs), 0, key_bits(num_experts));
}

// Workspace sections, each kAlign-aligned: keys_in, keys_out, values_in [S] and CUB's storage.
// kAlign bytes of slack let the caller pass a workspace of any alignment.
size_t total_bytes(int64_t num_pairs, size_t cub_bytes) {
  const size_t section = align_up(static_cast<size_t>(num_pairs) * sizeof(uint32_t));
  return kAlign + 3 * section + align_up(cub_bytes);
}

template <typename index_t>
cudaError_t routing_impl(const index_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                         int32_t* sorted_pairs, int32_t* pair_to_row, int32_t* expert_offsets,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_sizes(num_pairs, num_experts)) return cudaErrorInvalidValue;
  size_t cub_bytes = 0;
  MOEFORGE_CUDA_CHECK(cub_sort_bytes(num_pairs, num_experts, &cub_bytes));
  if (workspace_bytes < total_bytes(num_pairs, cub_bytes)) return cudaErrorInvalidValue;

  if (num_pairs > 0) {
    const auto base = reinterpret_cast<uintptr_t>(workspace);
    char* ws = reinterpret_cast<char*>((base + kAlign - 1) / kAlign * kAlign);
    const size_t section = align_up(static_cast<size_t>(num_pairs) * sizeof(uint32_t));
    auto* keys_in = reinterpret_cast<uint32_t*>(ws);
    auto* keys_out = reinterpret_cast<uint32_t*>(ws + section);
    auto* values_in = reinterpret_cast<int32_t*>(ws + 2 * section);
    void* cub_storage = ws + 3 * section;

    MOEFORGE_CUDA_CHECK(launch_kernel(make_sort_keys_kernel<index_t>, grid_for(num_pairs), kThreads,
                                      0, stream, topk_ids, num_pairs, num_experts, keys_in,
                                      values_in));
    MOEFORGE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        cub_storage, cub_bytes, keys_in, keys_out, values_in, sorted_pairs,
        static_cast<int>(num_pairs), 0, key_bits(num_experts), stream));
    MOEFORGE_CUDA_CHECK(launch_kernel(
        finish_plan_kernel, grid_for(std::max(num_pairs, num_experts + 1)), kThreads, 0, stream,
        keys_out, sorted_pairs, num_pairs, num_experts, pair_to_row, expert_offsets));
  } else {
    // Nothing to sort: the same kernel writes expert_offsets = 0 (and touches no pair).
    MOEFORGE_CUDA_CHECK(launch_kernel(finish_plan_kernel, grid_for(num_experts + 1), kThreads, 0,
                                      stream, nullptr, nullptr, 0, num_experts, pair_to_row,
                                      expert_offsets));
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t routing_workspace_bytes(int64_t num_pairs, int64_t num_experts, size_t* bytes) {
  *bytes = 0;
  if (!valid_sizes(num_pairs, num_experts)) return cudaErrorInvalidValue;
  size_t cub_bytes = 0;
  MOEFORGE_CUDA_CHECK(cub_sort_bytes(num_pairs, num_experts, &cub_bytes));
  *bytes = total_bytes(num_pairs, cub_bytes);
  return cudaSuccess;
}

cudaError_t launch_routing(const int32_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                           int32_t* sorted_pairs, int32_t* pair_to_row, int32_t* expert_offsets,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return routing_impl(topk_ids, num_pairs, num_experts, sorted_pairs, pair_to_row, expert_offsets,
                      workspace, workspace_bytes, stream);
}

cudaError_t launch_routing(const int64_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                           int32_t* sorted_pairs, int32_t* pair_to_row, int32_t* expert_offsets,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return routing_impl(topk_ids, num_pairs, num_experts, sorted_pairs, pair_to_row, expert_offsets,
                      workspace, workspace_bytes, stream);
}

}  // namespace moeforge::kernels
