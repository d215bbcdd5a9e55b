// Every moeforge op called through the torch dispatcher, from the same _C.so that Python loads:
// hand-written expectations on CPU tensors, the validation message of a bad input, and (in CUDA
// builds, when a GPU is present at run time) the CUDA kernels against the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using OptTensor = std::optional<Tensor>;

// The typed handle of moeforge::<name>; FuncType is the C++ signature of the op's kernels.
template <typename FuncType>
c10::TypedOperatorHandle<FuncType> op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("moeforge::") + name).c_str(), "")
      .typed<FuncType>();
}

Tensors3 routing(const Tensor& ids, int64_t num_experts) {
  static const auto h = op<Tensors3(const Tensor&, int64_t)>("routing");
  return h.call(ids, num_experts);
}
Tensor permute(const Tensor& x, const Tensor& sorted_pairs, const Tensor& pair_to_row,
               const OptTensor& weights) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>("permute");
  return h.call(x, sorted_pairs, pair_to_row, weights);
}
Tensor combine(const Tensor& y, const Tensor& sorted_pairs, const Tensor& pair_to_row,
               const OptTensor& weights) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>("combine");
  return h.call(y, sorted_pairs, pair_to_row, weights);
}
Tensor routed_dot(const Tensor& rows, const Tensor& tokens, const Tensor& pair_to_row) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("routed_dot");
  return h.call(rows, tokens, pair_to_row);
}
// sorted_pairs / pair_to_row: the optional routing plan through which x is read (token-major x).
Tensor grouped_mm(const Tensor& x, const Tensor& weight, const Tensor& offsets,
                  const OptTensor& bias, bool weight_transposed, const OptTensor& sorted_pairs = {},
                  const OptTensor& pair_to_row = {}) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                  bool, const OptTensor&, const OptTensor&)>("grouped_mm");
  return h.call(x, weight, offsets, bias, weight_transposed, sorted_pairs, pair_to_row);
}
Tensors3 grouped_mm_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                             const Tensor& offsets, bool weight_transposed,
                             std::array<bool, 3> mask, const OptTensor& sorted_pairs = {},
                             const OptTensor& pair_to_row = {}) {
  static const auto h =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                  std::array<bool, 3>, const OptTensor&, const OptTensor&)>("grouped_mm_backward");
  return h.call(grad_out, x, weight, offsets, weight_transposed, mask, sorted_pairs, pair_to_row);
}
Tensor swiglu(const Tensor& h_in, c10::string_view variant, double alpha, double limit) {
  static const auto h = op<Tensor(const Tensor&, c10::string_view, double, double)>("swiglu");
  return h.call(h_in, variant, alpha, limit);
}
Tensor swiglu_backward(const Tensor& grad_a, const Tensor& h_in, c10::string_view variant,
                       double alpha, double limit) {
  static const auto h =
      op<Tensor(const Tensor&, const Tensor&, c10::string_view, double, double)>("swiglu_backward");
  return h.call(grad_a, h_in, variant, alpha, limit);
}
Tensors3 weighted_swiglu_backward(const Tensor& grad_aw, const Tensor& h_in,
                                  const Tensor& row_weights, c10::string_view variant, double alpha,
                                  double limit, bool weighted_act) {
  static const auto h = op<Tensors3(const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                                    double, double, bool)>("weighted_swiglu_backward");
  return h.call(grad_aw, h_in, row_weights, variant, alpha, limit, weighted_act);
}
std::tuple<Tensor, Tensor> expert_lora(const Tensor& x, const Tensor& a, const Tensor& b,
                                       const Tensor& offsets, double scaling,
                                       const OptTensor& sorted_pairs = {},
                                       const OptTensor& pair_to_row = {}) {
  static const auto h =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    double, const OptTensor&, const OptTensor&)>("expert_lora");
  return h.call(x, a, b, offsets, scaling, sorted_pairs, pair_to_row);
}
Tensors3 expert_lora_backward(const Tensor& grad_delta, const Tensor& x, const Tensor& lora_u,
                              const Tensor& a, const Tensor& b, const Tensor& offsets,
                              double scaling, std::array<bool, 3> mask) {
  static const auto h =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                  const Tensor&, double, std::array<bool, 3>, const OptTensor&, const OptTensor&,
                  bool, bool)>("expert_lora_backward");
  return h.call(grad_delta, x, lora_u, a, b, offsets, scaling, mask, {}, {}, true, false);
}
Tensors3 router_loss(at::TensorList logits, const OptTensor& row_mask, int64_t top_k) {
  static const auto h = op<Tensors3(at::TensorList, const OptTensor&, int64_t)>("router_loss");
  return h.call(logits, row_mask, top_k);
}
std::vector<Tensor> router_loss_backward(const Tensor& grad_aux, const Tensor& grad_z,
                                         at::TensorList logits, const OptTensor& row_mask,
                                         const Tensor& counts, int64_t top_k) {
  static const auto h =
      op<std::vector<Tensor>(const Tensor&, const Tensor&, at::TensorList, const OptTensor&,
                             const Tensor&, int64_t)>("router_loss_backward");
  return h.call(grad_aux, grad_z, logits, row_mask, counts, top_k);
}

