// The probes of moeforge/kernels/sm90_pipeline_probe.h: the warp-specialised kernels' stage
// hand-over (ws_pipeline.cuh's barriers, arrivals and role split) with a copy in place of the
// MMAs, and one TMA copy (tma.cuh) as the row-grouped GEMM issues them.
#include <cstdint>

#include "../async_copy.cuh"
#include "../launch.cuh"
#include "grouped_gemm_sm90_tile.cuh"
#include "mbarrier.cuh"
#include "moeforge/kernels/cuda_check.h"
#include "moeforge/kernels/grouped_gemm_sm90.h"
#include "moeforge/kernels/sm90_pipeline_probe.h"
#include "tma.cuh"
#include "ws_pipeline.cuh"

namespace moeforge::kernels {
namespace {

using sm90::kConsumerThreads;
using sm90::kProducerThreads;
constexpr int kStageBytes = kSm90ProbeWordsPerRound * 4;
constexpr int kChunks = kStageBytes / 16;  // 256 16-byte chunks per stage
constexpr size_t kRingOffset = 1024;       // the barriers first
static_assert(sizeof(sm90::StageBarriers<kSm90ProbeMaxStages>) <= kRingOffset, "barriers fit");

__global__ void __launch_bounds__(sm90::kWsThreads, 1)
    sm90_pipeline_probe_kernel(const uint32_t* in, uint32_t* out, int64_t rounds, int stages) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  auto* bars = reinterpret_cast<sm90::StageBarriers<kSm90ProbeMaxStages>*>(smem);
  unsigned char* ring = smem + kRingOffset;
  if (threadIdx.x == 0) {
    bars->init(stages);
    sm90::fence_mbarrier_init();
  }
  __syncthreads();
  // The ring's length is a run-time argument here (the kernels' sm90::Ring fixes it).
  uint32_t stage = 0, phase = 0;
  const auto advance = [&] {
    if (++stage == static_cast<uint32_t>(stages)) {
      stage = 0;
      phase ^= 1u;
    }
  };
  // The weight gradient's register split (its producer issues cp.async as this one does), so
  // that setmaxnreg is exercised as it is used there.
  sm90::run_roles<88, 208>(
      [&](int loader) {  // the producer: two chunks per thread and round
        for (int64_t r = blockIdx.x; r < rounds; r += gridDim.x) {
          sm90::mbarrier_wait(&bars->empty[stage], phase ^ 1u);
          const uint32_t* src = in + r * kSm90ProbeWordsPerRound;
          unsigned char* dst = ring + stage * kStageBytes;
          for (int c = loader; c < kChunks; c += kProducerThreads) {
            cp_async_16(dst + c * 16, src + c * 4);
          }
          sm90::cp_async_mbarrier_arrive(&bars->full[stage]);
          advance();
        }
        cp_async_commit();
        cp_async_wait<0>();
      },
      [&](int tid) {  // the consumers: one chunk per thread and round
        for (int64_t r = blockIdx.x; r < rounds; r += gridDim.x) {
          sm90::mbarrier_wait(&bars->full[stage], phase);
          const uint4 v = reinterpret_cast<const uint4*>(ring + stage * kStageBytes)[tid];
          sm90::warp_arrive(&bars->empty[stage], tid % 32);
          reinterpret_cast<uint4*>(out + r * kSm90ProbeWordsPerRound)[tid] =
              uint4{v.x + 1, v.y + 1, v.z + 1, v.w + 1};
          advance();
        }
      });
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched
#endif
}

constexpr int kTmaProbeThreads = 128;
constexpr size_t kTmaProbeBoxOffset = 1024;  // the barrier first; the box 1024-byte aligned

__global__ void __launch_bounds__(kTmaProbeThreads)
    sm90_tma_probe_kernel(const __grid_constant__ CUtensorMap map, int32_t row0, int32_t col0,
                          unsigned char* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(MOEFORGE_KERNEL_EMULATION)
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* box = smem + kTmaProbeBoxOffset;
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(bar, 1);
    sm90::fence_mbarrier_init();
    sm90::fence_proxy_async_shared();
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // as the GEMM's producer: announce the bytes, then copy
    sm90::mbarrier_arrive_expect_tx(bar, kSm90TmaProbeBytes);
    sm90::tma_load_4d(box, &map, bar, col0, row0, 0, 0);
  }
  sm90::mbarrier_wait(bar, 0);
  for (int c = static_cast<int>(threadIdx.x); c < kSm90TmaProbeBytes / 16; c += kTmaProbeThreads) {
    reinterpret_cast<uint4*>(out)[c] = reinterpret_cast<const uint4*>(box)[c];
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a features: never launched
#endif
}

}  // namespace

cudaError_t launch_sm90_tma_probe(const __nv_bfloat16* src, int64_t rows, int64_t cols, int64_t ld,
                                  int32_t row0, int32_t col0, unsigned char* out,
                                  cudaStream_t stream) {
  if (rows < 1 || cols < 1 || ld < cols || reinterpret_cast<uintptr_t>(out) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  // The matrix as the GEMM describes one expert's K-major weight W [n = rows, k = cols]
  // (without SwiGLU halves): the box at (col0, row0) is the k block col0.. of B rows row0...
  GroupedGemmSm90Args w;
  w.w = src;
  w.n = rows, w.k = cols, w.ldw = ld, w.w_stride_e = rows * ld, w.num_experts = 1;
  const sm90::TmaTensor4d t = sm90::weight_tma_tensor(w);
  if (!sm90::tma_tensor_valid(t)) return cudaErrorInvalidValue;
  bool supported = false;
  MOEFORGE_CUDA_CHECK(grouped_gemm_sm90_supported(&supported));
  if (!supported) return cudaErrorNotSupported;
  CUtensorMap map;
  MOEFORGE_CUDA_CHECK(sm90::encode_tma_tensor(t, &map));
  const size_t smem = kTmaProbeBoxOffset + kSm90TmaProbeBytes;
  MOEFORGE_CUDA_CHECK(launch_kernel(sm90_tma_probe_kernel, dim3(1), dim3(kTmaProbeThreads), smem,
                                    stream, map, row0, col0, out));
  return cudaSuccess;
}

cudaError_t launch_sm90_pipeline_probe(const uint32_t* in, uint32_t* out, int64_t rounds,
                                       int stages, int blocks, cudaStream_t stream) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (rounds < 0 || stages < 1 || stages > kSm90ProbeMaxStages || blocks < 1 || !aligned(in) ||
      !aligned(out)) {
    return cudaErrorInvalidValue;
  }
  bool supported = false;
  MOEFORGE_CUDA_CHECK(grouped_gemm_sm90_supported(&supported));
  if (!supported) return cudaErrorNotSupported;
  if (rounds == 0) return cudaSuccess;
  const size_t smem = kRingOffset + size_t{kStageBytes} * static_cast<size_t>(stages);
  MOEFORGE_CUDA_CHECK(cudaFuncSetAttribute(sm90_pipeline_probe_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  MOEFORGE_CUDA_CHECK(launch_kernel(sm90_pipeline_probe_kernel, dim3(static_cast<unsigned>(blocks)),
                                    dim3(sm90::kWsThreads), smem, stream, in, out, rounds, stages));
  return cudaSuccess;
}

}  // namespace moeforge::kernels
