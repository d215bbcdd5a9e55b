// GoogleTest for kernels/sm90/grouped_gemm_sm90.cu (stages S1-S2 of docs/hopper-gemm-plan.md):
// the wgmma grouped GEMM against a float64 host reference, in an order that isolates its pieces
// on a first GPU run — one tile of one k block (descriptors, swizzle, accumulator map), a long k
// loop (the pipeline), many tiles (the persistent schedule), then unpadded expert segments with
// empty experts, tails of every size, k / n tails and padded leading dimensions, corrupt offsets
// and determinism; then the row gather, bitwise against the dense kernel on permuted rows. Outputs
// start as NaN bytes (0xFF): rows of no expert must keep them. A mismatch prints where it is within
// its 128 x 128 tile and what it looks like (a value that belongs to another column of the same
// 8-column group points at the swizzle or the descriptor; to row +- 8, at the accumulator map).
// Every launching case skips without an sm_90 GPU and a build that holds the kernel; the argument
// checks run everywhere; the host kernel emulator runs every case with wgmma emulated from the
// documented operand layout (kernels/sm90/grouped_gemm_sm90.cu).
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
#include "moeforge/kernels/swiglu.h"
#include "sm90_test_utils.h"

namespace moeforge::testing {
namespace {

using bf16 = __nv_bfloat16;

struct Case {
  std::string what;
  std::vector<int32_t> offsets;  // [E + 1], taken as given
  int64_t rows, k, n;
  int64_t pad_x = 0, pad_w = 0, pad_y = 0;
  bool w_mn_major = false;  // w stored [E, k, n + pad_w] instead of [E, n, k + pad_w]
  bool gpt_oss = false;     // with SwiGLU: gpt-oss's interleaved, clamped variant
  // Every expert reads one weight (w_stride_e = 0): no TMA tensor map describes it, so the
  // warp-specialised pipelines run the overlapped one.
  bool shared_weight = false;