Tensor ints(std::vector<int32_t> v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kInt));
}
const auto kF64 = at::TensorOptions().dtype(at::kDouble);

// The message of the c10::Error that fn throws ("" and a test failure if it throws none).
template <typename Fn>
std::string error_message(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.msg();
  }
  ADD_FAILURE() << "expected a c10::Error";
  return "";
}

void expect_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), want.scalar_type()) << what;
  EXPECT_TRUE(at::equal(got.cpu(), want.cpu())) << what << "\ngot\n" << got << "\nwant\n" << want;
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what,
                  double rtol = 1e-10, double atol = 1e-12) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_TRUE(at::allclose(got.cpu().to(at::kDouble), want.cpu().to(at::kDouble), rtol, atol))
      << what << "\ngot\n"
      << got << "\nwant\n"
      << want;
}

// topk_ids [3, 2] = [[1, 0], [2, 5], [0, -1]], E = 3: pairs 3 (id 5 >= E) and 5 (id -1) drop.
const std::vector<int32_t> kIds = {1, 0, 2, 5, 0, -1};
constexpr int64_t kExperts = 3;

// ---- routing ----------------------------------------------------------------------------------
TEST(OpsDispatcher, RoutingHandWritten) {
  for (const auto dtype : {at::kInt, at::kLong}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto [sorted_pairs, pair_to_row, offsets] =
        routing(ints(kIds).view({3, 2}).to(dtype), kExperts);
    expect_equal(sorted_pairs, ints({1, 4, 0, 2, 3, 5}), "sorted_pairs");
    expect_equal(pair_to_row, ints({2, 0, 3, -1, 1, -1}).view({3, 2}), "pair_to_row");
    expect_equal(offsets, ints({0, 2, 3, 4}), "expert_offsets");
  }
}

TEST(OpsDispatcher, RoutingZeroTokens) {
  const auto [sorted_pairs, pair_to_row, offsets] =
      routing(at::empty({0, 2}, at::TensorOptions().dtype(at::kLong)), 4);
  EXPECT_EQ(sorted_pairs.numel(), 0);
  EXPECT_EQ(pair_to_row.sizes(), (std::vector<int64_t>{0, 2}));
  expect_equal(offsets, ints({0, 0, 0, 0, 0}), "expert_offsets");
}

TEST(OpsDispatcher, RoutingRejectsBadInput) {
  const std::string msg = error_message([] { routing(ints({0, 1, 2}), 4); });
  EXPECT_NE(msg.find("moeforge.routing: topk_ids must be 2-D"), std::string::npos) << msg;
}

