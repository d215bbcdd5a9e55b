// Host kernel emulator: fiber scheduler and the subset of the CUDA runtime API that kernels/ and
// the GoogleTest launcher suites use (see include/moeforge_emu/emu.h for what is modelled).
//
// One OS thread runs everything. A launch runs its blocks one after another in grid order; the
// threads of a block are fibers, run warp by warp (run_block) until each one finishes or waits at
// a barrier or warp collective. A full round in which no thread arrives anywhere is a deadlock.
// "Device" memory is host memory from posix_memalign(256), filled with 0xFF (NaN / -1) so that a
// read of an unwritten element shows. Stream capture records launches and replays them on
// cudaGraphLaunch, and fails synchronous calls made during capture, like the real runtime.
#include <ucontext.h>

// A fiber starts with makecontext/setcontext; after that every switch is GCC's
// __builtin_setjmp/__builtin_longjmp, which, unlike swapcontext, makes no signal-mask system call
// (the emulator's run time was mostly that) and, unlike longjmp, is not intercepted by
// AddressSanitizer (whose interceptor cannot tell a fiber stack and warns). A fiber's stack is
// unpoisoned before each reuse instead. The jump buffers are only used between stacks that are
// alive, and no local of these functions is modified between a setjmp and the jump back, so
// GCC's -Wclobbered does not apply.
#pragma GCC diagnostic ignored "-Wclobbered"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moeforge_emu/emu.h"
#include "moeforge_emu/launch.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MOEFORGE_EMU_ASAN 1
#endif

struct CUstream_st {
  bool capturing = false;
  bool capture_invalidated = false;
  std::vector<std::function<cudaError_t()>> captured;
};
struct CUgraph_st {
  std::vector<std::function<cudaError_t()>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<cudaError_t()>> nodes;
};

namespace moeforge::emu {
namespace {

constexpr size_t kFiberStackBytes = 512 * 1024;
constexpr int kWarpLanes = 32;

struct PendingCopy {
  void* dst;
  size_t bytes;
  std::array<unsigned char, 16> data;
};

struct Fiber {
  ucontext_t context;  // the entry point, used once per block
  void* jump[5];       // where the fiber last yielded (__builtin_setjmp buffer)
  bool started = false;
  std::unique_ptr<char[]> stack;
  ThreadContext thread{};
  bool done = false;
  uint64_t warp_epoch = 0;
  const char* waiting = nullptr;
  std::array<unsigned char, 16> slot{};                        // warp exchange
  std::vector<PendingCopy> open_copies;                        // cp.async not yet committed
  std::vector<std::vector<PendingCopy>> copy_groups;           // committed, oldest first
  std::vector<std::function<void()>> open_mmas;                // wgmma not yet committed
  std::vector<std::vector<std::function<void()>>> mma_groups;  // committed, oldest first
};

struct Mbarrier {
  int count = 0;    // arrivals per phase
  int pending = 0;  // arrivals the current phase still needs
  int64_t tx = 0;   // bytes announced (expect_tx) and not yet completed (TMA copies)
  uint64_t phase = 0;
  std::vector<PendingCopy> copies;  // land when the current phase completes
};

// What encode_tensor_map writes into a CUtensorMap's 128 opaque bytes.
struct TensorMapFields {
  uint64_t magic;  // kTensorMapMagic: the map was encoded (not zeros or garbage)
  const unsigned char* base;
  int32_t rank;
  uint64_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] = 2 (bf16)
  uint32_t box[5];
};
static_assert(sizeof(TensorMapFields) <= 128, "fits a CUtensorMap");
constexpr uint64_t kTensorMapMagic = 0x544d41706d617073ull;

struct Block {
  std::vector<Fiber>* fibers = nullptr;
  std::map<const void*, Mbarrier> mbarriers;  // by shared-memory address, reset per block
  int num_threads = 0;
  int exited = 0;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  bool descending = false;  // warp order of this block's first round (see run_block)
  uint32_t seed = 0;        // of its later rounds' warp orders
  uint64_t progress = 0;
  std::string error;
  const std::function<void()>* body = nullptr;
  unsigned char* dynamic_smem = nullptr;
  std::vector<std::unique_ptr<unsigned char[]>> warp_scratch;  // one per warp
};

Block* g_block = nullptr;
Fiber* g_current = nullptr;
ucontext_t g_scheduler;     // uc_link of the entry contexts (never reached: fibers jump back)
void* g_scheduler_jump[5];  // where the scheduler resumed the current fiber

// __builtin_longjmp may not be used in the function that calls __builtin_setjmp. Not instrumented:
// AddressSanitizer would precede the jump with __asan_handle_no_return, which cannot tell a fiber
// stack (it warns); the fiber switch annotations and the unpoisoning in run_block do that job.
[[gnu::noipa, gnu::no_sanitize_address]] void jump_to(void** buffer) {
  __builtin_longjmp(buffer, 1);
}
cudaError_t g_last_error = cudaSuccess;
int g_sm = 90;  // emulated compute capability x10 (MOEFORGE_EMU_SM overrides)
std::map<const void*, int> g_max_dynamic_smem;

#ifdef MOEFORGE_EMU_ASAN
void* g_scheduler_fake_stack = nullptr;
const void* g_scheduler_stack_bottom = nullptr;
size_t g_scheduler_stack_size = 0;
#endif

// Fiber -> scheduler.
void yield_to_scheduler(bool fiber_finished) {
#ifdef MOEFORGE_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(fiber_finished ? nullptr : &fake_stack, g_scheduler_stack_bottom,
                                 g_scheduler_stack_size);
#endif
  if (__builtin_setjmp(g_current->jump) == 0) jump_to(g_scheduler_jump);
#ifdef MOEFORGE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  (void)fiber_finished;
}

