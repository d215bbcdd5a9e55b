"""The fused routed-experts autograd node (moeforge.fused): what it saves for backward, and every
gradient under every combination of trainable inputs, LoRA, biases, dropped ids and zero or
negative routing weights, against HF's eager loop with PEFT's materialised LoRA in float64."""

import itertools

import pytest
import torch

from conftest import random_topk_ids
from moeforge import reference
from moeforge.functional import ExpertLoRA, moe_experts

T, K, E, H, I, R = 29, 3, 6, 16, 10, 2
SCALING = 0.75


def make_inputs(device, layout, lora, bias, rank=R):
    f64 = {"device": device, "dtype": torch.float64}
    ids = random_topk_ids(T, K, E, device=device, drop_fraction=0.15, skip_experts=(4,))
    weights = torch.rand(T, K, **f64) * 1.5 - 0.25  # some negative
    weights[::4, 0] = 0.0  # exact zeros: dw must not divide by w
    if layout == "hf":
        gu, dn = torch.randn(E, 2 * I, H, **f64) / H**0.5, torch.randn(E, H, I, **f64) / I**0.5
    else:
        gu, dn = torch.randn(E, H, 2 * I, **f64) / H**0.5, torch.randn(E, I, H, **f64) / I**0.5
    leaves = {"x": torch.randn(T, H, **f64), "w": weights, "gu": gu, "dn": dn}
    if bias:
        leaves["gub"] = torch.randn(E, 2 * I, **f64)
        leaves["dnb"] = torch.randn(E, H, **f64)
    if lora:
        leaves["guA"] = torch.randn(E * rank, H, **f64) / H**0.5
        leaves["guB"] = torch.randn(2 * I, rank * E, **f64)
        leaves["dnA"] = torch.randn(E * rank, I, **f64) / I**0.5
        leaves["dnB"] = torch.randn(H, rank * E, **f64)
    return ids, leaves


def run_fused(ids, p, layout):
    kwargs = {"layout": layout}
    if "gub" in p:
        kwargs.update(gate_up_bias=p["gub"], down_bias=p["dnb"])
    if "guA" in p:
        kwargs.update(
            gate_up_lora=ExpertLoRA(p["guA"], p["guB"], SCALING),
            down_lora=ExpertLoRA(p["dnA"], p["dnB"], SCALING),
        )
    return moe_experts(p["x"], ids, p["w"], p["gu"], p["dn"], **kwargs)


def run_reference(ids, p, layout):
    gu, dn = p["gu"], p["dn"]
    if "guA" in p:  # PEFT: W + s * B_e A_e, in the math orientation [E, out, in]
        d_gu = SCALING * reference.peft_expert_delta_weight(p["guA"], p["guB"], E)
        d_dn = SCALING * reference.peft_expert_delta_weight(p["dnA"], p["dnB"], E)
        if layout == "gpt_oss":
            d_gu, d_dn = d_gu.transpose(1, 2), d_dn.transpose(1, 2)
        gu, dn = gu + d_gu, dn + d_dn
    biases = {"gate_up_bias": p["gub"], "down_bias": p["dnb"]} if "gub" in p else {}
    return reference.moe_experts_loop(p["x"], ids, p["w"], gu, dn, layout=layout, **biases)


def trainable_subsets(names):
    """Every single input, the frozen-experts + LoRA set, and all of them."""
    subsets = [(n,) for n in names]
    subsets.append(tuple(n for n in names if n not in ("gu", "dn")))
    subsets.append(tuple(names))
    return subsets


CASES = [
    (layout, lora, bias)
    for layout, lora, bias in itertools.product(["hf", "gpt_oss"], [False, True], [False, True])
    if not (layout == "hf" and bias)
]


def check_every_gradient_subset(ids, leaves, layout):
    for trainable in trainable_subsets(list(leaves)):
        p = {n: t.clone().requires_grad_(n in trainable) for n, t in leaves.items()}
        q = {n: t.clone().requires_grad_(n in trainable) for n, t in leaves.items()}
        out = run_fused(ids, p, layout)
        ref = run_reference(ids, q, layout)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [p[n] for n in trainable], g)
        want = torch.autograd.grad(ref, [q[n] for n in trainable], g)
        for name, a, b in zip(trainable, got, want):
            torch.testing.assert_close(a, b, msg=f"{trainable}: grad of {name}")
            assert a.abs().sum() > 0, name