// ---- permute / combine / routed_dot -----------------------------------------------------------
TEST(OpsDispatcher, PermuteCombineRoundTrip) {
  const Tensor x = at::arange(1, 13, kF64).view({3, 4});  // [T=3, H=4]
  const Tensor w = at::tensor({0.25, 0.75, 0.5, 0.9, 1.0, 0.3}, kF64).view({3, 2});
  const auto [sorted_pairs, pair_to_row, offsets] = routing(ints(kIds).view({3, 2}), kExperts);

  // Row i holds w[p] * x[p / K] for p = sorted_pairs[i] = [1, 4, 0, 2, 3, 5]; p = 3, 5 dropped.
  const Tensor rows = permute(x, sorted_pairs, pair_to_row, w);
  const Tensor zero = at::zeros({4}, kF64);
  const Tensor want = at::stack({0.75 * x[0], 1.0 * x[2], 0.25 * x[0], 0.5 * x[1], zero, zero});
  expect_equal(rows, want, "permute with weights");

  // combine(permute(x)) with weights = (sum of the kept weights of t) * x[t].
  const Tensor plain = permute(x, sorted_pairs, pair_to_row, std::nullopt);
  const Tensor back = combine(plain, sorted_pairs, pair_to_row, w);
  const Tensor kept_w = at::tensor({0.25 + 0.75, 0.5, 1.0}, kF64).view({3, 1});
  expect_close(back, kept_w * x, "combine(permute(x), w)");
  expect_close(combine(plain, sorted_pairs, pair_to_row, std::nullopt),
               at::tensor({2.0, 1.0, 1.0}, kF64).view({3, 1}) * x, "combine without weights");

  // routed_dot(permute(x), x) = |x[t]|^2 for kept pairs, 0 for dropped ones.
  const Tensor sq = (x * x).sum(1);
  const Tensor want_dot =
      at::stack({sq[0], sq[0], sq[1], at::zeros({}, kF64), sq[2], at::zeros({}, kF64)})
          .view({3, 2});
  expect_close(routed_dot(plain, x, pair_to_row), want_dot, "routed_dot");
}

TEST(OpsDispatcher, PermuteRejectsMismatchedPlan) {
  const Tensor x = at::ones({3, 4}, kF64);
  const std::string msg = error_message([&] {
    permute(x, ints({0, 1, 2, 3, 4, 5}), ints({0, 1, 2, 3}).view({2, 2}), std::nullopt);
  });
  EXPECT_NE(msg.find("moeforge.permute: pair_to_row.size(0)"), std::string::npos) << msg;
}

// ---- grouped_mm -------------------------------------------------------------------------------
TEST(OpsDispatcher, GroupedMmMatchesPerExpertMm) {
  at::manual_seed(0);
  const Tensor x = at::randn({5, 4}, kF64);
  const Tensor weight = at::randn({3, 6, 4}, kF64);  // [E, out, in]
  const Tensor bias = at::randn({3, 6}, kF64);
  const Tensor offsets = ints({0, 2, 2, 4});  // expert 1 empty, row 4 dropped
  Tensor want = at::zeros({5, 6}, kF64);
  want.narrow(0, 0, 2).copy_(at::mm(x.narrow(0, 0, 2), weight[0].t()) + bias[0]);
  want.narrow(0, 2, 2).copy_(at::mm(x.narrow(0, 2, 2), weight[2].t()) + bias[2]);
  expect_close(grouped_mm(x, weight, offsets, bias, false), want, "grouped_mm");
  expect_close(grouped_mm(x, weight.transpose(1, 2).contiguous(), offsets, bias, true), want,
               "grouped_mm, weight_transposed");

  const Tensor grad_out = at::randn({5, 6}, kF64);
  const auto [grad_x, grad_w, grad_b] =
      grouped_mm_backward(grad_out, x, weight, offsets, false, {true, true, true});
  Tensor want_gx = at::zeros({5, 4}, kF64), want_gw = at::zeros({3, 6, 4}, kF64);
  for (const int64_t e : {0, 2}) {
    const int64_t begin = e == 0 ? 0 : 2;
    const Tensor dy = grad_out.narrow(0, begin, 2), xe = x.narrow(0, begin, 2);
    want_gx.narrow(0, begin, 2).copy_(at::mm(dy, weight[e]));
    want_gw[e].copy_(at::mm(dy.t(), xe));
  }
  const Tensor want_gb = at::stack(
      {grad_out.narrow(0, 0, 2).sum(0), at::zeros({6}, kF64), grad_out.narrow(0, 2, 2).sum(0)});
  expect_close(grad_x, want_gx, "grad_x");
  expect_close(grad_w, want_gw, "grad_weight");
  expect_close(grad_b, want_gb, "grad_bias");

  // A masked-off output is an empty tensor (no dW GEMM for frozen weights).
  const auto [gx2, gw2, gb2] =
      grouped_mm_backward(grad_out, x, weight, offsets, false, {true, false, false});
  EXPECT_EQ(gw2.numel(), 0);
  EXPECT_EQ(gb2.numel(), 0);
  expect_close(gx2, want_gx, "grad_x alone");
}

