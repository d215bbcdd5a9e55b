"""CUDA-only checks (skipped without a GPU): every op agrees with the CPU path on random data with
poisoned memory, sizes past 131072 routed rows, determinism, and a whole MoE layer forward +
backward captured and replayed in a CUDA graph (no host synchronisation anywhere). The grouped GEMM
checks run under every engine of MOEFORGE_GROUPED_GEMM ("auto", the default: at::_grouped_mm where
it applies, bfloat16 on sm90 / sm100, else our engine; "moeforge": our engine only, the tensor-core
path for the float16 / bfloat16 forward, grad_x and weight-gradient GEMMs on sm80+, else SIMT;
"simt": our SIMT kernels only; "sm90", on compute capability 9.0: our sm_90a wgmma kernels for the
bfloat16 GEMMs of grouped_mm / grouped_mm_backward, "auto" for the rest)."""

import functools
import os

import pytest
import torch

import moeforge
from conftest import random_topk_ids
from moeforge import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# MOEFORGE_SM90_PIPELINE's values: the row-grouped kernel's main loops (bitwise the same results).
SM90_PIPELINES = ("serial", "overlapped", "warp_specialized", "warp_specialized_wide")


@functools.cache
def sm90_engine_applies() -> bool:
    """Whether MOEFORGE_GROUPED_GEMM=sm90 can run here: a compute capability 9.0 GPU and a build
    that holds our sm_90a kernel (gpu_check.sh builds for 9.0), probed with one small call (a
    device or build without it raises the engine's named error)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    old = os.environ.get("MOEFORGE_GROUPED_GEMM")
    os.environ["MOEFORGE_GROUPED_GEMM"] = "sm90"
    try:
        x = torch.ones(8, 16, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(1, 16, 16, device="cuda", dtype=torch.bfloat16)
        ops.grouped_mm(x, w, torch.tensor([0, 8], dtype=torch.int32, device="cuda"))
        return True
    except RuntimeError as err:
        if "MOEFORGE_GROUPED_GEMM=sm90" not in str(err):
            raise
        return False
    finally:
        if old is None:
            os.environ.pop("MOEFORGE_GROUPED_GEMM")
        else:
            os.environ["MOEFORGE_GROUPED_GEMM"] = old


@pytest.fixture(params=["auto", "moeforge", "simt", "sm90"])
def engine(request, monkeypatch):
    """Runs the test under each grouped GEMM engine (the CUDA ops read the variable per call)."""
    if request.param == "sm90" and not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", request.param)
    return request.param


def torch_engine_applies(dtype) -> bool:
    """Whether the default engine ("auto") reaches at::_grouped_mm for eligible shapes."""
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10)


def aten_ops_called(fn) -> set[str]:
    """Names of the aten ops that fn() dispatches, nested calls from C++ included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def poison_allocator(nbytes: int = 256 << 20) -> None:
    """Fill cached-but-free device memory with NaN so that outputs a kernel forgets to write
    show up as NaN (torch's caching allocator hands these blocks to the next allocations)."""
    blocks = [torch.full((nbytes // 4 // 8,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def to_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else [t.cpu() for t in x]


def assert_matches_cpu(fn, *args, rtol=1e-5, atol=1e-6):
    """fn(*cuda_args) vs fn(*cpu_args); outputs finite."""
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    poison_allocator()
    got = fn(*args)
    want = fn(*cpu_args)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want, strict=True):
        assert g.is_cuda
        if g.is_floating_point():
            assert torch.isfinite(g).all(), "unwritten (NaN-poisoned) or non-finite output"
            torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=atol)
        else:
            assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("T,K,E,H", [(16384, 8, 128, 64), (1023, 4, 60, 2880), (5, 2, 8, 129)])
def test_routing_permute_combine_large_and_odd(T, K, E, H):
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.05, skip_experts=(1,))
    assert_matches_cpu(lambda i: tuple(ops.routing(i, E)), ids)
    plan = ops.routing(ids, E)
    x = torch.randn(T, H, device="cuda")
    w = torch.rand(T, K, device="cuda")
    assert_matches_cpu(
        lambda x, sp, pr, w: torch.ops.moeforge.permute(x, sp, pr, w),
        x,
        plan.sorted_pairs,
        plan.pair_to_row,
        w,
        rtol=0,
        atol=0,
    )
    y = torch.randn(T * K, H, device="cuda")
    assert_matches_cpu(
        lambda y, sp, pr, w: torch.ops.moeforge.combine(y, sp, pr, w),
        y,
        plan.sorted_pairs,
        plan.pair_to_row,
        w,
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["hf", "gpt_oss"])
def test_expert_ffn_ops_match_cpu(dtype, layout, engine):
    T, K, E, H, I, r = 700, 4, 16, 96, 80, 8
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.02, skip_experts=(3,))
    plan = ops.routing(ids, E)
    xs = ops.permute(torch.randn(T, H, device="cuda", dtype=dtype), plan)
    transposed = layout == "gpt_oss"
    w = (
        torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), device="cuda", dtype=dtype)
        / H**0.5
    )
    b = torch.randn(E, 2 * I, device="cuda", dtype=dtype) if transposed else None
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    offs = plan.expert_offsets
    assert_matches_cpu(
        lambda x, w, o, b: ops.grouped_mm(x, w, o, b, transposed), xs, w, offs, b, **tol
    )
    h = ops.grouped_mm(xs, w, offs, b, transposed)
    variant = "gpt_oss" if transposed else "silu"
    assert_matches_cpu(lambda h: ops.swiglu(h, variant), h, **tol)
    g = torch.randn(h.shape[0], I, device="cuda", dtype=dtype)
    assert_matches_cpu(
        lambda g, h: torch.ops.moeforge.swiglu_backward(g, h, variant, 1.702, 7.0), g, h, **tol
    )
    row_w = torch.rand(h.shape[0], device="cuda") * 2 - 0.5
    assert_matches_cpu(
        lambda g, h, w: torch.ops.moeforge.weighted_swiglu_backward(
            g, h, w, variant, 1.702, 7.0, True
        ),
        g,
        h,
        row_w,
        **tol,
    )
    dy = torch.randn(xs.shape[0], 2 * I, device="cuda", dtype=dtype)
    assert_matches_cpu(
        lambda dy, x, w, o: torch.ops.moeforge.grouped_mm_backward(
            dy, x, w, o, transposed, [True, True, True]
        ),
        dy,
        xs,
        w,
        offs,
        **tol,
    )
    A = torch.randn(E * r, H, device="cuda", dtype=dtype) / H**0.5
    B = torch.randn(2 * I, r * E, device="cuda", dtype=dtype) / r**0.5
    assert_matches_cpu(
        lambda x, A, B, o: torch.ops.moeforge.expert_lora(x, A, B, o, 0.5), xs, A, B, offs, **tol
    )
    _, u = torch.ops.moeforge.expert_lora(xs, A, B, offs, 0.5)
    lora_backward_args = (dy, xs, u, A, B, offs)

    def lora_backward(d, x, u, A, B, o):
        return torch.ops.moeforge.expert_lora_backward(d, x, u, A, B, o, 0.5, [True, True, True])

    if engine in ("auto", "sm90") and torch_engine_applies(dtype):
        # torch's engine (which serves LoRA's GEMMs under "sm90" too) rounds du = s dy B_e to bf16 between the GEMMs (as PEFT's bf16 matmuls
        # do); the CPU keeps it in fp32. grad_A sums ~175 of those products: on an H100 2.8% of
        # its entries (the small ones) missed the elementwise 2e-2, and a float64 emulation of the
        # same rounding on CPU gives that count and 2.4e-3 normwise.
        assert_matches_cpu_normwise(lora_backward, *lora_backward_args, bound=1e-2)
    else:
        assert_matches_cpu(lora_backward, *lora_backward_args, **tol)