  int64_t ldw() const { return (w_mn_major ? n : k) + pad_w; }
  int64_t w_stride_e() const { return shared_weight ? 0 : (w_mn_major ? k : n) * ldw(); }
  int64_t w_elements(int64_t experts) const {
    return (shared_weight ? 1 : experts) * (w_mn_major ? k : n) * ldw();
  }
  // Element (j, q) of W_e (output column j, reduction index q) in the stored weight.
  int64_t w_index(int64_t e, int64_t j, int64_t q) const {
    return e * w_stride_e() + (w_mn_major ? q * ldw() + j : j * ldw() + q);
  }
};

// LoRA's epilogue operands: u [rows, rank] (row stride ld_u) and M [E, rank, n] (row stride
// ld_m, expert stride rank ld_m), scaled by `scale`.
struct Lora {
  int64_t rank = 0, ld_u = 0, ld_m = 0;
  float scale = 1.0f;
  std::vector<bf16> u, m;
};

// Points args at LoRA's operands, uploaded into u / m.
void set_lora(kernels::GroupedGemmSm90Args& args, const Lora& lora, DeviceBuffer<bf16>& u,
              DeviceBuffer<bf16>& m) {
  args.lora_u = u.data();
  args.ld_lora_u = lora.ld_u;
  args.lora_rank = lora.rank;
  args.lora_m = m.data();
  args.ld_lora_m = lora.ld_m;
  args.lora_m_stride_e = lora.rank * lora.ld_m;
  args.lora_scale = lora.scale;
}

// The first few mismatches, each with its place in the 128 x 128 tile and a hint of its cause.
void report(const std::vector<double>& got, const std::vector<double>& ref,
            const std::vector<double>& tol, int64_t row0, int64_t rows, int64_t n, int64_t ldy,
            int64_t r, int64_t c) {
  const auto at = [&](int64_t rr, int64_t cc) { return ref[rr * ldy + cc]; };
  const double g = got[r * ldy + c];
  std::string hint;
  for (int64_t dc = -7; dc <= 7 && hint.empty(); ++dc) {
    const int64_t cc = c + dc;
    if (dc != 0 && cc >= 0 && cc < n && std::abs(at(r, cc) - g) <= tol[r * ldy + c]) {
      hint = "equals the reference at column " + std::to_string(cc) + " (swizzle / descriptor?)";
    }
  }
  for (const int64_t dr : {-8, 8, -16, 16, -64, 64}) {
    const int64_t rr = r + dr;
    if (hint.empty() && rr >= row0 && rr < row0 + rows &&
        std::abs(at(rr, c) - g) <= tol[r * ldy + c]) {
      hint = "equals the reference at row " + std::to_string(rr) + " (accumulator map?)";
    }
  }
  ADD_FAILURE() << "y[" << r << ", " << c << "] (tile row " << (r - row0) % 128 << ", tile col "
                << c % 128 << "): got " << g << ", want " << at(r, c) << " +- " << tol[r * ldy + c]
                << (hint.empty() ? "" : "; " + hint);
}

// y (and, when glu is given, the SwiGLU epilogue's a [rows, n / 2] into *glu, and swiglu's own a
// from y into *swiglu_of_y), every output NaN-poisoned first.
// With bias ([E, n + 8]: rows padded), the bias in the epilogue; with lora, LoRA's up-projection.
std::vector<bf16> run(const Case& c, const std::vector<int32_t>& offsets,
                      const std::vector<bf16>& x, const std::vector<bf16>& w,
                      std::vector<bf16>* glu = nullptr, std::vector<bf16>* swiglu_of_y = nullptr,
                      const Lora* lora = nullptr, const std::vector<bf16>* bias = nullptr) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t ldx = c.k + c.pad_x, ldy = c.n + c.pad_y;
  DeviceBuffer<bf16> d_x(x), d_w(w), d_y(c.rows * ldy);
  DeviceBuffer<bf16> d_u(lora ? lora->u : std::vector<bf16>(1)),
      d_m(lora ? lora->m : std::vector<bf16>(1));
  DeviceBuffer<bf16> d_a(glu ? c.rows * c.n / 2 : 1), d_swiglu(glu ? c.rows * c.n / 2 : 1);
  DeviceBuffer<bf16> d_bias(bias ? *bias : std::vector<bf16>(1));
  DeviceBuffer<int32_t> d_off(offsets);
  d_y.poison(0xFF);
  d_a.poison(0xFF);
  kernels::GroupedGemmSm90Args args;
  args.x = d_x.data();
  args.ldx = ldx;
  args.w = d_w.data();
  args.ldw = c.ldw();
  args.w_stride_e = c.w_stride_e();
  args.w_mn_major = c.w_mn_major;
  args.y = d_y.data();
  args.ldy = ldy;
  args.expert_offsets = d_off.data();
  args.num_rows = c.rows;
  args.k = c.k;
  args.n = c.n;
  args.num_experts = E;
  if (glu != nullptr) {
    args.a = d_a.data();
    args.lda = c.n / 2;
    args.glu = c.gpt_oss ? kernels::GluVariant::kGptOss : kernels::GluVariant::kSilu;
    if (c.gpt_oss) {  // not the defaults, and a limit that clamps some of the values
      args.glu_alpha = 1.5f;
      args.glu_limit = 1.25f;
    }
  }
  if (lora != nullptr) set_lora(args, *lora, d_u, d_m);
  if (bias != nullptr) {
    args.bias = d_bias.data();
    args.bias_stride_e = c.n + 8;
  }
  args.pipeline = g_pipeline;
  // The warp-specialised pipelines read the weight through TMA wherever a tensor map can
  // describe it (else they run kOverlapped): every case but k = 0 and a shared weight.
  EXPECT_EQ(kernels::grouped_gemm_sm90_weight_via_tma(args), c.k > 0 && !c.shared_weight);
  EXPECT_EQ(kernels::launch_grouped_gemm_sm90(args, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (glu != nullptr) {
    *glu = d_a.download();
    EXPECT_EQ(ldy, c.n) << "swiglu reads h with rows of 2I";
    EXPECT_EQ(kernels::launch_swiglu<bf16>(d_y.data(), d_swiglu.data(), c.rows, c.n / 2, args.glu,
                                           args.glu_alpha, args.glu_limit, nullptr),
              cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    *swiglu_of_y = d_swiglu.download();
  }
  return d_y.download();
}

// y against float64; with glu also the epilogue's a: bitwise swiglu(y) on the routed rows (the
// swiglu kernel run on the same device), untouched (NaN bytes) on the others.
void check_case(const Case& c, uint32_t seed, bool glu = false) {
  SCOPED_TRACE(c.what);
  const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1;
  const int64_t ldx = c.k + c.pad_x, ldy = c.n + c.pad_y;
  const std::vector<bf16> x = random_bf16(c.rows * ldx, seed, 1.0);
  const std::vector<bf16> w = random_bf16(c.w_elements(E), seed + 1, 1.0 / std::sqrt(c.k + 1.0));
  std::vector<bf16> a, swiglu_of_y;
  const std::vector<bf16> y =
      run(c, c.offsets, x, w, glu ? &a : nullptr, glu ? &swiglu_of_y : nullptr);
  const std::vector<int64_t> m = clamped_bounds(c.offsets, c.rows);
  if (glu) {
    const int64_t inter = c.n / 2;
    int mismatches = 0;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        uint16_t got, want = 0xFFFF;
        std::memcpy(&got, &a[r * inter + j], 2);
        if (r < m[E]) std::memcpy(&want, &swiglu_of_y[r * inter + j], 2);
        if (got != want && mismatches++ < 6) {
          ADD_FAILURE() << "a[" << r << ", " << j << "]: got bits " << got << ", want " << want
                        << (r < m[E] ? " (swiglu of y)" : " (row of no expert: untouched)");
        }
      }
    }
  }
  std::vector<double> got(c.rows * ldy, 0), ref(c.rows * ldy, 0), tol(c.rows * ldy, 0);
  int bad = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = m[e]; r < m[e + 1]; ++r) {
      for (int64_t j = 0; j < c.n; ++j) {
        double acc = 0, mag = 0;
        for (int64_t q = 0; q < c.k; ++q) {
          const double p = static_cast<double>(__bfloat162float(x[r * ldx + q])) *
                           __bfloat162float(w[c.w_index(e, j, q)]);
          acc += p;
          mag += std::abs(p);
        }
        ref[r * ldy + j] = acc;
        // bf16 rounding of the result + fp32 accumulation over k terms (twice for slack).
        tol[r * ldy + j] = unit_roundoff<bf16>() * std::abs(acc) +
                           2.0 * static_cast<double>(c.k) * std::ldexp(1.0, -24) * mag + 1e-30;
        got[r * ldy + j] = __bfloat162float(y[r * ldy + j]);
      }
    }
  }
  for (int64_t e = 0; e < E && bad < 6; ++e) {
    for (int64_t r = m[e]; r < m[e + 1] && bad < 6; ++r) {
      for (int64_t j = 0; j < c.n && bad < 6; ++j) {
        const double g = got[r * ldy + j];
        if (!(std::abs(g - ref[r * ldy + j]) <= tol[r * ldy + j])) {
          const int64_t tile_row0 = m[e] + ((r - m[e]) / 128) * 128;
          report(got, ref, tol, tile_row0, std::min<int64_t>(128, m[e + 1] - tile_row0), c.n, ldy,
                 r, j);
          ++bad;
        }
      }
    }
  }
  // Rows of no expert and the padding columns keep their NaN bytes.
  uint16_t nan_bits;
  std::memset(&nan_bits, 0xFF, sizeof(nan_bits));
  for (int64_t r = 0; r < c.rows; ++r) {
    const bool routed = r < m[E];
    for (int64_t j = routed ? c.n : 0; j < ldy; ++j) {
      uint16_t bits;
      std::memcpy(&bits, &y[r * ldy + j], sizeof(bits));
      if (bits != nan_bits && bad++ < 6) {
        ADD_FAILURE() << "y[" << r << ", " << j << "] was written (row of no expert or padding)";
      }
    }
  }
}