// The routing plan: x token-major [T, in], routed row r reads token sorted_pairs[r] / top_k. Same
// results as permuting first; the weight gradient reads x through the plan too, grad_x stays per
// routed row.
TEST(OpsDispatcher, GroupedMmReadsTokenMajorXThroughThePlan) {
  at::manual_seed(3);
  const Tensor x = at::randn({3, 4}, kF64);  // T = 3 tokens, top_k = 2
  const Tensor weight = at::randn({2, 5, 4}, kF64);
  const Tensor pair_to_row = ints({1, 4, 0, -1, 2, 3}).view({3, 2});  // pair 3 dropped
  const Tensor sorted_pairs = ints({2, 0, 4, 5, 1, 3});  // rows 0-1: expert 0, 2-4: 1, 5: dropped
  const Tensor offsets = ints({0, 2, 5});
  const Tensor x_rows = x.index_select(0, ints({1, 0, 2, 2, 0, 1}).to(at::kLong));
  expect_close(grouped_mm(x, weight, offsets, {}, false, sorted_pairs, pair_to_row),
               grouped_mm(x_rows, weight, offsets, {}, false), "grouped_mm through the plan");
  const Tensor grad_out = at::randn({6, 5}, kF64);
  const auto got = grouped_mm_backward(grad_out, x, weight, offsets, false, {true, true, false},
                                       sorted_pairs, pair_to_row);
  const auto want =
      grouped_mm_backward(grad_out, x_rows, weight, offsets, false, {true, true, false});
  expect_close(std::get<0>(got), std::get<0>(want), "grad_x per routed row");
  expect_close(std::get<1>(got), std::get<1>(want), "grad_weight through the plan");
  const auto [delta, u] = expert_lora(x, at::randn({4, 4}, kF64), at::randn({5, 4}, kF64), offsets,
                                      0.5, sorted_pairs, pair_to_row);
  EXPECT_EQ(delta.sizes(), (std::vector<int64_t>{6, 5}));
  EXPECT_EQ(u.sizes(), (std::vector<int64_t>{6, 2}));

  const std::string msg =
      error_message([&] { grouped_mm(x, weight, offsets, {}, false, sorted_pairs, {}); });
  EXPECT_NE(msg.find("moeforge.grouped_mm: sorted_pairs and pair_to_row (the routing plan) must "
                     "be given together"),
            std::string::npos)
      << msg;
}