// Scheduler -> fiber f.
void resume(Fiber& f) {
  g_current = &f;
#ifdef MOEFORGE_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, f.stack.get(), kFiberStackBytes);
#endif
  if (__builtin_setjmp(g_scheduler_jump) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.context);
    }
    jump_to(f.jump);
  }
#ifdef MOEFORGE_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, &g_scheduler_stack_bottom,
                                  &g_scheduler_stack_size);
#endif
  g_current = nullptr;
}

void wait(const char* what) {
  g_current->waiting = what;
  yield_to_scheduler(false);
  g_current->waiting = nullptr;
}

std::string describe(const ThreadContext& t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", t.block_idx.x, t.block_idx.y,
                t.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
  return buf;
}

void fiber_entry() {
#ifdef MOEFORGE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#endif
  (*g_block->body)();
  Block& b = *g_block;
  if ((!g_current->open_mmas.empty() || !g_current->mma_groups.empty()) && b.error.empty()) {
    b.error = describe(g_current->thread) + " returned with wgmma not retired by wait_group";
  }
  g_current->done = true;
  ++b.exited;
  ++b.progress;
  if (b.barrier_arrived > 0 && b.error.empty()) {
    b.error = describe(g_current->thread) + " returned while " + std::to_string(b.barrier_arrived) +
              " threads of its block wait at __syncthreads";
  }
  yield_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

Fiber& lane_fiber(int lane) {
  const int base = g_current->thread.linear - g_current->thread.linear % kWarpLanes;
  return (*g_block->fibers)[base + lane];
}

// Runs one block to completion; returns false (with g_block->error set) on a fault.
bool run_block(Block& b) {
  auto& fibers = *b.fibers;
  for (int i = 0; i < b.num_threads; ++i) {
    Fiber& f = fibers[i];
    f.done = false;
    f.started = false;
    f.open_copies.clear();
    f.copy_groups.clear();
    f.open_mmas.clear();
    f.mma_groups.clear();
    f.warp_epoch = 0;
    f.waiting = nullptr;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStackBytes;
#ifdef MOEFORGE_EMU_ASAN
    // Frames a fiber left without returning (a trap, the end of a block) keep their redzones.
    __asan_unpoison_memory_region(f.stack.get(), kFiberStackBytes);
#endif
    f.context.uc_link = &g_scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  // Warps run greedily, one at a time, each until it stalls (at __syncthreads, or waiting for
  // another warp); in the first round even blocks take the warps in ascending order, odd blocks
  // in descending order. A warp therefore reads shared memory before the other warps have written
  // it unless a barrier orders the two, so a missing __syncthreads shows as wrong results in one
  // of the orders. Later rounds take the warps in a seeded random order (the same every run), so
  // that warps which meet only through mbarriers (the warp-specialised sm90 pipeline) also
  // interleave in orders a fixed sweep never produces: a producer refilling a stage that one
  // consumer warpgroup still reads shows.
  const int num_warps = (b.num_threads + kWarpLanes - 1) / kWarpLanes;
  std::vector<int> order(num_warps);
  for (int w = 0; w < num_warps; ++w) order[w] = b.descending ? num_warps - 1 - w : w;
  std::mt19937 shuffle(b.seed);
  for (bool first_round = true;; first_round = false) {
    const uint64_t before = b.progress;
    if (!first_round) std::shuffle(order.begin(), order.end(), shuffle);
    for (int wi = 0; wi < num_warps; ++wi) {
      const int w = order[wi];
      const int end = std::min(b.num_threads, (w + 1) * kWarpLanes);
      for (;;) {
        const uint64_t warp_before = b.progress;
        bool live = false;
        for (int i = w * kWarpLanes; i < end; ++i) {
          if (fibers[i].done) continue;
          live = true;
          resume(fibers[i]);
          if (!b.error.empty()) return false;
        }
        if (!live || b.progress == warp_before) break;
      }
    }
    if (b.exited == b.num_threads) {
      for (const auto& [bar, m] : b.mbarriers) {
        if (m.tx != 0) {
          b.error = "the block ended with TMA bytes announced to an mbarrier that never landed";
          return false;
        }
        if (!m.copies.empty()) {
          b.error =
              "the block ended with cp.async copies handed to an mbarrier whose phase never "
              "completed (they never landed)";
          return false;
        }
      }
      return true;
    }
    if (b.progress == before) {
      std::string waits;
      for (int i = 0; i < b.num_threads && waits.size() < 600; ++i) {
        if (!fibers[i].done) {
          waits += "\n  " + describe(fibers[i].thread) + " waits at " +
                   (fibers[i].waiting ? fibers[i].waiting : "?");
        }
      }
      b.error = "deadlock: no thread of the block can go on" + waits;
      return false;
    }
  }
}

cudaError_t run_launch(dim3 grid, dim3 block, size_t smem_bytes,
                       const std::function<void()>& body) {
  static std::vector<Fiber> fibers;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(fibers.size()) < threads) {
    const size_t old = fibers.size();
    fibers.resize(threads);
    for (size_t i = old; i < fibers.size(); ++i) {
      fibers[i].stack = std::make_unique<char[]>(kFiberStackBytes);
    }
  }
  // 128-byte aligned like the device's dynamic shared memory (kernels/launch.cuh); exactly
  // smem_bytes long, so AddressSanitizer sees an access past the launch's size.
  struct AlignedFree {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  void* raw = nullptr;
  if (posix_memalign(&raw, 128, smem_bytes == 0 ? 1 : smem_bytes) != 0) {
    return cudaErrorMemoryAllocation;
  }
  std::unique_ptr<unsigned char, AlignedFree> smem(static_cast<unsigned char*>(raw));
  Block b;
  b.fibers = &fibers;
  b.num_threads = threads;
  b.body = &body;
  b.dynamic_smem = smem.get();
  for (int w = 0; w < (threads + kWarpLanes - 1) / kWarpLanes; ++w) {
    b.warp_scratch.push_back(std::make_unique<unsigned char[]>(kWarpScratchBytes));
  }
  g_block = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.exited = b.barrier_arrived = 0;
        b.mbarriers.clear();
        b.descending = (bx + by + bz) % 2 == 1;
        b.seed = 0x9E3779B9u * (bx + 1) + 0x85EBCA6Bu * (by + 1) + 0xC2B2AE35u * (bz + 1);
        std::memset(smem.get(), 0xFF, smem_bytes);
        int linear = 0;
        for (unsigned tz = 0; tz < block.z; ++tz) {
          for (unsigned ty = 0; ty < block.y; ++ty) {
            for (unsigned tx = 0; tx < block.x; ++tx, ++linear) {
              fibers[linear].thread =
                  ThreadContext{{tx, ty, tz}, {bx, by, bz}, block, grid, linear};
            }
          }
        }
        if (!run_block(b)) {
          std::fprintf(stderr, "[moeforge emu] kernel fault: %s\n", b.error.c_str());
          g_block = nullptr;
          return cudaErrorLaunchFailure;
        }
      }
    }
  }
  g_block = nullptr;
  return cudaSuccess;
}

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) g_last_error = e;
  return e;
}

