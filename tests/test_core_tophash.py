import pytest
import torch

from vllm_memoir.core import (
    NO_ROUTE,
    aggregate_prompt_feature,
    masked_residual,
    match_routes,
    overlap_counts,
    pack_indices,
    residual_by_route,
    tophash_indices,
    unpack_bits,
    unpack_indices,
)

DIM = 300  # not a multiple of 64: exercises the padded last word


def _random_masks(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, DIM, generator=gen)
    return tophash_indices(feats, k, torch.randperm(DIM, generator=gen))


def test_tophash_is_topk_then_permutation():
    feature = torch.zeros(1, DIM)
    feature[0, [3, 10, 200]] = torch.tensor([-5.0, 4.0, 3.0])  # |.| decides, not the sign
    perm = torch.randperm(DIM)
    got = tophash_indices(feature, 3, perm)[0]
    assert got.tolist() == sorted(perm[[3, 10, 200]].tolist())


def test_pack_roundtrip_and_popcount():
    idx = _random_masks(7, 41)
    packed = pack_indices(idx, DIM)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 40)
    for row, back in zip(idx, unpack_indices(packed, DIM)):
        assert torch.equal(row, back)
    dense = unpack_bits(packed, DIM).float()
    assert torch.equal(overlap_counts(packed, packed), (dense @ dense.T).int())


def test_overlap_counts_chunked_matches_unchunked():
    stored = pack_indices(_random_masks(50, 30, seed=1), DIM)
    query = pack_indices(_random_masks(3, 30, seed=2), DIM)
    assert torch.equal(overlap_counts(query, stored, chunk_rows=7), overlap_counts(query, stored))


def _torch_path_counts(query: torch.Tensor, stored: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """overlap counts through the pure-torch path (the one a GPU runs), on CPU."""
    from vllm_memoir.core.tophash import _block_counts_torch

    blocks = _block_counts_torch(query.view(torch.int64), stored.view(torch.int64), chunk_rows)
    return torch.cat([counts for _, counts in blocks], dim=1).int()


@pytest.mark.parametrize("queries", [1, 3, 4, 9])  # both sides of MATMUL_MIN_QUERIES
def test_native_and_torch_paths_agree(queries):
    """The CPU path (numpy popcount) and the torch path used on GPU (SWAR for few queries, a
    float matrix product for more) give the dense formula's counts."""
    stored = pack_indices(_random_masks(50, 30, seed=3), DIM)
    query = pack_indices(_random_masks(queries, 30, seed=4), DIM)
    dense_s, dense_q = unpack_bits(stored, DIM).float(), unpack_bits(query, DIM).float()
    expected = (dense_q @ dense_s.T).int()
    assert torch.equal(_torch_path_counts(query, stored, chunk_rows=9), expected)
    assert torch.equal(overlap_counts(query, stored), expected)


def _per_prompt_reference(query, stored, top_k, threshold, enabled=None):
    """match_routes as it was: one prompt at a time, the whole [E] count row, max over it."""
    dense_s = unpack_bits(stored, stored.shape[1] * 8).float()
    routes, bests, overlaps = [], [], []
    for row in unpack_bits(query, query.shape[1] * 8).float():
        counts = (dense_s @ row).long()
        if enabled is not None:
            counts[~enabled] = -1
        best = int(counts.argmax()) if len(counts) else NO_ROUTE  # argmax: the first maximum
        count = int(counts[best])
        overlap = float(torch.tensor(max(count, 0), dtype=torch.float32) / top_k)  # float32, as served
        routes.append(best if count >= 0 and overlap >= threshold else NO_ROUTE)
        bests.append(best)
        overlaps.append(overlap)
    return routes, bests, overlaps


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64])
def test_batched_match_equals_the_per_prompt_reference(chunk_rows):
    """Many prompts in one pass over the stored masks route exactly as one at a time: random
    masks, exact duplicates across block borders (ties -> earliest), disabled edits."""
    from vllm_memoir.core.tophash import best_overlaps

    k = 60
    stored_idx = _random_masks(200, k, seed=5)
    # Rows 150 and 199 duplicate rows 3 and 150: ties inside and across blocks.
    stored_idx[150], stored_idx[199] = stored_idx[3], stored_idx[3]
    stored = pack_indices(stored_idx, DIM)
    query = pack_indices(torch.cat([stored_idx[[3, 10, 150]], _random_masks(29, k, seed=6)]), DIM)
    gen = torch.Generator().manual_seed(7)
    for enabled in (None, torch.rand(200, generator=gen) > 0.4, torch.zeros(200, dtype=torch.bool)):
        for threshold in (0.3, 0.9):
            want = _per_prompt_reference(query, stored, k, threshold, enabled)
            route, best, overlap = match_routes(query, stored, k, threshold, enabled)
            assert (route.tolist(), best.tolist(), overlap.tolist()) == want
            if chunk_rows is not None:  # the same result block by block, on both paths
                count, row = best_overlaps(query, stored, enabled, chunk_rows)
                assert row.tolist() == want[1] and (count.clamp(min=0).float() / k).tolist() == want[2]
    # The torch path's reduction (the GPU's) agrees too.
    import vllm_memoir.core.tophash as tophash
    original = tophash._on_numpy
    tophash._on_numpy = lambda stored: False
    try:
        enabled = torch.rand(200, generator=gen) > 0.4
        assert [t.tolist() for t in match_routes(query, stored, k, 0.3, enabled)] == \
            list(_per_prompt_reference(query, stored, k, 0.3, enabled))
    finally:
        tophash._on_numpy = original