def assert_matches_cpu_normwise(fn, *args, bound):
    """fn(*cuda_args) vs fn(*cpu_args): same shapes and dtypes, every output finite and
    |cuda - cpu| / |cpu| < bound."""
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    poison_allocator()
    for g, w in zip(fn(*args), fn(*cpu_args), strict=True):
        assert g.is_cuda and g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape)
        assert torch.isfinite(g).all(), "unwritten (NaN-poisoned) or non-finite output"
        assert_normwise_close(g, w, bound)


def assert_normwise_close(got, want, bound, name=""):
    """|got - want| / |want| < bound (both compared in float64 on the CPU; want non-zero)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert want.norm() > 0, f"{name}: the reference is all zeros"
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < bound, f"{name}: |cuda - cpu| / |cpu| = {rel:.2e}"


def make_offsets(counts, dropped):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[1:] = torch.tensor(counts).cumsum(0)
    return offs.cuda(), int(offs[-1]) + dropped


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "n_in,n_out",
    [(64, 96), (72, 40), (13, 24), (32, 12)],  # torch-eligible, then fallbacks (in / out % 8)
)
@pytest.mark.parametrize(
    "counts,dropped",
    [([0, 37, 5, 0, 120, 1, 0], 7), ([300], 0), ([0, 0, 0], 5), ([8, 0, 16, 3], 0)],
)
def test_grouped_mm_forward_backward_match_cpu(engine, transposed, n_in, n_out, counts, dropped):
    """grouped_mm and grouped_mm_backward (every output_mask) vs the CPU op in bfloat16: empty
    experts (first, middle, last, all), dropped tail rows, bias, both weight layouts."""
    torch.manual_seed(0)
    offs, rows = make_offsets(counts, dropped)
    E = len(counts)
    dt = torch.bfloat16
    x = torch.randn(rows, n_in, device="cuda", dtype=dt)
    shape = (E, n_in, n_out) if transposed else (E, n_out, n_in)
    w = torch.randn(shape, device="cuda", dtype=dt) / n_in**0.5
    b = torch.randn(E, n_out, device="cuda", dtype=dt)
    dy = torch.randn(rows, n_out, device="cuda", dtype=dt)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    for bias in (None, b):
        assert_matches_cpu(
            lambda x, w, o, b: ops.grouped_mm(x, w, o, b, transposed), x, w, offs, bias, **tol
        )
    for mask in ([True, True, True], [True, False, True], [False, True, False]):
        assert_matches_cpu(
            lambda dy, x, w, o, m=mask: torch.ops.moeforge.grouped_mm_backward(
                dy, x, w, o, transposed, m
            ),
            dy,
            x,
            w,
            offs,
            **tol,
        )
    eligible = n_in % 8 == 0 and n_out % 8 == 0
    called = aten_ops_called(
        lambda: torch.ops.moeforge.grouped_mm_backward(
            dy, x, w, offs, transposed, [True, True, True]
        )
    )
    # "sm90" runs every GEMM of the backward on its own kernels.
    expect = engine == "auto" and eligible and torch_engine_applies(dt)
    assert ("aten::_grouped_mm" in called) == expect, sorted(called)


def cuda_kernels_called(fn) -> set[str]:
    """Names of the CUDA kernels that fn() launches."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("engine_name", [None, "moeforge", "simt"])
def test_default_engine_runs_the_tensor_core_kernel(monkeypatch, dtype, engine_name):
    """The default engine runs torch's grouped GEMM where it applies (bfloat16 on sm90 / sm100)
    and our WMMA kernels for the other half-type cases on sm80+; "moeforge" always reaches the
    WMMA kernels for the forward, grad_x and weight-gradient GEMMs in the half types on sm80+ (and
    only there), "simt" never does; the results match the CPU op either way."""
    if engine_name is None:
        monkeypatch.delenv("MOEFORGE_GROUPED_GEMM", raising=False)
    else:
        monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", engine_name)
    torch.manual_seed(0)
    offs, rows = make_offsets([0, 150, 3, 0, 40], 9)
    x = torch.randn(rows, 96, device="cuda", dtype=dtype)
    w = torch.randn(5, 136, 96, device="cuda", dtype=dtype) / 10
    b = torch.randn(5, 136, device="cuda", dtype=dtype)
    dy = torch.randn(rows, 136, device="cuda", dtype=dtype)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-5}
    assert_matches_cpu(lambda x, w, o, b: ops.grouped_mm(x, w, o, b), x, w, offs, b, **tol)
    mask = [True, True, False]
    for i in (0, 1):  # grad_x, grad_w
        assert_matches_cpu(
            lambda dy, x, w, o, i=i: torch.ops.moeforge.grouped_mm_backward(
                dy, x, w, o, False, mask
            )[i],
            dy,
            x,
            w,
            offs,
            **tol,
        )
    names = cuda_kernels_called(
        lambda: (
            ops.grouped_mm(x, w, offs, b),
            torch.ops.moeforge.grouped_mm_backward(dy, x, w, offs, False, mask),
        )
    )
    wmma = [n for n in names if "grouped_gemm_wmma_kernel" in n]
    wgrad_wmma = [n for n in names if "grouped_gemm_wgrad_wmma_kernel" in n]
    expect = (
        engine_name != "simt"
        and dtype != torch.float32
        and torch.cuda.get_device_capability()[0] >= 8
        and not (engine_name is None and torch_engine_applies(dtype))
    )
    assert bool(wmma) == expect, sorted(names)
    assert bool(wgrad_wmma) == expect, sorted(names)