bool any_capture_active();

}  // namespace

// ---- device side -----------------------------------------------------------------------------

const ThreadContext& current_thread() {
  if (g_current == nullptr) {
    std::fprintf(stderr, "[moeforge emu] threadIdx/blockIdx read outside a kernel\n");
    std::abort();
  }
  return g_current->thread;
}

int current_lane() {
  return current_thread().linear % kWarpLanes;
}

void* warp_exchange_slot(int lane) {
  return lane_fiber(lane).slot.data();
}

void* dynamic_shared_memory() {
  return g_block->dynamic_smem;
}

void* warp_scratch() {
  return g_block->warp_scratch[current_thread().linear / kWarpLanes].get();
}

void trap(const char* what) {
  if (g_block->error.empty()) g_block->error = describe(g_current->thread) + ": " + what;
  g_current->done = true;
  yield_to_scheduler(true);
  std::abort();  // the scheduler abandons the block and never resumes a trapped fiber
}

void async_copy(void* dst, const void* src, size_t bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) trap("cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes) {
    trap("cp.async source or destination is not aligned to the copy size");
  }
  PendingCopy c{dst, bytes, {}};
  std::memcpy(c.data.data(), src, bytes);  // global data is not written during the kernel
  std::memset(dst, 0xFF, bytes);
  g_current->open_copies.push_back(c);
}

