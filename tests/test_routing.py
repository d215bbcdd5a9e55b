import pytest
import torch

from conftest import ROUTING_CASES, random_topk_ids, routing_case_id
from moeforge import ops, reference


@pytest.mark.parametrize("case", ROUTING_CASES, ids=routing_case_id)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_routing_matches_reference(device, case, id_dtype):
    T, K, E, distinct, drop, skip = case
    ids = random_topk_ids(
        T,
        K,
        E,
        device=device,
        dtype=id_dtype,
        distinct=distinct,
        drop_fraction=drop,
        skip_experts=skip,
    )
    plan = ops.routing(ids, E)
    expected = reference.routing(ids.cpu(), E)
    for got, want in zip(plan, expected):
        assert got.dtype == torch.int32 and got.device == ids.device
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    # Experts that nobody chose get empty ranges; dropped pairs have no row.
    for e in skip:
        assert plan.tokens_per_expert[e].item() == 0
    assert plan.expert_offsets[-1].item() == int(((ids >= 0) & (ids < E)).sum())


def test_routing_is_a_permutation_grouped_by_expert(device):
    ids = random_topk_ids(300, 4, 12, device=device, drop_fraction=0.1)
    plan = ops.routing(ids, 12)
    flat = ids.reshape(-1).cpu()
    pairs = plan.sorted_pairs.long().cpu()
    assert torch.equal(pairs.sort().values, torch.arange(flat.numel()))
    offs = plan.expert_offsets.tolist()
    for e in range(12):
        chunk = pairs[offs[e] : offs[e + 1]]
        assert (flat[chunk] == e).all()
        assert (chunk.diff() > 0).all()  # stable: ascending pair index within an expert
    rows = plan.pair_to_row.reshape(-1).long().cpu()
    kept = rows >= 0
    assert torch.equal(pairs[rows[kept]], torch.arange(flat.numel())[kept])


def test_routing_non_contiguous_ids(device):
    base = random_topk_ids(40, 6, 9, device=device)
    ids = base[:, ::2]  # [40, 3], stride 6
    assert not ids.is_contiguous()
    for got, want in zip(ops.routing(ids, 9), reference.routing(ids.contiguous().cpu(), 9)):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_routing_opcheck(device):
    ids = random_topk_ids(17, 2, 5, device=device, drop_fraction=0.2)
    torch.library.opcheck(torch.ops.moeforge.routing.default, (ids, 5))


@pytest.mark.parametrize(
    ("ids", "num_experts", "error", "match"),
    [
        (
            torch.zeros(4, 2, 3, dtype=torch.long),
            4,
            ValueError,
            r"moeforge\.routing: topk_ids must be 2-D \[num_tokens, top_k\], got shape \[4, 2, 3\]",
        ),
        (
            torch.zeros(4, 2),
            4,
            TypeError,
            r"moeforge\.routing: topk_ids must be int32 or int64.*Float",
        ),
        (torch.zeros(4, 2, dtype=torch.long), 0, ValueError, r"num_experts must be >= 1, got 0"),
    ],
)
def test_routing_rejects_bad_input(ids, num_experts, error, match):
    with pytest.raises(error, match=match):
        ops.routing(ids, num_experts)