@pytest.mark.parametrize("name", ["", "auto", "torch"])
def test_default_engine_aliases_reach_torch(monkeypatch, name):
    """Unset, "", "auto" and "torch" are one engine: torch's grouped GEMM where it applies."""
    if not torch_engine_applies(torch.bfloat16):
        pytest.skip("torch's grouped GEMM needs bfloat16 on sm90 / sm100")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", name)
    offs, rows = make_offsets([0, 150, 3, 0, 40], 9)
    x = torch.randn(rows, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5, 136, 96, device="cuda", dtype=torch.bfloat16)
    assert "aten::_grouped_mm" in aten_ops_called(lambda: ops.grouped_mm(x, w, offs))


def test_lora_backward_masks_give_the_full_results(engine):
    """Each output of expert_lora_backward alone (the masks the fused layer passes) equals the
    same output of the all-True call bitwise, masked outputs are empty; torch's LoRA path (bf16,
    rank 16) under "auto", our kernels otherwise."""
    torch.manual_seed(0)
    E, r, H, O = 8, 16, 96, 136
    offs, rows = make_offsets([40, 0, 77, 5, 0, 120, 9, 31], 11)
    dt = torch.bfloat16
    x = torch.randn(rows, H, device="cuda", dtype=dt)
    dy = torch.randn(rows, O, device="cuda", dtype=dt)
    A = torch.randn(E * r, H, device="cuda", dtype=dt) / H**0.5
    B = torch.randn(O, r * E, device="cuda", dtype=dt) / r**0.5
    _, u = torch.ops.moeforge.expert_lora(x, A, B, offs, 2.0)
    full = torch.ops.moeforge.expert_lora_backward(dy, x, u, A, B, offs, 2.0, [True] * 3)
    for i in range(3):
        mask = [j == i for j in range(3)]
        got = torch.ops.moeforge.expert_lora_backward(dy, x, u, A, B, offs, 2.0, mask)
        for j in range(3):
            if j == i:
                assert torch.equal(got[j], full[j]), (mask, j)
            else:
                assert got[j].numel() == 0, (mask, j)