@pytest.mark.parametrize("layout,lora,bias", CASES)
def test_every_gradient_subset_matches_eager_loop(device, layout, lora, bias):
    ids, leaves = make_inputs(device, layout, lora, bias)
    check_every_gradient_subset(ids, leaves, layout)


@pytest.mark.parametrize("gather_once", [False, True])
@pytest.mark.parametrize("layout,bias", [("hf", False), ("gpt_oss", True)])
def test_torch_engine_lora_path_matches_eager_loop(monkeypatch, layout, bias, gather_once):
    """The path the fused layer takes under torch's grouped GEMM engine (bf16 on Hopper /
    Blackwell only: LoRA's up-projections added in place by lora_expand_add_, x and dO gathered
    once or read through the plan), forced on CPU in float64 with a rank it applies to (8):
    every gradient subset against the eager loop."""
    from moeforge import fused

    monkeypatch.setattr(fused, "_torch_engine", lambda x, num_experts: True)
    monkeypatch.setattr(fused, "_gathers_to_a_copy", lambda *_, **__: gather_once)
    ids, leaves = make_inputs("cpu", layout, lora=True, bias=bias, rank=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        check_every_gradient_subset(ids, leaves, layout)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("moeforge::lora_expand_add_", 0) > 0
    # The adapters' weight gradients reuse the du formed for the inputs' gradients instead of
    # expert_lora_backward forming it again (one read of grad_h / dO fewer per adapter).
    assert calls.get("moeforge::expert_lora_backward", 0) == 0


@pytest.mark.parametrize("layout,bias", [("hf", False), ("gpt_oss", False), ("gpt_oss", True)])
def test_sm90_lora_epilogue_path_matches_eager_loop(monkeypatch, layout, bias):
    """The path under the experimental MOEFORGE_GROUPED_GEMM=sm90 (where grouped_mm_lora and
    grouped_mm_swiglu are one kernel each: the biases and LoRA's up-projections in the base
    GEMMs' epilogues - h, y, grad_aw, grad_x - instead of a bias pass and lora_expand_add_ after
    them), forced on CPU in float64 with a rank it applies to (8): every gradient subset against
    the eager loop."""
    from moeforge import fused

    monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", "sm90")
    monkeypatch.setattr(fused, "_torch_engine", lambda x, num_experts: True)
    ids, leaves = make_inputs("cpu", layout, lora=True, bias=bias, rank=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        check_every_gradient_subset(ids, leaves, layout)
    calls = {e.key: e.count for e in prof.key_averages()}
    subsets = trainable_subsets(list(leaves))
    # Per subset: gate_up (with its adapter and bias) in grouped_mm_swiglu; the down projection
    # in the forward and grad_aw in the backward through grouped_mm_lora, and grad_x where x is
    # trainable.
    with_x = sum("x" in s for s in subsets)
    assert calls.get("moeforge::grouped_mm_swiglu", 0) == len(subsets)
    assert calls.get("moeforge::grouped_mm_lora", 0) == 2 * len(subsets) + with_x
    assert calls.get("moeforge::expert_lora_backward", 0) == 0
    assert calls.get("moeforge::expert_lora", 0) == 0


def test_sm90_lora_path_survives_an_engine_change_between_forward_and_backward(monkeypatch):
    """The engine is read per call: a forward under "sm90" (LoRA in the epilogues) and a backward
    under "auto" (in place), or the other way round, give the same gradients (float64, CPU,
    torch's engine forced)."""
    from moeforge import fused

    monkeypatch.setattr(fused, "_torch_engine", lambda x, num_experts: True)
    ids, leaves = make_inputs("cpu", "gpt_oss", lora=True, bias=True, rank=8)
    results = []
    for forward_engine, backward_engine in (("sm90", "sm90"), ("sm90", "auto"), ("auto", "sm90")):
        p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", forward_engine)
        out = run_fused(ids, p, "gpt_oss")
        monkeypatch.setenv("MOEFORGE_GROUPED_GEMM", backward_engine)
        grads = torch.autograd.grad(out, list(p.values()), torch.ones_like(out))
        results.append([out, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b)


def test_torch_engine_lora_path_beyond_lora_expand_expert_limit(monkeypatch):
    """More experts than lora_expand_add_'s CUDA kernels take: the torch-engine layer keeps
    expert_lora (no in-place adds) and gives the same values and gradients as the default path."""
    from moeforge import fused

    num_experts, tokens, hidden, inter, rank = fused._LORA_EXPAND_MAX_EXPERTS + 3, 6, 8, 8, 8
    f64 = {"dtype": torch.float64}
    ids = random_topk_ids(tokens, 2, num_experts, device="cpu", drop_fraction=0.0)
    leaves = [
        torch.randn(tokens, hidden, **f64),
        torch.rand(tokens, 2, **f64),
        torch.randn(num_experts, 2 * inter, hidden, **f64),
        torch.randn(num_experts, hidden, inter, **f64),
        torch.randn(num_experts * rank, hidden, **f64),
        torch.randn(2 * inter, rank * num_experts, **f64),
        torch.randn(num_experts * rank, inter, **f64),
        torch.randn(hidden, rank * num_experts, **f64),
    ]

    def run():
        x, w, gu, dn, gA, gB, dA, dB = (t.clone().requires_grad_(i != 2 and i != 3) for i, t in
                                        enumerate(leaves))  # fmt: skip
        out = moe_experts(
            x, ids, w, gu, dn,
            gate_up_lora=ExpertLoRA(gA, gB, SCALING), down_lora=ExpertLoRA(dA, dB, SCALING),
        )  # fmt: skip
        grads = torch.autograd.grad(out, [x, w, gA, gB, dA, dB], torch.ones_like(out))
        return [out, *grads]

    want = run()
    monkeypatch.setattr(fused, "_torch_engine", lambda x, num_experts: True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = run()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("moeforge::lora_expand_add_", 0) == 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_dropped_pairs_get_zero_weight_gradient(device):
    ids, leaves = make_inputs(device, "gpt_oss", lora=False, bias=True)
    w = leaves["w"].clone().requires_grad_()
    out = run_fused(ids, {**leaves, "w": w}, "gpt_oss")
    (grad_w,) = torch.autograd.grad(out, w, torch.randn_like(out))
    dropped = (ids < 0) | (ids >= E)
    assert dropped.any()
    assert (grad_w[dropped] == 0).all() and (grad_w[~dropped] != 0).all()


@pytest.mark.parametrize("lora", [False, True])
def test_backward_saves_only_input_preactivation_and_plan(lora):
    """Nothing of size [S, H] or [S, I] is kept: the expert outputs, the activation and the
    permuted input are recomputed or never needed."""
    ids, leaves = make_inputs("cpu", "hf", lora, bias=False)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    out, saved = _run_saving(ids, p)
    inputs = {t.data_ptr() for t in [ids, *p.values()]}
    new = sorted((tuple(t.shape) for t in saved if t.data_ptr() not in inputs), key=str)
    S = T * K
    expected = [(S,), (T, K), (E + 1,), (S, 2 * I)] + ([(S, R), (S, R)] if lora else [])
    assert new == sorted(expected, key=str)
    out.sum().backward()  # and the saved set suffices
    assert all(t.grad is not None for t in p.values())


def _run_saving(ids, p):
    """The fused layer's output and every tensor its forward saved (as backward unpacks them)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_fused(ids, p, "hf")
    return out, saved


class _FirstOutputOfShape(torch.utils._python_dispatch.TorchDispatchMode):
    """Keeps the first tensor of the given shape that an op in the block returns (the tensor
    object the caller receives)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.tensor = tuple(shape), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if self.tensor is None and isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.tensor = t
        return out


def _run_keeping_preactivation(ids, p):
    """The layer's output and its pre-activation h [S, 2I] (the tensor its forward saves), caught
    without a saved-tensor hook (with one active the backward leaves h alone)."""
    with _FirstOutputOfShape((T * K, 2 * I)) as caught:
        out = run_fused(ids, p, "hf")
    return out, caught.tensor


class _BackwardBuffers(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, for every op dispatched in the block, its name, the data pointer of its first
    argument and the data pointers of its outputs of a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.calls, self.outputs = tuple(shape), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = args[0].data_ptr() if args and isinstance(args[0], torch.Tensor) else None
        self.calls.append((str(func.overloadpacket), first))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for t in results:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.outputs.append((str(func.overloadpacket), t.data_ptr()))
        return out


@pytest.mark.parametrize("lora", [False, True])
def test_backward_writes_grad_h_over_the_preactivation(device, lora):
    """The activation's backward, the last reader of the saved h [S, 2I], writes grad_h over it
    (weighted_swiglu_backward_ on h itself): no op of the backward makes another [S, 2I] tensor,
    and the gradients stay those of the eager loop."""
    ids, leaves = make_inputs(device, "hf", lora, bias=False)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    q = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    out, h = _run_keeping_preactivation(ids, p)
    g = torch.randn_like(out)
    with _BackwardBuffers(h.shape) as seen:
        out.backward(g)
    names = [name for name, _ in seen.calls]
    assert "moeforge.weighted_swiglu_backward" not in names
    assert ("moeforge.weighted_swiglu_backward_", h.data_ptr()) in seen.calls
    assert seen.outputs == [], seen.outputs  # no second [S, 2I] buffer
    run_reference(ids, q, "hf").backward(g)
    for name in p:
        torch.testing.assert_close(p[name].grad, q[name].grad, msg=f"grad of {name}")


def test_preactivation_handed_back_by_a_hook_is_left_alone():
    """A saved-tensor hook that hands back its own tensor (offloading, a reused buffer) owns that
    memory: the backward does not write over it, and the gradients are unchanged."""
    ids, leaves = make_inputs("cpu", "hf", lora=True, bias=False)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    q = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    kept = []

    def unpack(t):
        kept.append((t.clone(), t.clone()))  # the hook's own copy, and its value
        return kept[-1][0]

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        out = run_fused(ids, p, "hf")
        g = torch.randn_like(out)
        out.backward(g)
    ((h, value),) = [pair for pair in kept if tuple(pair[0].shape) == (T * K, 2 * I)]
    assert torch.equal(h, value)
    run_reference(ids, q, "hf").backward(g)
    for name in p:
        torch.testing.assert_close(p[name].grad, q[name].grad, msg=f"grad of {name}")


def test_preactivation_kept_by_a_hook_is_left_alone():
    """A saved-tensor hook that stores the very tensor it is given and hands it back unchanged
    (a stash read after the backward): with any hook active, the backward does not write over h."""
    ids, leaves = make_inputs("cpu", "hf", lora=False, bias=False)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    stash = []

    def pack(t):
        stash.append((t, t.clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_fused(ids, p, "hf")
        out.backward(torch.randn_like(out))
    ((h, value),) = [pair for pair in stash if tuple(pair[0].shape) == (T * K, 2 * I)]
    assert torch.equal(h, value)


def test_retained_graph_keeps_the_preactivation():
    """With retain_graph the graph may run again: h is kept as it was and a second backward gives
    the same gradients as the first (and, being the last, writes grad_h over h)."""
    ids, leaves = make_inputs("cpu", "hf", lora=True, bias=False)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    out, h = _run_keeping_preactivation(ids, p)
    value = h.clone()
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, list(p.values()), g, retain_graph=True)
    assert torch.equal(h, value)
    second = torch.autograd.grad(out, list(p.values()), g)
    for name, a, b in zip(p, first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"grad of {name}")
    assert not torch.equal(h, value)  # the last backward wrote grad_h over it


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout,lora,bias", CASES)
def test_permuted_copies_are_not_made(layout, lora, bias):
    """The fused layer dispatches no permute op, forward or backward, except for the weighted dO
    rows a trainable down bias sums: x and dO reach the GEMMs through the plan. (Nested calls
    inside the ops are not seen: the CPU kernels still gather a copy internally; the CUDA kernels
    gather in their loads, which tests/test_cuda.py checks bitwise.)"""
    ids, leaves = make_inputs("cpu", layout, lora, bias)
    p = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    with _OpLog() as forward:
        out = run_fused(ids, p, layout)
    with _OpLog() as backward:
        out.backward(torch.randn_like(out))
    assert "moeforge.permute" not in forward.names
    assert backward.names.count("moeforge.permute") == (1 if bias else 0)
    assert "moeforge.weighted_swiglu_backward_" in backward.names