class GroupedGemmSm90 : public Sm90PipelineTest {};
// The row-grouped kernel has all four pipelines (the wide one runs the LoRA cases on 128-column
// tiles).
MOEFORGE_INSTANTIATE_FOR_PIPELINES(GroupedGemmSm90, kernels::Sm90Pipeline::kSerial,
                                   kernels::Sm90Pipeline::kOverlapped,
                                   kernels::Sm90Pipeline::kWarpSpecialized,
                                   kernels::Sm90Pipeline::kWarpSpecializedWide);

TEST_P(GroupedGemmSm90, OneTileOneKBlock) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"128 x 128, k = 64", {0, 128}, 128, 64, 128}, 1);
}

TEST_P(GroupedGemmSm90, LongKLoop) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"k = 1024", {0, 128}, 128, 1024, 128}, 2);
  check_case({"k = 128 (two blocks, one stage ahead)", {0, 128}, 128, 128, 128}, 3);
}

TEST_P(GroupedGemmSm90, ManyTilesOneExpert) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"1000 rows, n = 384", {0, 1000}, 1000, 256, 384}, 4);
  // 32 x 8 = 256 tiles: more than the persistent grid (one CTA per SM, <= 132), so CTAs run a
  // second tile (re-zeroed accumulators, stages refilled after the previous tile read them); on
  // 128 x 256 tiles 128, a second tile only in the emulator's 4-SM run (tests/emu).
  check_case({"256 tiles, CTAs run several", {0, 4096}, 4096, 64, 1024}, 14);
}

TEST_P(GroupedGemmSm90, EmptyKGivesZeros) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"k = 0", {0, 50, 90}, 100, 0, 64}, 15);
}

TEST_P(GroupedGemmSm90, SharedWeightWithoutTma) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  Case c{"E = 4 sharing W (w_stride_e = 0)", {0, 100, 100, 260, 300}, 300, 136, 200};
  c.shared_weight = true;
  check_case(c, 18);
  c.w_mn_major = true;
  c.what = "E = 4 sharing an MN-major W";
  check_case(c, 19);
}

TEST_P(GroupedGemmSm90, ManyExperts) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"E = 1023", random_offsets(1023, 6000, 16, 9), 6000, 64, 128}, 16);
  check_case({"E = 1024", random_offsets(1024, 3000, 17, 0), 3000, 64, 64}, 17);
}