def test_grouped_gemm_engine_must_be_known(monkeypatch):
    offs, rows = make_offsets([2, 3], 0)
    x = torch.randn(rows, 8, device="cuda")
    w = torch.randn(2, 8, 8, device="cuda")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "cutlass")
    with pytest.raises(ValueError, match="MOEFORGE_GROUPED_GEMM"):
        ops.grouped_mm(x, w, offs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_layers,tokens", [(3, 4099), (40, 700)])
def test_router_loss_matches_cpu(dtype, num_layers, tokens):
    """40 layers: two batched launches (up to 32 layers each) in the forward and the backward."""
    logits = [torch.randn(tokens, 128, device="cuda", dtype=dtype) for _ in range(num_layers)]
    mask = (torch.rand(tokens, device="cuda") > 0.1).long()
    assert_matches_cpu(lambda m, *ls: torch.ops.moeforge.router_loss(list(ls), m, 8), mask, *logits)
    _, _, counts = torch.ops.moeforge.router_loss(logits, mask, 8)
    one = torch.ones((), device="cuda")
    assert_matches_cpu(
        lambda m, c, *ls: torch.ops.moeforge.router_loss_backward(
            one.to(m.device) * 0.3, one.to(m.device), list(ls), m, c, 8
        ),
        mask,
        counts,
        *logits,
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_rows_equal_permute_first(engine, dtype):
    """grouped_mm / expert_lora (and their backward ops) reading token-major x through the plan
    (the permute fused into the loads) give bitwise the results of permuting first: the same rows
    in the same order, on every engine. H = 203: partial k slabs, rows not 16-byte aligned (the
    element-wise gather path); H = 200: aligned rows (the cp.async path)."""
    for H in (203, 200):
        check_gathered_rows(dtype, H)


def check_gathered_rows(dtype, H):
    torch.manual_seed(0)
    T, K, E, O, r = 1500, 4, 24, 136, 8
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(5,))
    plan = ops.routing(ids, E)
    pairs = (plan.sorted_pairs, plan.pair_to_row)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    xs = ops.permute(x, plan)
    dy = torch.randn(T * K, O, device="cuda", dtype=dtype)
    mask = [True, True, False]
    for transposed in (False, True):
        shape = (E, H, O) if transposed else (E, O, H)
        w = torch.randn(shape, device="cuda", dtype=dtype) / H**0.5
        poison_allocator()
        got = ops.grouped_mm(x, w, offs, None, transposed, plan=plan)
        assert torch.equal(got, ops.grouped_mm(xs, w, offs, None, transposed))
        got = torch.ops.moeforge.grouped_mm_backward(dy, x, w, offs, transposed, mask, *pairs)
        want = torch.ops.moeforge.grouped_mm_backward(dy, xs, w, offs, transposed, mask)
        for g, wt in zip(got[:2], want[:2]):
            assert torch.equal(g, wt)
    A = torch.randn(E * r, H, device="cuda", dtype=dtype) / H**0.5
    B = torch.randn(O, r * E, device="cuda", dtype=dtype) / r**0.5
    delta, u = torch.ops.moeforge.expert_lora(x, A, B, offs, 0.5, *pairs)
    delta_ref, u_ref = torch.ops.moeforge.expert_lora(xs, A, B, offs, 0.5)
    assert torch.equal(delta, delta_ref) and torch.equal(u, u_ref)
    got = torch.ops.moeforge.expert_lora_backward(dy, x, u, A, B, offs, 0.5, [True] * 3, *pairs)
    want = torch.ops.moeforge.expert_lora_backward(dy, xs, u, A, B, offs, 0.5, [True] * 3)
    for g, wt in zip(got, want):
        assert torch.equal(g, wt)
    # grad_delta token-major (the fused layer's down adapter reads dO through the plan)
    dy_tokens = torch.randn(T, O, device="cuda", dtype=dtype)
    got = torch.ops.moeforge.expert_lora_backward(
        dy_tokens, xs, u, A, B, offs, 0.5, [True] * 3, *pairs, False, True
    )
    want = torch.ops.moeforge.expert_lora_backward(
        ops.permute(dy_tokens, plan), xs, u, A, B, offs, 0.5, [True] * 3
    )
    for g, wt in zip(got, want):
        assert torch.equal(g, wt)


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("layout", ["hf", "gpt_oss"])
def test_fused_moe_experts_forward_backward_match_cpu(engine, layout, r):
    """The fused layer (moe_experts: gathered gate_up GEMMs, weighted_swiglu_backward, LoRA on
    both projections, gpt-oss biases) on CUDA vs the same function on CPU, every gradient. Rank
    16 under torch's engine adds LoRA's up-projections in place (lora_expand_add_)."""
    torch.manual_seed(0)
    T, K, E, H, I = 600, 4, 16, 128, 96
    dt = torch.bfloat16
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(2,))
    transposed = layout == "gpt_oss"
    leaves = {
        "x": torch.randn(T, H, device="cuda", dtype=dt),
        "w": torch.rand(T, K, device="cuda"),
        "gu": torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), device="cuda", dtype=dt)
        / H**0.5,
        "dn": torch.randn((E, I, H) if transposed else (E, H, I), device="cuda", dtype=dt) / I**0.5,
        "guA": torch.randn(E * r, H, device="cuda", dtype=dt) / H**0.5,
        "guB": torch.randn(2 * I, r * E, device="cuda", dtype=dt) / r,
        "dnA": torch.randn(E * r, I, device="cuda", dtype=dt) / I**0.5,
        "dnB": torch.randn(H, r * E, device="cuda", dtype=dt) / r,
    }
    if transposed:
        leaves["gub"] = torch.randn(E, 2 * I, device="cuda", dtype=dt)
        leaves["dnb"] = torch.randn(E, H, device="cuda", dtype=dt)
    grad_out = torch.randn(T, H, device="cuda", dtype=dt)

    def run(device):
        p = {n: t.detach().to(device).requires_grad_() for n, t in leaves.items()}
        kwargs = {
            "layout": layout,
            "gate_up_lora": moeforge.ExpertLoRA(p["guA"], p["guB"], 0.5),
            "down_lora": moeforge.ExpertLoRA(p["dnA"], p["dnB"], 0.5),
        }
        if transposed:
            kwargs.update(gate_up_bias=p["gub"], down_bias=p["dnb"])
        out = moeforge.moe_experts(p["x"], ids.to(device), p["w"], p["gu"], p["dn"], **kwargs)
        grads = torch.autograd.grad(out, list(p.values()), grad_out.to(device))
        return [out, *grads]

    poison_allocator()
    # Normwise, as for any bf16 result: the gradients are sums of a few hundred bf16 products with
    # cancellation, and the CUDA GEMMs take LoRA's rank-r intermediate rounded to bf16 (the CPU
    # keeps it in fp32): measured on an H100 under the SIMT engine, where every other output is
    # bitwise equal to the CPU's, the down adapter's grad_B differs by 2.6e-3 normwise, and a few
    # of its near-zero entries by more than an elementwise 3e-2.
    # An elementwise bound scaled by each output's largest entry still catches a few wrong rows.
    for name, got, want in zip(["out", *leaves], run("cuda"), run("cpu")):
        assert torch.isfinite(got).all(), name
        assert_normwise_close(got, want, 1e-2, name)
        scale = want.abs().max().item()
        torch.testing.assert_close(
            got.cpu().double(),
            want.double(),
            rtol=5e-2,
            atol=3e-2 * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("layout", ["hf", "gpt_oss"])
def test_fused_layer_gathers_once_with_the_same_values(monkeypatch, layout):
    """Under torch's engine the fused layer gathers x (LoRA forward) and dO (backward) once and
    hands the copy to each op: every output and gradient is bitwise what the ops give when each
    reads through the plan (and gathers its own copy)."""
    if not torch_engine_applies(torch.bfloat16):
        pytest.skip("torch's grouped GEMM engine does not apply on this GPU")
    from moeforge import fused

    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "auto")
    torch.manual_seed(0)
    T, K, E, H, I, r = 300, 4, 16, 128, 96, 8
    dt = torch.bfloat16
    transposed = layout == "gpt_oss"
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.05, skip_experts=(3,))
    leaves = [
        torch.randn(T, H, device="cuda", dtype=dt),
        torch.rand(T, K, device="cuda"),
        torch.randn((E, H, 2 * I) if transposed else (E, 2 * I, H), device="cuda", dtype=dt) / 11,
        torch.randn((E, I, H) if transposed else (E, H, I), device="cuda", dtype=dt) / 10,
        torch.randn(E * r, H, device="cuda", dtype=dt) / 11,
        torch.randn(2 * I, r * E, device="cuda", dtype=dt) / 3,
        torch.randn(E * r, I, device="cuda", dtype=dt) / 10,
        torch.randn(H, r * E, device="cuda", dtype=dt) / 3,
    ]
    if transposed:
        leaves += [torch.randn(E, 2 * I, device="cuda", dtype=dt)]
        leaves += [torch.randn(E, H, device="cuda", dtype=dt)]
    grad_out = torch.randn(T, H, device="cuda", dtype=dt)
    assert fused._gathers_to_a_copy(leaves[0], E)

    def run():
        p = [t.detach().clone().requires_grad_() for t in leaves]
        kwargs = {"gate_up_lora": (p[4], p[5], 0.5), "down_lora": (p[6], p[7], 0.25)}
        if transposed:
            kwargs.update(gate_up_bias=p[8], down_bias=p[9])
        out = fused.fused_moe_experts(p[0], ids, p[1], p[2], p[3], layout=layout, **kwargs)
        return [out, *torch.autograd.grad(out, p, grad_out)]

    once = run()
    monkeypatch.setattr(fused, "_gathers_to_a_copy", lambda *_, **__: False)
    per_op = run()
    for i, (a, b) in enumerate(zip(once, per_op, strict=True)):
        assert torch.isfinite(a).all(), i
        assert torch.equal(a, b), i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize("n,rank", [(1536, 16), (131, 8), (256, 24), (2880, 12)])