void async_commit() {
  g_current->copy_groups.push_back(std::move(g_current->open_copies));
  g_current->open_copies.clear();
}

void async_wait(int groups_left_in_flight) {
  auto& groups = g_current->copy_groups;
  while (static_cast<int>(groups.size()) > groups_left_in_flight) {
    for (const PendingCopy& c : groups.front()) std::memcpy(c.dst, c.data.data(), c.bytes);
    groups.erase(groups.begin());
  }
}

void async_mma(std::function<void()> retire) {
  g_current->open_mmas.push_back(std::move(retire));
}

void async_mma_commit() {
  g_current->mma_groups.push_back(std::move(g_current->open_mmas));
  g_current->open_mmas.clear();
}

void async_mma_wait(int groups_left_in_flight) {
  auto& groups = g_current->mma_groups;
  while (static_cast<int>(groups.size()) > groups_left_in_flight) {
    for (const auto& retire : groups.front()) retire();
    groups.erase(groups.begin());
  }
}

namespace {

Mbarrier& mbarrier_at(void* bar, bool init) {
  auto* const p = static_cast<unsigned char*>(bar);
  const auto* const smem = g_block->dynamic_smem;
  if (p < smem || reinterpret_cast<uintptr_t>(p) % 8 != 0) {
    trap("mbarrier: not an 8-byte aligned object in dynamic shared memory");
  }
  const auto it = g_block->mbarriers.find(bar);
  if (it == g_block->mbarriers.end()) {
    if (!init) trap("mbarrier used before mbarrier.init");
    return g_block->mbarriers[bar];
  }
  static const unsigned char kZeros[8] = {};
  if (std::memcmp(bar, kZeros, 8) != 0) trap("an mbarrier's bytes were overwritten by a store");
  return it->second;
}

// The phase completes once its arrivals have come and every byte announced to it has landed.
void mbarrier_try_complete(Mbarrier& m) {
  if (m.pending > 0 || m.tx != 0) return;
  for (const PendingCopy& c : m.copies) std::memcpy(c.dst, c.data.data(), c.bytes);
  m.copies.clear();
  ++m.phase;
  m.pending = m.count;
}

void mbarrier_arrive_on(Mbarrier& m) {
  ++g_block->progress;
  // More arrivals than a phase expects (possible only while its tx-count is outstanding) are
  // undefined on the hardware.
  if (--m.pending < 0) trap("mbarrier: more arrivals than the phase expects");
  mbarrier_try_complete(m);
}

// tx-count's range (PTX ISA: mbarrier's tx-count, -(2^20 - 1) .. 2^20 - 1).
void check_tx_range(const Mbarrier& m) {
  if (m.tx > (1 << 20) - 1 || m.tx < -((1 << 20) - 1)) trap("mbarrier tx-count out of range");
}

}  // namespace

void mbarrier_init(void* bar, int count) {
  if (count < 1 || count > (1 << 20) - 1) {
    trap("mbarrier.init: the expected arrival count must be in [1, 2^20 - 1]");
  }
  Mbarrier& m = mbarrier_at(bar, /*init=*/true);
  if (!m.copies.empty() || m.tx != 0) trap("mbarrier.init of a barrier with copies in flight");
  m = Mbarrier{count, count, 0, 0, {}};
  std::memset(bar, 0, 8);  // the object's bytes; kernels must not use them otherwise
}