TEST_P(GroupedGemmSm90, UnpaddedExpertsAndTails) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"empty experts, tails", {0, 0, 1, 129, 129, 300, 427, 427}, 440, 128, 256}, 5);
  check_case({"k and n tails, padded strides", {0, 37, 37, 200}, 210, 72, 136, 8, 16, 24}, 6);
  check_case({"E = 32 random", random_offsets(32, 3000, 7, 13), 3000, 512, 256}, 7);
  check_case({"E = 1", {0, 5}, 5, 64, 8}, 8);
}

TEST_P(GroupedGemmSm90, CorruptOffsetsReadClamped) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"negative, decreasing, past the rows", {9, 40, -3, 90, 20, 500}, 100, 64, 128}, 9);
}

TEST_P(GroupedGemmSm90, QwenLikeShapes) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"E = 16, k = 2048, n = 256", random_offsets(16, 2048, 10, 0), 2048, 2048, 256}, 10);
}

TEST_P(GroupedGemmSm90, Deterministic) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  const Case c{"determinism", random_offsets(8, 1500, 11, 5), 1500, 320, 256};
  const std::vector<bf16> x = random_bf16(c.rows * c.k, 12, 1.0);
  const std::vector<bf16> w = random_bf16(8 * c.n * c.k, 13, 0.05);
  const std::vector<bf16> a = run(c, c.offsets, x, w), b = run(c, c.offsets, x, w);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(bf16)), 0);
  // The pipelines differ in when MMAs retire, not in what they add: bitwise the same results.
  const kernels::Sm90Pipeline mine = g_pipeline;
  g_pipeline = other_pipeline(mine);
  const std::vector<bf16> other = run(c, c.offsets, x, w);
  g_pipeline = mine;
  EXPECT_EQ(std::memcmp(a.data(), other.data(), a.size() * sizeof(bf16)), 0);
}