// ---- swiglu -----------------------------------------------------------------------------------
TEST(OpsDispatcher, WeightedSwigluBackwardIsTheBackwardOfWeightedActivation) {
  at::manual_seed(4);
  const Tensor h = at::randn({4, 6}, kF64) * 3;
  const Tensor w = at::randn({4}, at::TensorOptions().dtype(at::kFloat)).to(at::kDouble);
  const Tensor grad_aw = at::randn({4, 3}, kF64);
  const auto [grad_h, act_w, grad_w] =
      weighted_swiglu_backward(grad_aw, h, w, "silu", 1.702, 7.0, true);
  const Tensor a = swiglu(h, "silu", 1.702, 7.0);
  expect_close(act_w, w.unsqueeze(1) * a, "weighted activation");
  expect_close(grad_w, (grad_aw * a).sum(1), "row weight gradient");
  expect_close(grad_h, swiglu_backward(grad_aw * w.unsqueeze(1), h, "silu", 1.702, 7.0), "grad_h");
  const auto [gh2, empty, gw2] = weighted_swiglu_backward(grad_aw, h, w, "silu", 1.702, 7.0, false);
  EXPECT_EQ(empty.numel(), 0);
  expect_close(gh2, grad_h, "grad_h without the activation");
}

TEST(OpsDispatcher, SwigluSiluAndGptOss) {
  at::manual_seed(1);
  const Tensor h = at::randn({3, 8}, kF64) * 4;
  const Tensor g = h.narrow(1, 0, 4), u = h.narrow(1, 4, 4);
  expect_close(swiglu(h, "silu", 1.702, 7.0), at::silu(g) * u, "swiglu silu");

  const double alpha = 1.702, limit = 2.0;
  const Tensor gi = h.slice(1, 0, 8, 2).clamp_max(limit);
  const Tensor ui = h.slice(1, 1, 8, 2).clamp(-limit, limit);
  expect_close(swiglu(h, "gpt_oss", alpha, limit), (ui + 1) * gi * at::sigmoid(alpha * gi),
               "swiglu gpt_oss");

  // d/dg silu(g) * u = u * s * (1 + g * (1 - s)), d/du = silu(g).
  const Tensor grad_a = at::randn({3, 4}, kF64);
  const Tensor s = at::sigmoid(g);
  const Tensor want = at::cat({grad_a * u * s * (1 + g * (1 - s)), grad_a * at::silu(g)}, 1);
  expect_close(swiglu_backward(grad_a, h, "silu", 1.702, 7.0), want, "swiglu_backward silu");

  const std::string msg = error_message([&] { swiglu(h, "gelu", 1.702, 7.0); });
  EXPECT_NE(msg.find("moeforge.swiglu: variant must be"), std::string::npos) << msg;
}