void mbarrier_arrive(void* bar) {
  mbarrier_arrive_on(mbarrier_at(bar, false));
}

void mbarrier_arrive_async_copies(void* bar) {
  Mbarrier& m = mbarrier_at(bar, false);
  Fiber& f = *g_current;
  for (auto& group : f.copy_groups) m.copies.insert(m.copies.end(), group.begin(), group.end());
  m.copies.insert(m.copies.end(), f.open_copies.begin(), f.open_copies.end());
  f.copy_groups.clear();
  f.open_copies.clear();
  mbarrier_arrive_on(m);
}

void mbarrier_arrive_expect_tx(void* bar, uint32_t bytes) {
  Mbarrier& m = mbarrier_at(bar, false);
  m.tx += bytes;
  check_tx_range(m);
  mbarrier_arrive_on(m);
}

bool encode_tensor_map(void* map, const void* base, int rank, const uint64_t* dims,
                       const uint64_t* strides, const uint32_t* box) {
  // cuTensorMapEncodeTiled's rules for what we use (bf16, no interleave, 128-byte swizzle).
  if (map == nullptr || reinterpret_cast<uintptr_t>(map) % 64 != 0) return false;
  if (rank < 1 || rank > 5 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  if (box[0] * 2 % 16 != 0 || box[0] * 2 > 128) return false;
  TensorMapFields f{};
  f.magic = kTensorMapMagic;
  f.base = static_cast<const unsigned char*>(base);
  f.rank = rank;
  f.strides[0] = 2;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (uint64_t{1} << 32) || box[i] < 1 || box[i] > 256) return false;
    if (i > 0 && (strides[i - 1] % 16 != 0 || strides[i - 1] >= (uint64_t{1} << 40))) return false;
    f.dims[i] = dims[i];
    f.box[i] = box[i];
    if (i > 0) f.strides[i] = strides[i - 1];
  }
  std::memset(map, 0, 128);
  std::memcpy(map, &f, sizeof f);
  return true;
}

void tma_load(void* dst, const void* map, const int32_t* coords, int rank, void* bar) {
  TensorMapFields f;
  std::memcpy(&f, map, sizeof f);
  if (f.magic != kTensorMapMagic) trap("cp.async.bulk.tensor: the tensor map was not encoded");
  if (f.rank != rank) trap("cp.async.bulk.tensor: the copy's rank is not the tensor map's");
  auto* const out = static_cast<unsigned char*>(dst);
  const size_t offset = static_cast<size_t>(out - g_block->dynamic_smem);
  if (out < g_block->dynamic_smem || offset % 1024 != 0) {
    trap("cp.async.bulk.tensor: the 128-byte swizzle needs a 1024-byte aligned destination");
  }
  Mbarrier& m = mbarrier_at(bar, false);
  // Box rows of box[0] values (box[0] * 2 <= 128 bytes) in order, dimension 1 fastest; row r's
  // 16-byte chunk c lands at chunk c ^ (r % 8) of its 128-byte row (the swizzle's row bits are
  // address bits 7-9 of the aligned destination).
  const uint32_t chunks = f.box[0] * 2 / 16;
  if (chunks != 8) trap("cp.async.bulk.tensor: the emulator models 128-byte box rows only");
  uint64_t rows = 1;
  for (int i = 1; i < rank; ++i) rows *= f.box[i];
  for (uint64_t r = 0; r < rows; ++r) {
    int64_t coord[5] = {coords[0], 0, 0, 0, 0};
    bool row_in = true;
    uint64_t rest = r, row_offset = 0;
    for (int i = 1; i < rank; ++i) {
      coord[i] = int64_t{coords[i]} + static_cast<int64_t>(rest % f.box[i]);
      rest /= f.box[i];
      row_in = row_in && coord[i] >= 0 && coord[i] < static_cast<int64_t>(f.dims[i]);
      if (row_in) row_offset += static_cast<uint64_t>(coord[i]) * f.strides[i];
    }
    for (uint32_t c = 0; c < chunks; ++c) {
      PendingCopy copy{out + r * 128 + ((c ^ (r % 8)) * 16), 16, {}};
      for (int v = 0; v < 8; ++v) {  // bf16 values, each in or out of the tensor
        const int64_t x = coord[0] + c * 8 + v;
        if (row_in && x >= 0 && x < static_cast<int64_t>(f.dims[0])) {
          std::memcpy(copy.data.data() + 2 * v, f.base + row_offset + 2 * x, 2);
        }
      }
      std::memset(copy.dst, 0xFF, 16);
      m.copies.push_back(copy);
    }
  }
  m.tx -= static_cast<int64_t>(rows * f.box[0] * 2);
  check_tx_range(m);
  ++g_block->progress;
  mbarrier_try_complete(m);
}