// y from x [x_rows, k] (token-major through sorted_pairs when given), NaN-poisoned first.
std::vector<bf16> run_rows(const std::vector<bf16>& x, int64_t x_rows, const std::vector<bf16>& w,
                           const std::vector<int32_t>& offsets, int64_t num_rows, int64_t k,
                           int64_t n, const std::vector<int32_t>* sorted_pairs, int64_t top_k,
                           bool w_mn_major = false, const Lora* lora = nullptr) {
  DeviceBuffer<bf16> d_x(x), d_w(w), d_y(num_rows * n);
  DeviceBuffer<bf16> d_u(lora ? lora->u : std::vector<bf16>(1)),
      d_m(lora ? lora->m : std::vector<bf16>(1));
  DeviceBuffer<int32_t> d_off(offsets);
  DeviceBuffer<int32_t> d_pairs(sorted_pairs ? *sorted_pairs : std::vector<int32_t>(1, 0));
  d_y.poison(0xFF);
  kernels::GroupedGemmSm90Args args;
  args.x = d_x.data();
  args.ldx = k;
  args.ldw = w_mn_major ? n : k;  // w is [E, k, n] or [E, n, k], dense either way
  args.w_mn_major = w_mn_major;
  args.w = d_w.data();
  args.w_stride_e = n * k;
  args.y = d_y.data();
  args.ldy = n;
  args.expert_offsets = d_off.data();
  args.num_rows = num_rows;
  args.k = k;
  args.n = n;
  args.num_experts = static_cast<int64_t>(offsets.size()) - 1;
  if (sorted_pairs != nullptr) {
    args.sorted_pairs = d_pairs.data();
    args.num_tokens = x_rows;
    args.top_k = top_k;
  }
  if (lora != nullptr) set_lora(args, *lora, d_u, d_m);
  args.pipeline = g_pipeline;
  EXPECT_EQ(kernels::launch_grouped_gemm_sm90(args, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d_y.download();
}

TEST_P(GroupedGemmSm90, GatherEqualsDenseOnGatheredRows) {
  // The permute fused into the A load: the same tiles and k order as the dense kernel on the
  // rows permute would write (zero for a corrupt pair), so the results are bitwise equal.
  MOEFORGE_SKIP_WITHOUT_SM90();
  const int64_t T = 300, K = 4, S = T * K, k = 192, n = 256;
  const std::vector<int32_t> offsets = random_offsets(9, S, 21, 40);  // 40 dropped rows last
  std::vector<int32_t> pairs(S);
  for (int64_t i = 0; i < S; ++i) pairs[i] = static_cast<int32_t>(i);
  std::shuffle(pairs.begin(), pairs.end(), std::mt19937(22));
  pairs[5] = -3;                              // corrupt: a zero row
  pairs[700] = static_cast<int32_t>(S + 11);  // corrupt: a zero row
  const std::vector<bf16> x = random_bf16(T * k, 23, 1.0);
  const std::vector<bf16> w = random_bf16(9 * n * k, 24, 0.07);
  std::vector<bf16> rows(S * k, __float2bfloat16(0.0f));
  for (int64_t r = 0; r < S; ++r) {
    const int64_t p = pairs[r];
    if (p >= 0 && p < S) std::copy_n(x.begin() + (p / K) * k, k, rows.begin() + r * k);
  }
  for (const bool mn_major : {false, true}) {  // the same w buffer read as [E, n, k] / [E, k, n]
    SCOPED_TRACE(mn_major ? "MN-major weight" : "K-major weight");
    const std::vector<bf16> gathered = run_rows(x, T, w, offsets, S, k, n, &pairs, K, mn_major);
    const std::vector<bf16> dense = run_rows(rows, S, w, offsets, S, k, n, nullptr, 1, mn_major);
    EXPECT_EQ(std::memcmp(gathered.data(), dense.data(), dense.size() * sizeof(bf16)), 0);
  }
  // The dense kernel on these shapes against float64 (random rows of its own).
  check_case({"the gather test's shapes, dense", offsets, S, k, n}, 25);
}

TEST_P(GroupedGemmSm90, SwigluEpilogue) {
  // h = x W_gu^T over gate and up rows, and a = silu(h_gate) h_up from the rounded h: the same
  // h as the plain kernel (float64 check) and bitwise swiglu(h).
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case({"I = 64, one tile", {0, 128}, 128, 64, 128}, 30, true);
  check_case({"I = 200: a partial intermediate tile", {0, 50, 50, 300}, 310, 128, 400}, 31, true);
  check_case({"E = 12 random, I = 768 (Qwen3)", random_offsets(12, 900, 32, 7), 900, 256, 1536}, 33,
             true);
}

// The weight stored [E, k, n] (W_e^T row-major: gpt-oss's [E, in, out] in the forward, HF's
// [E, out, in] in grad_x), read through the MN-major B layout (two 64-column blocks per tile) and
// the instruction's transpose-B; a value from another 64-column block or k atom points at the
// descriptor's leading / stride offsets.
Case mn_major(Case c) {
  c.w_mn_major = true;
  return c;
}

TEST_P(GroupedGemmSm90, MnMajorWeights) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case(mn_major({"MN-major, one tile", {0, 128}, 128, 64, 128}), 40);
  check_case(mn_major({"MN-major, k = 1024", {0, 128}, 128, 1024, 128}), 41);
  check_case(
      mn_major({"MN-major, tails, padded strides", {0, 37, 37, 200}, 210, 72, 136, 8, 16, 24}), 42);
  check_case(mn_major({"MN-major, E = 32 random", random_offsets(32, 3000, 7, 13), 3000, 512, 256}),
             43);
  // 16 x 9 = 144 tiles, more than the persistent grid (132 CTAs on an H100): CTAs run a second
  // MN-major tile (on 128 x 256 tiles 80: in the emulator's 4-SM run).
  check_case(mn_major({"MN-major, 144 tiles", {0, 2048}, 2048, 64, 1152}), 48);
  check_case(mn_major({"MN-major, corrupt offsets", {9, 40, -3, 90, 20, 500}, 100, 64, 128}), 44);
  // Qwen3's grad_x of gate_up reduces over k = 2I = 1536 (24 k blocks); n = 384 keeps the
  // emulator's run short (a GPU would take H = 2048 as easily).
  check_case(mn_major({"MN-major, Qwen3's k", random_offsets(4, 256, 10, 0), 256, 1536, 384}), 45);
}

TEST_P(GroupedGemmSm90, MnMajorSwigluEpilogue) {
  // With SwiGLU, the MN-major tile's first block holds gate columns n0.., the second the matching
  // up columns I + n0..
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case(mn_major({"MN-major, I = 64, one tile", {0, 128}, 128, 64, 128}), 46, true);
  check_case(mn_major({"MN-major, I = 200", {0, 50, 50, 300}, 310, 128, 400}), 47, true);
}

// count bf16 values, nonzero multiples of 1/8 in [-2, 2]: a sum of up to 64 products of two of
// them is a multiple of 1/64 below 256 in magnitude, exact in fp32 in any order.
std::vector<bf16> coarse_bf16(int64_t count, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-16, 15);
  std::vector<bf16> v(count);
  for (auto& x : v) {
    const int q = dist(gen);
    x = __float2bfloat16(static_cast<float>(q >= 0 ? q + 1 : q) / 8.0f);
  }
  return v;
}

// LoRA operands for c (u's rows and M's rows padded by 8 and 16 values) with exact rank sums.
Lora make_lora(const Case& c, int64_t num_experts, int64_t rank, float scale, uint32_t seed) {
  Lora lora;
  lora.rank = rank;
  lora.ld_u = rank + 8;
  lora.ld_m = c.n + 16;
  lora.scale = scale;
  lora.u = coarse_bf16(c.rows * lora.ld_u, seed);
  lora.m = coarse_bf16(num_experts * rank * lora.ld_m, seed + 1);
  return lora;
}

