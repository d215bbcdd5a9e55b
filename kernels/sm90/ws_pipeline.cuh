// The warp-specialised main loop shared by the sm_90a kernels that have one (the row-grouped GEMM,
// grouped_gemm_sm90_ws.cu, and the K-grouped weight gradient, grouped_wgrad_sm90_ws.cu):
// 384 threads, warpgroups 0-1 the consumers (MMAs and epilogue), warpgroup 2 the producer (the
// stages' copies: cp.async, and in the row-grouped GEMM TMA for the weight), handing a ring of
// shared-memory stages back and forth through mbarriers (docs/hopper-gemm-plan.md 1.2):
// - a stage's `full` barrier completes once each producer thread's copies of it have landed
//   (cp.async.mbarrier.arrive.noinc: kProducerThreads arrivals; with the weight's tiles copied by
//   TMA, one more arrival announcing their bytes, tma.cuh); its `empty` barrier once every
//   consumer warp's MMAs that read it have retired (lane 0 of each: kConsumerThreads / 32);
// - both roles walk the same tiles and the same ring, so the producer runs ahead by up to the
//   ring's length, across tile boundaries (the next tile's first loads overlap this tile's last
//   MMAs and its epilogue);
// - the consumer fences the async proxy after each full wait (cp.async writes through the generic
//   proxy, wgmma reads through the async one; plan 1.5) and keeps one k block's MMAs in flight;
// - a barrier wait that never ends traps after ~8 s (mbarrier.cuh's watchdog).
#pragma once

#include <cstdint>

#include "mbarrier.cuh"
#include "wgmma.cuh"

namespace moeforge::kernels::sm90 {

inline constexpr int kConsumerThreads = 256;  // two warpgroups
inline constexpr int kProducerThreads = 128;  // one warpgroup
inline constexpr int kWsThreads = kConsumerThreads + kProducerThreads;

// Whether setmaxnreg's split (producer, consumer registers per thread) only redistributes the
// registers that the launch bounds (kWsThreads, 1 block per SM) give every thread at entry.
template <int kProducerRegisters, int kConsumerRegisters>
inline constexpr bool kRegisterSplitFits = kProducerThreads* kProducerRegisters +
                                               kConsumerThreads* kConsumerRegisters <=
                                           kWsThreads*(65536 / kWsThreads / 8 * 8);

// The full / empty barrier pair of each of kStages stages (8-byte objects in shared memory).
template <int kStages>
struct StageBarriers {
  uint64_t full[kStages];   // stage s's copies have landed
  uint64_t empty[kStages];  // the MMAs that read stage s have retired

  // One thread initialises them (before the block's barrier that publishes them); the first
  // `stages` are used. A full phase takes `full_arrivals`: each producer thread's, plus one
  // announcing TMA bytes where the producer issues TMA copies.
  __device__ __forceinline__ void init(int stages, uint32_t full_arrivals = kProducerThreads) {
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(&full[s], full_arrivals);
      mbarrier_init(&empty[s], kConsumerThreads / 32);
    }
  }
};

// A position in the ring of kStages stages and the phase parity its barriers are in.
template <int kStages>
struct Ring {
  uint32_t stage = 0, phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// One arrival per consumer warp, after all its lanes have passed the point (their MMAs retired).
__device__ __forceinline__ void warp_arrive(uint64_t* bar, int lane) {
  __syncwarp();
  if (lane == 0) mbarrier_arrive(bar);
}

// The producer's part of one tile: for each of its k blocks, wait until the ring's next stage is
// free (a fresh stage passes at once), issue this thread's copies of the k block into it
// (load(stage index, kb)) and hand their landing to the stage's full barrier.
template <int kStages, int kBarrierStages, typename Load>
__device__ __forceinline__ void produce_k_blocks(StageBarriers<kBarrierStages>* bars,
                                                 Ring<kStages>& ring, int64_t k_blocks,
                                                 Load&& load) {
  static_assert(kStages <= kBarrierStages, "a barrier pair per stage");
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    mbarrier_wait(&bars->empty[ring.stage], ring.phase ^ 1u);
    load(ring.stage, kb);
    cp_async_mbarrier_arrive(&bars->full[ring.stage]);
    ring.advance();
  }
}

// The consumers' part of one tile: for each k block, wait for its stage, issue its MMAs into d
// (mma(stage index); committed here as one group), keep one group in flight and hand the stage
// of the k block before back once its MMAs have retired. On return every MMA has retired, d
// holds the tile's sums and every stage is handed back.
template <int kStages, int kBarrierStages, int kAcc, typename Mma>
__device__ __forceinline__ void consume_k_blocks(StageBarriers<kBarrierStages>* bars,
                                                 Ring<kStages>& ring, int64_t k_blocks, int lane,
                                                 float (&d)[kAcc], Mma&& mma) {
  static_assert(kStages <= kBarrierStages, "a barrier pair per stage");
  uint32_t previous = 0;  // the stage of the k block before, whose MMAs may be in flight
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    mbarrier_wait(&bars->full[ring.stage], ring.phase);
    fence_proxy_async_shared();
    fence_accumulators(d);
    wgmma_fence();
    mma(ring.stage);
    wgmma_commit_group();
    wgmma_wait<1>();  // k block kb - 1's MMAs have retired: its stage goes back
    fence_accumulators(d);
    if (kb > 0) warp_arrive(&bars->empty[previous], lane);
    previous = ring.stage;
    ring.advance();
  }
  wgmma_wait<0>();
  fence_accumulators(d);
  if (k_blocks > 0) warp_arrive(&bars->empty[previous], lane);
}

// Splits the block into its roles after the barrier that published the shared state: the
// producer warpgroup gives registers up and runs produce(loader index 0..127), the consumer
// warpgroups take them and run consume(thread index 0..255).
template <int kProducerRegisters, int kConsumerRegisters, typename Produce, typename Consume>
__device__ __forceinline__ void run_roles(Produce&& produce, Consume&& consume) {
  static_assert(kRegisterSplitFits<kProducerRegisters, kConsumerRegisters>,
                "setmaxnreg may only redistribute the registers the launch bounds give at entry");
  const int tid = static_cast<int>(threadIdx.x);
  if (tid >= kConsumerThreads) {
    warpgroup_release_registers<kProducerRegisters>();
    produce(tid - kConsumerThreads);
  } else {
    warpgroup_claim_registers<kConsumerRegisters>();
    consume(tid);
  }
}

}  // namespace moeforge::kernels::sm90