def test_lora_expand_add_agrees_with_cpu(dtype, rank_major, n, rank):
    """On 128 uneven experts (some empty) with dropped rows, which must keep their values. The
    SIMT kernel (float32 / float64, odd widths) is the CPU op's arithmetic step for step: bitwise
    equal. 16-bit types with n % 8 == 0 run on tensor cores (fp32 accumulation in their own
    order): within one rounding of the float64 result plus an fp32 sum's error, and the same bits
    on a second run."""
    torch.manual_seed(1)
    E = 128
    counts = torch.randint(0, 9, (E,))
    counts[::7] = 0
    offs = torch.zeros(E + 1, dtype=torch.int32)
    offs[1:] = counts.cumsum(0)
    rows = int(offs[-1]) + 11
    out = torch.randn(rows, n, dtype=dtype)
    u = torch.randn(rows, rank, dtype=dtype)
    weight = torch.randn((n, rank * E) if rank_major else (E * rank, n), dtype=dtype) / 4
    want = out.clone()
    torch.ops.moeforge.lora_expand_add_(want, u, weight, offs, 0.75, rank_major)
    got = out.cuda()
    poison_allocator()
    torch.ops.moeforge.lora_expand_add_(got, u.cuda(), weight.cuda(), offs.cuda(), 0.75, rank_major)
    assert torch.equal(got.cpu()[int(offs[-1]) :], out[int(offs[-1]) :])
    sm80 = torch.cuda.get_device_capability()[0] >= 8
    tensor_cores = dtype in (torch.bfloat16, torch.float16) and n % 8 == 0 and sm80
    if not tensor_cores:
        assert torch.equal(got.cpu(), want)
        return
    ref = reference.lora_expand_add(out, u, weight, offs, 0.75, rank_major)
    mag = reference.lora_expand_add(out.abs(), u.abs(), weight.abs(), offs, 0.75, rank_major)
    tol = torch.finfo(dtype).eps / 2 * ref.abs() + 2 * (rank + 1) * 2.0**-24 * mag
    assert ((got.cpu().double() - ref).abs() <= tol).all()
    again = out.cuda()
    torch.ops.moeforge.lora_expand_add_(
        again, u.cuda(), weight.cuda(), offs.cuda(), 0.75, rank_major
    )
    assert torch.equal(again, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_expand_add_clamps_corrupt_offsets(dtype):
    """CUDA reads corrupt offsets as the grouped GEMM does (clamped into [0, rows], made
    non-decreasing, offsets[0] as 0) instead of syncing to report them: the same result as on
    those clamped offsets (bitwise for the SIMT kernel; bf16 runs on tensor cores)."""
    torch.manual_seed(2)
    rows, n, rank = 50, 64, 8
    bad = torch.tensor([7, 20, 9, 70, -3, 45], dtype=torch.int32)
    clamped = torch.tensor([0, 20, 20, 50, 50, 50], dtype=torch.int32)
    E = bad.numel() - 1
    out = torch.randn(rows, n, dtype=dtype).cuda()
    u = torch.randn(rows, rank, dtype=dtype).cuda()
    weight = torch.randn(n, rank * E, dtype=dtype).cuda()
    want = out.clone()
    torch.ops.moeforge.lora_expand_add_(want, u, weight, clamped.cuda(), 1.5, True)
    got = out.clone()
    torch.ops.moeforge.lora_expand_add_(got, u, weight, bad.cuda(), 1.5, True)
    assert torch.equal(got, want)
    assert not torch.equal(got, out)


def test_grouped_mm_reads_corrupt_offsets_as_clamped(engine):
    """grouped_mm and grouped_mm_backward on corrupt offsets (negative, decreasing, past the rows)
    give exactly what they give on the same offsets clamped into [0, rows] and made
    non-decreasing, on every engine (torch's engine: launch_expert_row_ends before
    at::_grouped_mm; ours: the kernels' own clamped reads), with no sync and no stray access."""
    torch.manual_seed(3)
    rows, n_in, n_out = 50, 64, 96
    bad = torch.tensor([7, 20, 9, 70, -3, 45], dtype=torch.int32, device="cuda")
    clamped = torch.tensor([0, 20, 20, 50, 50, 50], dtype=torch.int32, device="cuda")
    E = bad.numel() - 1
    x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
    b = torch.randn(E, n_out, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, n_out, device="cuda", dtype=torch.bfloat16)
    for bias in (None, b):
        got = ops.grouped_mm(x, w, bad, bias)
        want = ops.grouped_mm(x, w, clamped, bias)
        assert torch.equal(got, want)
    mask = [True, True, True]
    got = torch.ops.moeforge.grouped_mm_backward(dy, x, w, bad, False, mask)
    want = torch.ops.moeforge.grouped_mm_backward(dy, x, w, clamped, False, mask)
    for g, r in zip(got, want, strict=True):
        assert torch.equal(g, r)


def test_deterministic():
    T, K, E, H = 3000, 8, 64, 256
    ids = random_topk_ids(T, K, E, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    gu = torch.randn(E, 128, H, device="cuda", dtype=torch.bfloat16) / 16
    dn = torch.randn(E, H, 64, device="cuda", dtype=torch.bfloat16) / 8
    runs = [moeforge.moe_experts(x, ids, w, gu, dn) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_moe_layer_forward_backward_in_a_cuda_graph(engine):
    check_layer_in_a_cuda_graph()


@pytest.mark.parametrize("pipeline", ["warp_specialized", "warp_specialized_wide"])
def test_sm90_warp_specialized_layer_in_a_cuda_graph(monkeypatch, pipeline):
    """The warp-specialised pipelines (mbarriers initialised per launch) replay in a graph."""
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 384, 256, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([0, 10, 30, 30, 64], dtype=torch.int32, device="cuda")
    assert sm90_kernel_launched(lambda: ops.grouped_mm(x, w, offs), pipeline)
    check_layer_in_a_cuda_graph()


def check_layer_in_a_cuda_graph():
    """A LoRA MoE layer's forward + backward (and the router losses) captured in a CUDA graph,
    replayed on new input: the loss and every gradient as an eager step computes them."""
    torch.manual_seed(0)
    moe = moeforge.MoE(256, 128, 32, 4, lora_rank=4, device="cuda", dtype=torch.bfloat16)
    for p in moe.experts.lora.parameters():
        torch.nn.init.normal_(p, std=0.05)
    static_x = torch.randn(8, 64, 256, device="cuda", dtype=torch.bfloat16)

    def step():
        out, logits = moe(static_x)
        aux, z = moeforge.router_losses([logits], 4)
        loss = out.float().square().mean() + 0.01 * aux + 0.001 * z
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (allocator, autograd state)
        for _ in range(2):
            moe.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)
    moe.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    static_x.copy_(torch.randn_like(static_x))
    moe.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    graph_grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    graph_loss = static_loss.clone()
    moe.zero_grad(set_to_none=False)
    eager_loss = step()
    torch.testing.assert_close(graph_loss, eager_loss)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(graph_grads[n], p.grad, msg=n)


def is_sm90_gemm_kernel(name: str, pipeline: str | None = None, narrow: bool = False) -> bool:
    """Whether a CUDA kernel name is our row-grouped sm_90a GEMM: for pipeline
    "warp_specialized" the warp-specialised kernel on 128 x 128 tiles (WsShape<1>), for
    "warp_specialized_wide" the one on 128 x 256 tiles (WsShape<2>; WsShape<1> for a `narrow`
    GEMM: one with LoRA's epilogue, which the wide tiles do not hold, or whose columns one
    128-column tile covers), the single-role kernel for the others, any of them for None.
    (Mangled names spell WsShape<n> as WsShapeILin.)"""
    ws = "grouped_gemm_sm90_ws_kernel" in name
    if pipeline is None:
        return ws or "grouped_gemm_sm90_kernel" in name
    if pipeline.startswith("warp_specialized"):
        tiles = 2 if pipeline == "warp_specialized_wide" and not narrow else 1
        return ws and (f"WsShape<{tiles}>" in name or f"WsShapeILi{tiles}E" in name)
    return "grouped_gemm_sm90_kernel" in name


def sm90_kernel_launched(fn, pipeline: str | None = None, narrow: bool = False) -> bool:
    return any(is_sm90_gemm_kernel(name, pipeline, narrow) for name in cuda_kernels_called(fn))


@pytest.mark.parametrize(
    "T,K,E,H,n_out,drop",
    [
        (700, 4, 16, 128, 320, 0.02),  # several k blocks, n tail of a 128-column tile
        (37, 2, 8, 64, 24, 0.1),  # rows < one tile, n < one tile, many empty experts
        (300, 4, 128, 2048, 192, 0.0),  # Qwen3's H and E: 1200 rows over 128 experts
        (96, 4, 32, 2880, 5760, 0.05),  # gpt-oss's H and 2I: an n tail (5760 = 45 x 128)
        (200, 2, 8, 136, 200, 0.05),  # k tail (136 = 2 x 64 + 8), n tail
    ],
)
@pytest.mark.parametrize("pipeline", SM90_PIPELINES)
@pytest.mark.parametrize("transposed", [False, True])
def test_sm90_engine_forward_matches_float64(
    monkeypatch, pipeline, transposed, T, K, E, H, n_out, drop
):
    """MOEFORGE_GROUPED_GEMM=sm90 runs our wgmma kernel (not at::_grouped_mm) for grouped_mm's
    bfloat16 forward in both weight layouts (HF's [E, out, in] read K-major; [E, in, out] read
    MN-major: gpt-oss's forward, and the backward's grad_aw, whose dO is read through the plan
    too), reading token-major x through the plan or x in expert order: both agree with a float64
    reference from the same bf16 inputs (fp32 accumulation: a few bf16 ulps), bitwise with each
    other and across the kernel's two main-loop pipelines, with bias added and dropped rows
    zero."""
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)
    torch.manual_seed(0)
    dt = torch.bfloat16
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=drop, skip_experts=(1,))
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=dt)
    xs = ops.permute(x, plan)
    shape = (E, H, n_out) if transposed else (E, n_out, H)
    w = torch.randn(shape, device="cuda", dtype=dt) / H**0.5
    b = torch.randn(E, n_out, device="cuda", dtype=dt)
    for bias in (None, b):
        want = reference.grouped_mm(
            xs.double(), w.double(), offs, None if bias is None else bias.double(), transposed
        )

        def forward(rows=x, bias=bias, plan=plan):
            return ops.grouped_mm(rows, w, offs, bias, transposed, plan=plan)

        poison_allocator()
        assert sm90_kernel_launched(forward, pipeline, narrow=n_out <= 128)
        called = aten_ops_called(forward)
        assert "aten::_grouped_mm" not in called, sorted(called)
        poison_allocator()
        got = forward()
        assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) output"
        assert torch.equal(got, forward(xs, plan=None))
        assert_normwise_close(got, want, 4e-3)
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1.6e-2, atol=1e-2)
        dropped = int(offs[-1])
        assert (got[dropped:] == 0).all()
        if bias is not None:  # the epilogue's bias: round(round(x W_e) + b_e), bit for bit
            plain = forward(bias=None)
            expert = torch.repeat_interleave(
                torch.arange(E, device="cuda"), offs.diff().long(), output_size=dropped
            )
            want_bits = (plain[:dropped].float() + bias[expert].float()).bfloat16()
            assert torch.equal(got[:dropped], want_bits)
        other = "overlapped" if pipeline == "serial" else "serial"
        monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", other)
        assert torch.equal(forward(), got)
        monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)


