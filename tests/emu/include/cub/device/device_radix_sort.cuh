// Host kernel emulator: stands in for CUB's DeviceRadixSort::SortPairs (the one CUB call of
// kernels/), with the same contract: a stable ascending sort of keys on bits [begin_bit, end_bit),
// values moved with their keys, the first call (d_temp_storage == nullptr) only sizing the
// temporary storage. CUB itself is not emulated; what the emulator tests is our use of it
// (buffer sizes, bit range, the kernels before and after it).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moeforge_emu/launch.h"

namespace cub {

struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes,
                               const KeyT* d_keys_in, KeyT* d_keys_out, const ValueT* d_values_in,
                               ValueT* d_values_out, NumItemsT num_items, int begin_bit = 0,
                               int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = 0) {
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = 256 + static_cast<size_t>(num_items) * 2 * sizeof(KeyT);
      return cudaSuccess;
    }
    if (begin_bit < 0 || end_bit > static_cast<int>(sizeof(KeyT) * 8) || begin_bit >= end_bit) {
      return cudaErrorInvalidValue;
    }
    // Runs in stream order (recorded while the stream is captured, like the real sort).
    return ::moeforge::emu::enqueue_host_work(stream, [=]() {
      sort(d_temp_storage, temp_storage_bytes, d_keys_in, d_keys_out, d_values_in, d_values_out,
           static_cast<size_t>(num_items), begin_bit, end_bit);
      return cudaSuccess;
    });
  }

 private:
  template <typename KeyT, typename ValueT>
  static void sort(void* d_temp_storage, size_t temp_storage_bytes, const KeyT* d_keys_in,
                   KeyT* d_keys_out, const ValueT* d_values_in, ValueT* d_values_out, size_t n,
                   int begin_bit, int end_bit) {
    // Touch the whole temporary allocation (AddressSanitizer checks the size we asked for).
    std::fill_n(static_cast<unsigned char*>(d_temp_storage), temp_storage_bytes, 0xA5);
    const uint64_t width = static_cast<uint64_t>(end_bit - begin_bit);
    const uint64_t field = width >= 64 ? ~uint64_t{0} : (uint64_t{1} << width) - 1;
    const auto digit = [&](KeyT k) { return (static_cast<uint64_t>(k) >> begin_bit) & field; };
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digit(d_keys_in[a]) < digit(d_keys_in[b]); });
    std::vector<KeyT> keys(n);
    std::vector<ValueT> values(n);
    for (size_t i = 0; i < n; ++i) {
      keys[i] = d_keys_in[order[i]];
      values[i] = d_values_in[order[i]];
    }
    std::copy(keys.begin(), keys.end(), d_keys_out);
    std::copy(values.begin(), values.end(), d_values_out);
  }
};

}  // namespace cub