void mbarrier_wait_parity(void* bar, uint32_t parity) {
  const Mbarrier& m = mbarrier_at(bar, false);
  while ((m.phase & 1u) == (parity & 1u)) wait("an mbarrier phase");
}

void sync_block() {
  Block& b = *g_block;
  if (b.exited > 0) {
    trap(("__syncthreads reached after " + std::to_string(b.exited) +
          " threads of the block returned (a barrier in divergent code)")
             .c_str());
  }
  const uint64_t generation = b.barrier_generation;
  ++b.progress;
  if (++b.barrier_arrived == b.num_threads) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
    return;
  }
  while (b.barrier_generation == generation) wait("__syncthreads");
}

void sync_warp(unsigned mask) {
  const int lane = current_lane();
  const int base = g_current->thread.linear - lane;
  if (((mask >> lane) & 1u) == 0) trap("warp collective called by a lane that is not in its mask");
  for (int l = 0; l < kWarpLanes; ++l) {
    if (((mask >> l) & 1u) && base + l >= g_block->num_threads) {
      trap("warp collective's mask names a lane that does not exist in this block");
    }
  }
  const uint64_t mine = ++g_current->warp_epoch;
  ++g_block->progress;
  for (int l = 0; l < kWarpLanes; ++l) {
    if (((mask >> l) & 1u) == 0) continue;
    Fiber& other = lane_fiber(l);
    while (other.warp_epoch < mine) {
      if (other.done) trap("a lane named in a warp collective's mask returned before reaching it");
      wait("a warp collective");
    }
  }
}

}  // namespace moeforge::emu

unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace moeforge::emu;
  const int flag = predicate != 0;
  std::memcpy(warp_exchange_slot(current_lane()), &flag, sizeof flag);
  sync_warp(mask);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    int v = 0;
    if ((mask >> l) & 1u) std::memcpy(&v, warp_exchange_slot(l), sizeof v);
    if (v) bits |= 1u << l;
  }
  sync_warp(mask);
  return bits;
}

namespace moeforge::emu {

namespace {
std::vector<CUstream_st*> g_streams;
bool any_capture_active() {
  for (auto* s : g_streams) {
    if (s->capturing) return true;
  }
  return false;
}
}  // namespace

cudaError_t launch_body(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                        cudaStream_t stream, std::function<void()> body) {
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  const bool bad_config = threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 ||
                          grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
                          grid.z > 65535 || smem_bytes > 227 * 1024;
  if (bad_config) return set_error(cudaErrorInvalidConfiguration);
  if (smem_bytes > 48 * 1024) {
    const auto opt_in = g_max_dynamic_smem.find(kernel);
    if (opt_in == g_max_dynamic_smem.end() || static_cast<size_t>(opt_in->second) < smem_bytes) {
      std::fprintf(stderr,
                   "[moeforge emu] launch with %zu bytes of dynamic shared memory without "
                   "cudaFuncAttributeMaxDynamicSharedMemorySize >= that\n",
                   smem_bytes);
      return set_error(cudaErrorInvalidValue);
    }
  }
  if (stream != nullptr && stream->capturing) {
    stream->captured.push_back([=]() { return run_launch(grid, block, smem_bytes, body); });
    return cudaSuccess;
  }
  return set_error(run_launch(grid, block, smem_bytes, body));
}

cudaError_t enqueue_host_work(cudaStream_t stream, std::function<cudaError_t()> work) {
  if (stream != nullptr && stream->capturing) {
    stream->captured.push_back(std::move(work));
    return cudaSuccess;
  }
  return set_error(work());
}

}  // namespace moeforge::emu

// ---- the CUDA runtime API subset -------------------------------------------------------------
using moeforge::emu::any_capture_active;
using moeforge::emu::g_last_error;
using moeforge::emu::set_error;