// The epilogue's bias and LoRA against their rules, bit for bit: y = round(fma(scale, u_r M_e,
// round(y0 + b_e))) with y0 the kernel's result without them (checked against float64 by the
// cases above), b_e the bias (0 without one; with_bias) and the rank sum exact (coarse values;
// none for rank 0); rows of no expert untouched; with SwiGLU, a bitwise swiglu(y).
void check_epilogue_case(const Case& c, int64_t rank, float scale, uint32_t seed, bool glu = false,
                         bool with_bias = false) {
  SCOPED_TRACE(c.what + ", rank " + std::to_string(rank) + (with_bias ? ", bias" : ""));
  const int64_t E = static_cast<int64_t>(c.offsets.size()) - 1;
  const int64_t ldx = c.k + c.pad_x, ldy = c.n + c.pad_y;
  const std::vector<bf16> x = random_bf16(c.rows * ldx, seed, 1.0);
  const std::vector<bf16> w = random_bf16(c.w_elements(E), seed + 1, 1.0 / std::sqrt(c.k + 1.0));
  const Lora lora = make_lora(c, E, rank, scale, seed + 2);
  const std::vector<bf16> bias = random_bf16(E * (c.n + 8), seed + 3, 1.0);
  std::vector<bf16> a0, a0_ref, a, swiglu_of_y;
  const std::vector<bf16> y0 =
      run(c, c.offsets, x, w, glu ? &a0 : nullptr, glu ? &a0_ref : nullptr);
  const std::vector<bf16> y =
      run(c, c.offsets, x, w, glu ? &a : nullptr, glu ? &swiglu_of_y : nullptr,
          rank > 0 ? &lora : nullptr, with_bias ? &bias : nullptr);
  const std::vector<int64_t> m = clamped_bounds(c.offsets, c.rows);
  const auto bits = [](bf16 v) {
    uint16_t b;
    std::memcpy(&b, &v, sizeof(b));
    return b;
  };
  int bad = 0;
  for (int64_t e = 0; e <= E; ++e) {  // e = E: the rows of no expert
    for (int64_t r = e == 0 ? 0 : m[e]; r < (e < E ? m[e + 1] : c.rows); ++r) {
      for (int64_t j = 0; j < ldy; ++j) {
        uint16_t want = 0xFFFF;  // rows of no expert and padding columns: untouched
        if (e < E && j < c.n) {
          double exact = 0;
          for (int64_t q = 0; q < rank; ++q) {
            exact += static_cast<double>(__bfloat162float(lora.u[r * lora.ld_u + q])) *
                     __bfloat162float(lora.m[(e * rank + q) * lora.ld_m + j]);
          }
          float base = __bfloat162float(y0[r * ldy + j]);
          if (with_bias) {
            base = __bfloat162float(
                __float2bfloat16_rn(base + __bfloat162float(bias[e * (c.n + 8) + j])));
          }
          want =
              bits(rank > 0 ? __float2bfloat16_rn(std::fmaf(scale, static_cast<float>(exact), base))
                            : __float2bfloat16_rn(base));
        }
        if (bits(y[r * ldy + j]) != want && bad++ < 6) {
          ADD_FAILURE() << "y[" << r << ", " << j << "] (tile row " << (r - m[std::min(e, E)]) % 128
                        << ", tile col " << j % 128 << "): got bits " << bits(y[r * ldy + j])
                        << ", want " << want << " (y0 " << __bfloat162float(y0[r * ldy + j]) << ")";
        }
      }
    }
  }
  if (glu) {
    const int64_t inter = c.n / 2;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        const uint16_t want = r < m[E] ? bits(swiglu_of_y[r * inter + j]) : 0xFFFF;
        if (bits(a[r * inter + j]) != want && bad++ < 12) {
          ADD_FAILURE() << "a[" << r << ", " << j << "]: got bits " << bits(a[r * inter + j])
                        << ", want " << want << (r < m[E] ? " (swiglu of y)" : " (untouched)");
        }
      }
    }
  }
}

TEST_P(GroupedGemmSm90, LoraEpilogue) {
  // out = round(fma(s, u M_e, round(x W_e^T))): lora_expand_add_'s rule in the epilogue.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_epilogue_case({"one tile", {0, 128}, 128, 64, 128}, 16, 2.0f, 50);
  check_epilogue_case({"empty experts, tails", {0, 0, 1, 129, 129, 300, 427, 427}, 440, 128, 256},
                      8, 0.37f, 51);
  check_epilogue_case({"k and n tails, padded strides", {0, 37, 37, 200}, 210, 72, 136, 8, 16, 24},
                      40, 1.5f, 52);
  check_epilogue_case({"corrupt offsets", {9, 40, -3, 90, 20, 500}, 100, 64, 128}, 64, 0.25f, 53);
  check_epilogue_case({"k = 0: y = s u M_e", {0, 50, 90}, 100, 0, 64}, 16, 0.5f, 54);
  // 16 x 9 = 144 tiles, more than the persistent grid: CTAs reload LoRA's tiles for a second
  // tile once both warpgroups' MMAs of the first have read them.
  check_epilogue_case(mn_major({"MN-major, 144 tiles", {0, 2048}, 2048, 64, 1152}), 16, 2.0f, 55);
  check_epilogue_case(
      mn_major({"MN-major, E = 6 random", random_offsets(6, 700, 56, 9), 700, 128, 256}), 24, 0.37f,
      57);
}