@pytest.mark.parametrize("pipeline", SM90_PIPELINES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("through_plan", [False, True])
def test_sm90_engine_backward(monkeypatch, pipeline, transposed, through_plan):
    """Under "sm90" grouped_mm_backward runs only our kernels: grad_x in both weight layouts ([E,
    out, in] read MN-major, [E, in, out] K-major) and the K-grouped weight gradient (x read
    through the plan or in expert order; experts without rows zero; the pipeline's own kernel),
    no at::_grouped_mm; all outputs as "auto" computes them (normwise; only the accumulation
    order differs), dropped rows of grad_x zero."""
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    torch.manual_seed(1)
    T, K, E, n_in, n_out = 300, 4, 12, 136, 264
    dt = torch.bfloat16
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(4,))
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, n_in, device="cuda", dtype=dt)
    rows = x if through_plan else ops.permute(x, plan)
    pairs = (plan.sorted_pairs, plan.pair_to_row) if through_plan else ()
    shape = (E, n_in, n_out) if transposed else (E, n_out, n_in)
    w = torch.randn(shape, device="cuda", dtype=dt) / 12
    dy = torch.randn(T * K, n_out, device="cuda", dtype=dt)

    def backward():
        mask = [True, True, True]
        return torch.ops.moeforge.grouped_mm_backward(dy, rows, w, offs, transposed, mask, *pairs)

    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "auto")
    want = backward()
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)
    names = cuda_kernels_called(backward)
    assert any(is_sm90_gemm_kernel(n, pipeline) for n in names), sorted(names)
    wgrad = (
        "grouped_wgrad_sm90_ws_kernel"  # both warp-specialised pipelines: 128 x 128 tiles
        if pipeline.startswith("warp_specialized")
        else "grouped_wgrad_sm90_kernel"
    )
    assert any(wgrad in n for n in names), sorted(names)
    assert "aten::_grouped_mm" not in aten_ops_called(backward)
    poison_allocator()
    got = backward()
    for name, g, r in zip(("grad_x", "grad_w", "grad_b"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert_normwise_close(g, r, 4e-3, name)
    assert (got[0][int(offs[-1]) :] == 0).all()
    assert (got[1][4] == 0).all()  # expert 4 has no rows


def test_sm90_engine_past_131072_rows(monkeypatch):
    """147456 routed rows of 8192 features: the routed rows span 2.4 GB, so the kernel's row
    offsets into x in expert order pass 2^31 bytes; through the plan and in expert order, as
    "auto" computes them (normwise)."""
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    torch.manual_seed(2)
    T, K, E, H, O = 36864, 4, 64, 8192, 64
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.01)
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    xs = ops.permute(x, plan)
    w = torch.randn(E, O, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "auto")
    want = ops.grouped_mm(xs, w, offs)
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    for pipeline in SM90_PIPELINES:
        monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)
        got = ops.grouped_mm(xs, w, offs)
        assert got.shape == (T * K, O)
        assert_normwise_close(got, want, 4e-3, pipeline)
        assert torch.equal(ops.grouped_mm(x, w, offs, plan=plan), got)