// ---- expert_lora ------------------------------------------------------------------------------
TEST(OpsDispatcher, ExpertLoraMatchesTwoThinGemms) {
  at::manual_seed(2);
  constexpr int64_t kRank = 2, kIn = 5, kOut = 3, kE = 2;
  const double scaling = 0.5;
  const Tensor x = at::randn({4, kIn}, kF64);
  const Tensor lora_a = at::randn({kE * kRank, kIn}, kF64);   // expert-major
  const Tensor lora_b = at::randn({kOut, kRank * kE}, kF64);  // rank-major
  const Tensor offsets = ints({0, 1, 3});                     // row 3 dropped
  Tensor want_delta = at::zeros({4, kOut}, kF64), want_u = at::zeros({4, kRank}, kF64);
  for (int64_t e = 0; e < kE; ++e) {
    const int64_t begin = e == 0 ? 0 : 1, rows = e == 0 ? 1 : 2;
    const Tensor a_e = lora_a.narrow(0, e * kRank, kRank);           // [r, in]
    const Tensor b_e = lora_b.view({kOut, kRank, kE}).select(2, e);  // [out, r]
    const Tensor u = at::mm(x.narrow(0, begin, rows), a_e.t());
    want_u.narrow(0, begin, rows).copy_(u);
    want_delta.narrow(0, begin, rows).copy_(scaling * at::mm(u, b_e.t()));
  }
  const auto [delta, lora_u] = expert_lora(x, lora_a, lora_b, offsets, scaling);
  expect_close(delta, want_delta, "delta");
  expect_close(lora_u, want_u, "lora_u");

  // grad_x = scaling * grad_delta B_e A_e on each expert's rows, 0 on dropped rows.
  const Tensor grad_delta = at::randn({4, kOut}, kF64);
  const auto [grad_x, grad_a, grad_b] = expert_lora_backward(grad_delta, x, lora_u, lora_a, lora_b,
                                                             offsets, scaling, {true, true, true});
  Tensor want_gx = at::zeros({4, kIn}, kF64);
  for (int64_t e = 0; e < kE; ++e) {
    const int64_t begin = e == 0 ? 0 : 1, rows = e == 0 ? 1 : 2;
    const Tensor a_e = lora_a.narrow(0, e * kRank, kRank);
    const Tensor b_e = lora_b.view({kOut, kRank, kE}).select(2, e);
    want_gx.narrow(0, begin, rows)
        .copy_(scaling * at::mm(at::mm(grad_delta.narrow(0, begin, rows), b_e), a_e));
  }
  expect_close(grad_x, want_gx, "grad_x");
  EXPECT_EQ(grad_a.sizes(), lora_a.sizes());
  EXPECT_EQ(grad_b.sizes(), lora_b.sizes());
}

// ---- router_loss ------------------------------------------------------------------------------
TEST(OpsDispatcher, RouterLossUniformLogits) {
  // Uniform logits: top-k ties go to the lowest experts, every softmax entry is 1/E, so
  // aux = E * sum_e (count_e / R) * (1 / E) = top_k and z = log(E)^2.
  constexpr int64_t kTokens = 8, kE = 4, kTopK = 2;
  const std::vector<Tensor> logits = {at::zeros({kTokens, kE}, kF64),
                                      at::zeros({kTokens, kE}, kF64)};
  const auto [aux, z, counts] = router_loss(logits, std::nullopt, kTopK);
  EXPECT_NEAR(aux.item<double>(), double(kTopK), 1e-12);
  EXPECT_NEAR(z.item<double>(), std::log(double(kE)) * std::log(double(kE)), 1e-12);
  expect_equal(counts, at::tensor({16, 16, 0, 0}, at::TensorOptions().dtype(at::kLong)),
               "expert_counts");

  // d aux / d logits[t, e] = (E / R^2) * p_e * (count_e - sum_j p_j count_j) = +-1/32 here.
  const std::vector<Tensor> grads = router_loss_backward(at::ones({}, kF64), at::zeros({}, kF64),
                                                         logits, std::nullopt, counts, kTopK);
  ASSERT_EQ(grads.size(), 2u);
  const Tensor row = at::tensor({1.0, 1.0, -1.0, -1.0}, kF64) / 32;
  for (const Tensor& g : grads) expect_close(g, row.expand({kTokens, kE}), "grad of aux");
}

// ---- CUDA kernels against the CPU kernels -----------------------------------------------------
bool have_cuda() {
  return at::hasCUDA() && at::getNumGPUs() > 0;
}

#define MOEFORGE_REQUIRE_CUDA()                                                \
  do {                                                                         \
    if (!kBuiltWithCuda) GTEST_SKIP() << "this build of moeforge has no CUDA"; \
    if (!have_cuda()) GTEST_SKIP() << "no CUDA device";                        \
  } while (0)

#ifdef MOEFORGE_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