TEST_P(GroupedGemmSm90, LoraSwigluEpilogue) {
  // h = round(fma(s, u M_e, round(x W_gu^T))) over gate and up columns, a = swiglu(h) bitwise.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_epilogue_case({"I = 200: a partial intermediate tile", {0, 50, 50, 300}, 310, 128, 400}, 16,
                      0.37f, 60, true);
  check_epilogue_case(mn_major({"MN-major, I = 64", {0, 128}, 128, 64, 128}), 32, 2.0f, 61, true);
  // 16 x 9 = 144 tiles of 3 k blocks: K-major CTAs reload LoRA's tiles for a second tile.
  check_epilogue_case({"K-major, 144 tiles, I = 576", {0, 2048}, 2048, 192, 1152}, 56, 0.37f, 62,
                      true);
}

TEST_P(GroupedGemmSm90, BiasEpilogue) {
  // y = round(round(x W_e^T) + b_e): grouped_mm's bias pass, in the epilogue; then LoRA's add.
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_epilogue_case({"tails, empty experts", {0, 0, 1, 129, 129, 300, 427, 427}, 440, 128, 136},
                      0, 1.0f, 70, false, true);
  check_epilogue_case(
      mn_major({"MN-major, corrupt offsets", {9, 40, -3, 90, 20, 500}, 100, 64, 128}), 0, 1.0f, 71,
      false, true);
  check_epilogue_case({"with LoRA", {0, 37, 37, 200}, 210, 72, 136, 8, 16, 24}, 16, 0.37f, 72,
                      false, true);
  check_epilogue_case({"SwiGLU halves, I = 200", {0, 50, 50, 300}, 310, 128, 400}, 0, 1.0f, 73,
                      true, true);
}

// gpt-oss's gate_up: [E, H, 2I] read MN-major, h's columns (2j, 2j + 1) the pair (gate, up) of a's
// column j, clamped (limit 1.25 here) with sigmoid(alpha gate) (alpha 1.5 here).
Case gpt_oss(Case c) {
  c.w_mn_major = true;
  c.gpt_oss = true;
  return c;
}

TEST_P(GroupedGemmSm90, GptOssSwigluEpilogue) {
  MOEFORGE_SKIP_WITHOUT_SM90();
  check_case(gpt_oss({"gpt-oss, one tile", {0, 128}, 128, 64, 128}), 80, true);
  check_case(gpt_oss({"gpt-oss, I = 200, tails", {0, 50, 50, 300}, 310, 128, 400}), 81, true);
  // gpt-oss-20b's 2I = 5760 is 45 tiles of 128 columns; 2I = 720 keeps the emulator short.
  check_case(gpt_oss({"gpt-oss, E = 8 random", random_offsets(8, 600, 82, 9), 600, 192, 720}), 83,
             true);
  // The interleaved activation with a K-major weight ([E, 2I, H]: gpt-oss's activation, HF's
  // layout): the same plain tile mapping through the other B loader.
  Case k_major = gpt_oss({"gpt-oss activation, K-major weight", {0, 50, 50, 300}, 310, 128, 400});
  k_major.w_mn_major = false;
  check_case(k_major, 85, true);
  // gpt-oss's gate_up has a bias and may carry an adapter: both before the activation.
  check_epilogue_case(gpt_oss({"gpt-oss, bias and LoRA", {0, 37, 37, 200}, 210, 64, 400}), 16, 0.5f,
                      84, true, true);
}

TEST_P(GroupedGemmSm90, LoraWithGatheredRows) {
  // u is in expert order while x is read through the plan: bitwise the dense kernel on the
  // gathered rows with the same LoRA operands.
  MOEFORGE_SKIP_WITHOUT_SM90();
  const int64_t T = 200, K = 2, S = T * K, k = 128, n = 256;
  const std::vector<int32_t> offsets = random_offsets(5, S, 62, 20);
  std::vector<int32_t> pairs(S);
  for (int64_t i = 0; i < S; ++i) pairs[i] = static_cast<int32_t>(i);
  std::shuffle(pairs.begin(), pairs.end(), std::mt19937(63));
  const std::vector<bf16> x = random_bf16(T * k, 64, 1.0);
  const std::vector<bf16> w = random_bf16(5 * n * k, 65, 0.08);
  std::vector<bf16> rows(S * k);
  for (int64_t r = 0; r < S; ++r)
    std::copy_n(x.begin() + (pairs[r] / K) * k, k, rows.begin() + r * k);
  const Lora lora = make_lora({"", offsets, S, k, n}, 5, 16, 0.37f, 66);
  const std::vector<bf16> gathered = run_rows(x, T, w, offsets, S, k, n, &pairs, K, false, &lora);
  const std::vector<bf16> dense = run_rows(rows, S, w, offsets, S, k, n, nullptr, 1, false, &lora);
  EXPECT_EQ(std::memcmp(gathered.data(), dense.data(), dense.size() * sizeof(bf16)), 0);
}