def test_sm90_pipeline_must_be_known(monkeypatch):
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", "pingpong")
    offs, rows = make_offsets([20, 30], 0)
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="MOEFORGE_SM90_PIPELINE"):
        ops.grouped_mm(x, w, offs)


def test_sm90_engine_is_refused_where_it_cannot_run(monkeypatch):
    """Asked for on a device that is not compute capability 9.0, "sm90" raises a named error
    instead of silently measuring another engine."""
    if sm90_engine_applies():
        pytest.skip("this device runs the sm90 engine")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    offs, rows = make_offsets([2, 3], 0)
    x = torch.randn(rows, 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 8, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="MOEFORGE_GROUPED_GEMM=sm90"):
        ops.grouped_mm(x, w, offs)


@pytest.mark.parametrize("through_plan", [False, True])
def test_grouped_mm_swiglu_is_grouped_mm_then_swiglu(monkeypatch, engine, through_plan):
    """h and a of grouped_mm_swiglu on every engine: a is bitwise swiglu(h); h is bitwise
    grouped_mm's on the engines that run the two ops, and under "sm90" (one launch of our kernel,
    the activation in its epilogue, no swiglu kernel) within bf16 rounding of it and of float64
    (its B tiles pair 64 gate with 64 up rows; the per-element k order is the same); dropped rows
    zero in both."""
    torch.manual_seed(4)
    T, K, E, H, I = 700, 4, 16, 256, 200
    dt = torch.bfloat16
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(2,))
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=dt)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    w = torch.randn(E, 2 * I, H, device="cuda", dtype=dt) / H**0.5
    poison_allocator()
    h, a = ops.grouped_mm_swiglu(rows, w, offs, use_plan)
    assert torch.isfinite(h).all() and torch.isfinite(a).all(), "unwritten (NaN-poisoned) rows"
    assert torch.equal(a, ops.swiglu(h))
    want_h = ops.grouped_mm(rows, w, offs, plan=use_plan)
    kept = int(offs[-1])
    assert (h[kept:] == 0).all() and (a[kept:] == 0).all()
    if engine != "sm90":
        assert torch.equal(h, want_h)
        return
    assert_normwise_close(h, want_h, 2e-3, "h vs grouped_mm")
    for pipeline in SM90_PIPELINES:
        monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)

        def fused():
            return ops.grouped_mm_swiglu(rows, w, offs, use_plan)

        assert all(torch.equal(o, f) for o, f in zip(fused(), (h, a), strict=True)), pipeline
        assert sm90_kernel_launched(fused, pipeline), pipeline
    ref = reference.grouped_mm(ops.permute(x, plan).double(), w.double(), offs)
    assert_normwise_close(h, ref, 4e-3, "h vs float64")
    names = cuda_kernels_called(lambda: ops.grouped_mm_swiglu(rows, w, offs, use_plan))
    assert any(is_sm90_gemm_kernel(n) for n in names), sorted(names)
    assert not any("swiglu" in n for n in names), sorted(names)


def coarse(shape, scale=1.0, **kw):
    """Nonzero multiples of 1/8 in [-2, 2] (times a power-of-two scale): LoRA's rank sums of
    their products are exact in fp32 in any order, so every engine's up-projection add gives
    bitwise the same result."""
    q = torch.randint(-16, 16, shape, **kw)
    return ((q + (q >= 0).to(q.dtype)).double() * (scale / 8)).to(torch.bfloat16)


def lora_rule(base, u, lora_weight, offs, scaling, rank_major):
    """round(base + scaling * u M_e) per expert's rows (lora_expand_add_'s rule with an exact
    rank sum and a power-of-two scaling: one fp32 rounding, then bf16's); other rows as base."""
    num_experts, rank, n = offs.numel() - 1, u.shape[1], base.shape[1]
    m = lora_weight.double()
    m = (
        m.view(n, rank, num_experts).permute(2, 1, 0)
        if rank_major
        else m.view(num_experts, rank, n)
    )
    out = base.clone()
    o = offs.tolist()
    for e in range(num_experts):
        exact = (u[o[e] : o[e + 1]].double() @ m[e]).float()
        out[o[e] : o[e + 1]] = (base[o[e] : o[e + 1]].float() + scaling * exact).bfloat16()
    return out


LORA_SHAPES = [  # T, E, H, N, rank, bias
    (500, 16, 200, 328, 16, False),
    (300, 4, 64, 136, 8, True),  # a zero-filled half k16 step
    (300, 4, 64, 136, 64, False),  # four k16 steps
    # 16384 rows x 5 column tiles: more tiles than SMs, so CTAs reload LoRA's tiles for another
    # tile; three k16 steps; the bias first
    (4096, 8, 256, 640, 40, True),
]