def test_match_routes_threshold_ties_and_disabled():
    stored_idx = _random_masks(4, 20)
    stored = pack_indices(torch.cat([stored_idx, stored_idx[1:2]]), DIM)  # row 4 duplicates row 1
    query = pack_indices(stored_idx[[1, 2]], DIM)
    route, best, overlap = match_routes(query, stored, 20, 0.9)
    assert route.tolist() == [1, 2]  # tie between rows 1 and 4 goes to the earlier edit
    assert overlap.tolist() == [1.0, 1.0]
    enabled = torch.tensor([True, False, True, True, True])
    route, _, _ = match_routes(query, stored, 20, 0.9, enabled)
    assert route.tolist() == [4, 2]
    # An unrelated query stays below the threshold and is not routed.
    other = pack_indices(_random_masks(1, 20, seed=9), DIM)
    route, _, overlap = match_routes(other, stored, 20, 0.9)
    assert route.tolist() == [NO_ROUTE] and overlap.item() < 0.9


def test_match_routes_with_no_edits():
    route, best, overlap = match_routes(pack_indices(_random_masks(2, 5), DIM), torch.zeros(0, 40, dtype=torch.uint8), 5, 0.1)
    assert route.tolist() == [NO_ROUTE, NO_ROUTE] and overlap.tolist() == [0.0, 0.0]


def test_masked_residual_equals_dense_formula():
    x = torch.randn(5, DIM, dtype=torch.float64)
    memory = torch.randn(16, DIM, dtype=torch.float64)
    idx = _random_masks(1, 33)[0]
    mask = torch.zeros(DIM, dtype=torch.float64)
    mask[idx] = 1
    assert torch.allclose(masked_residual(x, memory, idx), (x * mask) @ memory.T)


def test_residual_by_route_is_exactly_zero_when_unrouted():
    # Seeded: on unseeded float32 inputs an entry near zero could differ from the per-token
    # product by more than allclose's absolute 1e-8 (summation order), depending on which tests
    # ran before and drew from the global generator.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, DIM, generator=gen)
    memory = torch.randn(8, DIM, generator=gen)
    idx = _random_masks(2, 25)
    packed = pack_indices(idx, DIM)
    routes = torch.tensor([NO_ROUTE, 0, 1, NO_ROUTE, 1, 0])
    out = residual_by_route(x, memory, routes, packed)
    assert torch.equal(out[[0, 3]], torch.zeros(2, 8))
    for token, edit in [(1, 0), (2, 1), (4, 1), (5, 0)]:
        assert torch.allclose(out[token], masked_residual(x[token], memory, idx[edit]))


def test_aggregations_ignore_padding():
    x = torch.randn(2, 4, 6)
    prompt = torch.tensor([[True, True, False, False], [False, True, True, True]])
    mean = aggregate_prompt_feature(x, prompt, "mean")
    assert torch.allclose(mean[0], x[0, :2].mean(0)) and torch.allclose(mean[1], x[1, 1:].mean(0))
    last = aggregate_prompt_feature(x, prompt, "last")
    assert torch.equal(last[0], x[0, 1]) and torch.equal(last[1], x[1, 3])
    bg = torch.randn(6)
    assert torch.allclose(aggregate_prompt_feature(x, prompt, "mean_decentered", bg), mean - bg)
    with pytest.raises(ValueError, match="background"):
        aggregate_prompt_feature(x, prompt, "mean_decentered")
    with pytest.raises(ValueError, match="unknown prompt_feature_agg"):
        aggregate_prompt_feature(x, prompt, "max")


def test_dense_masked_residual_equals_the_gathered_one_per_token():
    from vllm_memoir.core import dense_masked_residual, masked_residual

    gen = torch.Generator().manual_seed(3)
    memory, x = torch.randn(16, 64, generator=gen), torch.randn(5, 64, generator=gen)
    columns = [torch.randperm(64, generator=gen)[:12] for _ in range(5)]
    masks = torch.zeros(5, 64, dtype=torch.bool)
    for token, cols in enumerate(columns):
        masks[token, cols] = True
    dense = dense_masked_residual(x, memory, masks)
    for token, cols in enumerate(columns):
        assert torch.allclose(dense[token], masked_residual(x[token:token + 1], memory, cols)[0], atol=1e-5)