namespace {
// Synchronous calls are illegal while any stream captures (global capture mode).
cudaError_t fail_if_capturing() {
  if (!any_capture_active()) return cudaSuccess;
  for (auto* s : moeforge::emu::g_streams) {
    if (s->capturing) s->capture_invalidated = true;
  }
  return set_error(cudaErrorStreamCaptureUnsupported);
}
}  // namespace

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return set_error(cudaErrorInvalidValue);
  if (cudaError_t e = fail_if_capturing()) return e;
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) != 0) {
    return set_error(cudaErrorMemoryAllocation);
  }
  std::memset(p, 0xFF, bytes);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (cudaError_t e = fail_if_capturing()) return e;
  if (bytes > 0 && (dst == nullptr || src == nullptr)) return set_error(cudaErrorInvalidValue);
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (stream != nullptr && stream->capturing) {
    stream->captured.push_back([=]() { return cudaMemcpy(dst, src, bytes, kind); });
    return cudaSuccess;
  }
  return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (cudaError_t e = fail_if_capturing()) return e;
  if (bytes > 0 && dst == nullptr) return set_error(cudaErrorInvalidValue);
  if (bytes > 0) std::memset(dst, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (stream != nullptr && stream->capturing) {
    stream->captured.push_back([=]() { return cudaMemset(dst, value, bytes); });
    return cudaSuccess;
  }
  return cudaMemset(dst, value, bytes);
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  return g_last_error;
}

cudaError_t cudaDeviceSynchronize() {
  if (cudaError_t e = fail_if_capturing()) return e;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (stream != nullptr && stream->capturing) {
    stream->capture_invalidated = true;
    return set_error(cudaErrorStreamCaptureUnsupported);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice);
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  static const bool read_env = [] {
    if (const char* sm = std::getenv("MOEFORGE_EMU_SM")) moeforge::emu::g_sm = std::atoi(sm);
    return true;
  }();
  (void)read_env;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = moeforge::emu::g_sm / 10;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = moeforge::emu::g_sm % 10;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: {
      // An H100's 132, or MOEFORGE_EMU_SM_COUNT: a few SMs give the persistent kernels many
      // tiles per CTA on small problems (their barriers' phases wrap many times).
      const char* sms = std::getenv("MOEFORGE_EMU_SM_COUNT");
      *value = sms != nullptr && std::atoi(sms) > 0 ? std::atoi(sms) : 132;
      return cudaSuccess;
    }
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      return cudaSuccess;
    default:
      return set_error(cudaErrorNotSupported);
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return set_error(cudaErrorInvalidValue);
    moeforge::emu::g_max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* func) {
  if (attributes == nullptr || func == nullptr) return set_error(cudaErrorInvalidValue);
  *attributes = cudaFuncAttributes{};
  attributes->maxThreadsPerBlock = 1024;
  attributes->ptxVersion = attributes->binaryVersion = moeforge::emu::g_sm;
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  *stream = new CUstream_st();
  moeforge::emu::g_streams.push_back(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, 0);
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  auto& all = moeforge::emu::g_streams;
  for (auto it = all.begin(); it != all.end(); ++it) {
    if (*it == stream) {
      all.erase(it);
      delete stream;
      return cudaSuccess;
    }
  }
  return set_error(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  // The legacy default stream cannot be captured.
  if (stream == nullptr) return set_error(cudaErrorStreamCaptureUnsupported);
  if (stream->capturing) return set_error(cudaErrorIllegalState);
  stream->capturing = true;
  stream->capture_invalidated = false;
  stream->captured.clear();
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (stream == nullptr || !stream->capturing) return set_error(cudaErrorIllegalState);
  stream->capturing = false;
  if (stream->capture_invalidated) {
    *graph = nullptr;
    return set_error(cudaErrorStreamCaptureInvalidated);
  }
  *graph = new CUgraph_st{std::move(stream->captured)};
  stream->captured.clear();
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (graph == nullptr) return set_error(cudaErrorInvalidValue);
  *exec = new CUgraphExec_st{graph->nodes};
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  for (auto& node : exec->nodes) {
    if (cudaError_t e = node()) return set_error(e);
  }
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState:
      return "cudaErrorIllegalState";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    default:
      return "cudaError (other)";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulator: a kernel fault, see stderr)";
    default:
      return cudaGetErrorName(e);
  }
}