TEST(GroupedGemmSm90Arguments, RejectsBadArguments) {
  kernels::GroupedGemmSm90Args ok;
  ok.x = reinterpret_cast<const bf16*>(uintptr_t{256});
  ok.w = reinterpret_cast<const bf16*>(uintptr_t{256});
  ok.y = reinterpret_cast<bf16*>(uintptr_t{256});
  ok.expert_offsets = reinterpret_cast<const int32_t*>(uintptr_t{256});
  ok.num_rows = 16;
  ok.k = ok.ldx = ok.ldw = 64;
  ok.n = ok.ldy = 64;
  ok.w_stride_e = 64 * 64;
  ok.num_experts = 2;
  EXPECT_TRUE(kernels::grouped_gemm_sm90_args_valid(ok));
  auto bad = [&](auto mutate) {
    kernels::GroupedGemmSm90Args a = ok;
    mutate(a);
    EXPECT_FALSE(kernels::grouped_gemm_sm90_args_valid(a));
    EXPECT_EQ(kernels::launch_grouped_gemm_sm90(a, nullptr), cudaErrorInvalidValue);
  };
  bad([](auto& a) { a.k = 60; });
  bad([](auto& a) { a.n = 12; });
  bad([](auto& a) { a.ldy = 56; });
  bad([](auto& a) { a.n = a.ldy = kernels::kGroupedGemmSm90MaxN + 8; });
  bad([](auto& a) { a.num_experts = 0; });
  bad([](auto& a) { a.num_experts = kernels::kGroupedGemmSm90MaxExperts + 1; });
  bad([](auto& a) { a.x = reinterpret_cast<const bf16*>(uintptr_t{258}); });
  bad([](auto& a) { a.expert_offsets = nullptr; });
  bad([](auto& a) { a.num_rows = -1; });
  bad([](auto& a) { a.pipeline = static_cast<kernels::Sm90Pipeline>(4); });
  bad([](auto& a) {  // MN-major: a row of W_e^T holds n values
    a.w_mn_major = true;
    a.n = a.ldy = 128;
  });
  bad([](auto& a) {  // SwiGLU needs n / 2 a multiple of 8
    a.a = reinterpret_cast<bf16*>(uintptr_t{256});
    a.n = a.ldy = 72;
    a.lda = 40;
  });
  bad([](auto& a) {
    a.sorted_pairs = reinterpret_cast<const int32_t*>(uintptr_t{256});
    a.top_k = 0;
  });
  kernels::GroupedGemmSm90Args with_lora = ok;
  with_lora.lora_u = reinterpret_cast<const bf16*>(uintptr_t{256});
  with_lora.lora_m = reinterpret_cast<const bf16*>(uintptr_t{256});
  with_lora.lora_rank = with_lora.ld_lora_u = 16;
  with_lora.ld_lora_m = 64;
  with_lora.lora_m_stride_e = 16 * 64;
  EXPECT_TRUE(kernels::grouped_gemm_sm90_args_valid(with_lora));
  auto bad_lora = [&](auto mutate) {
    kernels::GroupedGemmSm90Args a = with_lora;
    mutate(a);
    EXPECT_FALSE(kernels::grouped_gemm_sm90_args_valid(a));
    EXPECT_EQ(kernels::launch_grouped_gemm_sm90(a, nullptr), cudaErrorInvalidValue);
  };
  bad_lora([](auto& a) { a.lora_rank = a.ld_lora_u = 12; });  // not a multiple of 8
  bad_lora([](auto& a) { a.lora_rank = a.ld_lora_u = 72; });  // past one k block
  bad_lora([](auto& a) { a.lora_rank = a.ld_lora_u = 0; });
  bad_lora([](auto& a) { a.ld_lora_u = 8; });   // rows overlap
  bad_lora([](auto& a) { a.ld_lora_m = 56; });  // a row of M_e holds n values
  bad_lora([](auto& a) { a.lora_m_stride_e = 4; });
  bad_lora([](auto& a) { a.lora_m = nullptr; });
  bad_lora([](auto& a) { a.lora_u = reinterpret_cast<const bf16*>(uintptr_t{264}); });
  bad([](auto& a) { a.glu = static_cast<kernels::GluVariant>(2); });
  bad([](auto& a) {  // a bias is read as pairs of 8-aligned rows
    a.bias = reinterpret_cast<const bf16*>(uintptr_t{256});
    a.bias_stride_e = 60;
  });
  bad([](auto& a) { a.bias = reinterpret_cast<const bf16*>(uintptr_t{258}); });
}

}  // namespace
}  // namespace moeforge::testing