@pytest.mark.parametrize("T,E,H,N,R,with_bias", LORA_SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rank_major", [True, False])
@pytest.mark.parametrize("through_plan", [False, True])
def test_grouped_mm_lora_adds_by_lora_expand_adds_rule(
    monkeypatch, engine, transposed, rank_major, through_plan, T, E, H, N, R, with_bias
):
    """grouped_mm_lora on every engine: bitwise the engine's own grouped_mm (with the bias) with
    LoRA's up-projection added by lora_expand_add_'s rule (exact rank sums, so bitwise on every
    engine); under "sm90" one launch of our kernel (the bias and the add in its epilogue, no
    lora_expand_add_ or bias kernel), the same under both pipelines; dropped rows zero; within
    bf16 rounding of float64."""
    torch.manual_seed(5)
    K = 4
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(2,))
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    shape = (E, H, N) if transposed else (E, N, H)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) / H**0.5
    bias = torch.randn(E, N, device="cuda", dtype=torch.bfloat16) if with_bias else None
    u = coarse((T * K, R), device="cuda")
    lora_w = coarse((N, R * E) if rank_major else (E * R, N), scale=0.25, device="cuda")

    def run():
        return ops.grouped_mm_lora(
            rows, w, offs, u, lora_w, 0.5, lora_rank_major=rank_major,
            weight_transposed=transposed, bias=bias, plan=use_plan,
        )  # fmt: skip

    poison_allocator()
    y = run()
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) rows"
    kept = int(offs[-1])
    assert (y[kept:] == 0).all()
    base = ops.grouped_mm(rows, w, offs, bias, transposed, plan=use_plan)
    assert torch.equal(y, lora_rule(base, u, lora_w, offs, 0.5, rank_major))
    if T * K * H * N < 1e8:  # the float64 reference runs on the CPU
        want = reference.lora_expand_add(
            reference.grouped_mm(
                ops.permute(x, plan).double(), w.double(), offs,
                None if bias is None else bias.double(), transposed,
            ),
            u, lora_w, offs, 0.5, rank_major,
        )  # fmt: skip
        assert_normwise_close(y, want, 4e-3, "y vs float64")
    if engine == "sm90":
        names = cuda_kernels_called(run)
        assert any(is_sm90_gemm_kernel(n) for n in names), sorted(names)
        assert not any("lora_expand" in n or "bias" in n for n in names), sorted(names)
        for pipeline in SM90_PIPELINES:
            monkeypatch.setenv("MOEFORGE_SM90_PIPELINE", pipeline)
            assert torch.equal(run(), y), pipeline
            assert sm90_kernel_launched(run, pipeline, narrow=True), pipeline


def test_grouped_mm_lora_falls_back_where_the_sm90_epilogue_does_not_apply(monkeypatch):
    """Rank 12 (not a multiple of 8) or 72 (past one k block) under "sm90": the GEMM on our
    kernel, then lora_expand_add_ - the same rule."""
    if not sm90_engine_applies():
        pytest.skip("the sm90 engine needs a compute capability 9.0 GPU")
    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    torch.manual_seed(7)
    T, K, E, H, N = 200, 2, 4, 64, 128
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.0)
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, H, device="cuda", dtype=torch.bfloat16) / 8
    for rank in (12, 72):
        u = coarse((T * K, rank), device="cuda")
        lora_B = coarse((N, rank * E), scale=0.25, device="cuda")

        def run(u=u, lora_B=lora_B):
            return ops.grouped_mm_lora(x, w, offs, u, lora_B, 0.5, plan=plan)

        names = cuda_kernels_called(run)
        assert any("lora_expand" in n for n in names), (rank, sorted(names))
        base = ops.grouped_mm(x, w, offs, plan=plan)
        assert torch.equal(run(), lora_rule(base, u, lora_B, offs, 0.5, True)), rank


@pytest.mark.parametrize("layout", ["hf", "gpt_oss", "gpt_oss_k_major"])
@pytest.mark.parametrize("through_plan", [False, True])
def test_grouped_mm_swiglu_with_lora_adds_by_the_rule(monkeypatch, engine, layout, through_plan):
    """grouped_mm_swiglu with the gate_up adapter on every engine, HF's layout and gpt-oss's
    (with its bias and clamped interleaved activation): h bitwise the op's h without LoRA with the
    up-projection added by lora_expand_add_'s rule (exact rank sums), a bitwise swiglu(h); under
    "sm90" one kernel (no lora_expand_add_, bias or swiglu kernel)."""
    torch.manual_seed(6)
    T, K, E, H, I, R = 400, 4, 16, 256, 200, 16
    gpt_oss = layout.startswith("gpt_oss")
    transposed = layout == "gpt_oss"  # gpt_oss_k_major: the activation with HF's layout
    ids = random_topk_ids(T, K, E, device="cuda", drop_fraction=0.03, skip_experts=(5,))
    plan = ops.routing(ids, E)
    offs = plan.expert_offsets
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rows = x if through_plan else ops.permute(x, plan)
    use_plan = plan if through_plan else None
    shape = (E, H, 2 * I) if transposed else (E, 2 * I, H)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) / H**0.5
    u = coarse((T * K, R), device="cuda")
    lora_B = coarse((2 * I, R * E), scale=0.25, device="cuda")
    kw, glu = {}, {}
    if gpt_oss:
        glu = {"variant": "gpt_oss", "alpha": 1.5, "limit": 2.0}  # not the default alpha
        kw = {"weight_transposed": transposed, **glu}
        kw["bias"] = torch.randn(E, 2 * I, device="cuda", dtype=torch.bfloat16)

    def run():
        return ops.grouped_mm_swiglu(
            rows, w, offs, use_plan, lora_u=u, lora_B=lora_B, lora_scaling=0.5, **kw
        )

    poison_allocator()
    h, a = run()
    assert torch.isfinite(h).all() and torch.isfinite(a).all(), "unwritten (NaN-poisoned) rows"
    h0, _ = ops.grouped_mm_swiglu(rows, w, offs, use_plan, **kw)
    assert torch.equal(h, lora_rule(h0, u, lora_B, offs, 0.5, True))
    assert torch.equal(a, ops.swiglu(h, **glu))
    kept = int(offs[-1])
    assert (h[kept:] == 0).all() and (a[kept:] == 0).all()
    if engine == "sm90":
        names = cuda_kernels_called(run)
        assert any(is_sm90_gemm_kernel(n) for n in names), sorted(names)
        unwanted = ("lora_expand", "swiglu", "bias")
        assert not any(k in n for n in names for k in unwanted), sorted(names)