TEST(OpsDispatcherCuda, RoutingMatchesCpu) {
  MOEFORGE_REQUIRE_CUDA();
  at::manual_seed(3);
  for (const auto dtype : {at::kInt, at::kLong}) {
    for (const auto& [tokens, top_k, experts] :
         std::vector<std::array<int64_t, 3>>{{0, 2, 4}, {1000, 8, 64}, {37, 1, 5}, {50, 6, 6}}) {
      SCOPED_TRACE(std::to_string(tokens) + "x" + std::to_string(top_k) +
                   " E=" + std::to_string(experts));
      const Tensor ids =
          at::randint(-2, experts + 2, {tokens, top_k}, at::TensorOptions().dtype(dtype));
      const auto [sp, p2r, off] = routing(ids, experts);
      const auto [sp_c, p2r_c, off_c] = routing(ids.cuda(), experts);
      EXPECT_TRUE(sp_c.is_cuda());
      expect_equal(sp_c, sp, "sorted_pairs");
      expect_equal(p2r_c, p2r, "pair_to_row");
      expect_equal(off_c, off, "expert_offsets");
    }
  }
}

TEST(OpsDispatcherCuda, PermuteCombineRoutedDotMatchCpu) {
  MOEFORGE_REQUIRE_CUDA();
  at::manual_seed(4);
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (const int64_t hidden : {257, 512}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " H=" + std::to_string(hidden));
      const int64_t tokens = 300, top_k = 4, experts = 16;
      const Tensor ids =
          at::randint(-1, experts + 1, {tokens, top_k}, at::TensorOptions().dtype(at::kLong));
      const auto [sp, p2r, off] = routing(ids, experts);
      const Tensor x = at::randn({tokens, hidden}).to(dtype);
      const Tensor w = at::rand({tokens, top_k});  // float32 weights, whatever the data type
      const Tensor rows = permute(x, sp, p2r, w);
      // permute and combine: the same rounding steps on both devices, so equal bit for bit.
      expect_equal(permute(x.cuda(), sp.cuda(), p2r.cuda(), w.cuda()), rows, "permute");
      expect_equal(combine(rows.cuda(), sp.cuda(), p2r.cuda(), w.cuda()), combine(rows, sp, p2r, w),
                   "combine");
      expect_equal(combine(rows.cuda(), sp.cuda(), p2r.cuda(), std::nullopt),
                   combine(rows, sp, p2r, std::nullopt), "combine without weights");
      // routed_dot sums in another order.
      const double tol = dtype == at::kDouble ? 1e-12 : (dtype == at::kFloat ? 1e-4 : 2e-2);
      expect_close(routed_dot(rows.cuda(), x.cuda(), p2r.cuda()), routed_dot(rows, x, p2r),
                   "routed_dot", tol, tol);
    }
  }
}

TEST(OpsDispatcherCuda, NonContiguousInputs) {
  MOEFORGE_REQUIRE_CUDA();
  at::manual_seed(5);
  const Tensor ids = at::randint(0, 8, {2, 64}, at::TensorOptions().dtype(at::kLong)).t();
  const auto [sp, p2r, off] = routing(ids, 8);
  const auto [sp_c, p2r_c, off_c] = routing(ids.cuda(), 8);
  expect_equal(sp_c, sp, "sorted_pairs");
  expect_equal(p2r_c, p2r, "pair_to_row");
  expect_equal(off_c, off, "expert_offsets");
  const Tensor x = at::randn({96, 64}).t();  // [T=64, H=96], column-major
  const Tensor w = at::rand({2, 64}).t();
  expect_equal(permute(x.cuda(), sp_c, p2r_c, w.cuda()), permute(x, sp, p2r, w), "permute");
}

TEST(OpsDispatcherCuda, CpuOnlyBuildSaysSo) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (kBuiltWithCuda) GTEST_SKIP() << "this build has CUDA kernels";
  const Tensor h = at::randn({2, 8}).cuda();
  const std::string msg = error_message([&] { swiglu(h, "silu", 1.702, 7.0); });
  const char* want = "moeforge.swiglu: this build of moeforge has no CUDA kernels";
  EXPECT_NE(msg.find(want), std::string::npos) << msg;
}

}  // namespace
