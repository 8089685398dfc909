"""route_margin: route only when the best edit's overlap beats the second best's by a margin
(issue 13 part 3). The math against a dense per-prompt reference, both matching paths, the
hyperparameter and the manifest field (older manifests read as 0.0)."""

from __future__ import annotations

import json

import pytest
import torch

import vllm_memoir.core.tophash as tophash
from edit_tools.hparams import HParamsError, MemoirHyperParams
from vllm_memoir.core import NO_ROUTE, match_routes, pack_indices, tophash_indices, unpack_bits
from vllm_memoir.core.artifact import ArtifactError, ArtifactManifest
from vllm_memoir.core.routing import EditRouter
from vllm_memoir.core.tophash import best_overlaps, route_gap, top_two_overlaps

DIM = 300  # not a multiple of 64: the padded last word
K = 60


def _random_masks(rows: int, k: int = K, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return tophash_indices(torch.randn(rows, DIM, generator=gen), k, torch.randperm(DIM, generator=gen))


def _dense_reference(query, stored, top_k, threshold, margin, enabled=None):
    """One prompt at a time over the whole [E] count row: best = first maximum, second = the
    maximum of the other enabled rows (0 when none), route iff both checks pass."""
    dense_s = unpack_bits(stored, DIM).float()
    routes, bests, seconds = [], [], []
    for row in unpack_bits(query, DIM).float():
        counts = (dense_s @ row).long()
        if enabled is not None:
            counts[~enabled] = -1
        best = int(counts.argmax())
        others = torch.cat([counts[:best], counts[best + 1:]])
        second = int(others.max()) if len(others) else -1
        count = int(counts[best])
        overlap = float(torch.tensor(max(count, 0), dtype=torch.float32) / top_k)
        gap = float(torch.tensor(max(count, 0) - max(second, 0), dtype=torch.float32) / top_k)
        routes.append(best if count >= 0 and overlap >= threshold and gap >= margin else NO_ROUTE)
        bests.append(best)
        seconds.append(second)
    return routes, bests, seconds


def _stored_with_near_ties():
    """200 random masks, with rows that tie exactly (within and across blocks) and a row that
    differs from another by one bit (a near tie), and queries equal to some of them."""
    stored_idx = _random_masks(200, seed=5)
    stored_idx[150], stored_idx[199] = stored_idx[3], stored_idx[3]  # exact ties with row 3
    near = stored_idx[10].clone()
    free = sorted(set(range(DIM)) - set(near.tolist()))
    near[0] = free[0]  # row 120 shares K - 1 bits with row 10
    stored_idx[120] = torch.sort(near).values
    stored = pack_indices(stored_idx, DIM)
    query = pack_indices(torch.cat([stored_idx[[3, 10, 120, 150]], _random_masks(29, seed=6)]), DIM)
    return stored, query


def _enabled_cases():
    gen = torch.Generator().manual_seed(7)
    one = torch.zeros(200, dtype=torch.bool)
    one[10] = True
    return [None, torch.rand(200, generator=gen) > 0.4, torch.zeros(200, dtype=torch.bool), one]


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64])
def test_top_two_equals_the_dense_reference(chunk_rows):
    stored, query = _stored_with_near_ties()
    for enabled in _enabled_cases():
        _, want_best, want_second = _dense_reference(query, stored, K, 0.0, 0.0, enabled)
        best_count, best_row, second_count = top_two_overlaps(query, stored, enabled, chunk_rows)
        assert best_row.tolist() == want_best and second_count.tolist() == want_second
        # best_overlaps is the same scan without the runner-up.
        count, row = best_overlaps(query, stored, enabled, chunk_rows)
        assert torch.equal(count, best_count) and torch.equal(row, best_row)


@pytest.mark.parametrize("margin", [0.0, 0.01, 0.02, 0.1, 0.5])
@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_match_routes_equals_the_dense_reference(threshold, margin):
    stored, query = _stored_with_near_ties()
    for enabled in _enabled_cases():
        want = _dense_reference(query, stored, K, threshold, margin, enabled)
        route, best, overlap = match_routes(query, stored, K, threshold, enabled, route_margin=margin)
        assert route.tolist() == want[0] and best.tolist() == want[1]


def test_margin_zero_is_the_match_without_a_margin():
    """The default reproduces the reference's match exactly: the same tensors, bit for bit."""
    stored, query = _stored_with_near_ties()
    for enabled in _enabled_cases():
        for threshold in (0.0, 0.3, 0.79, 1.0):
            old = match_routes(query, stored, K, threshold, enabled)
            new = match_routes(query, stored, K, threshold, enabled, route_margin=0.0)
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(old, new))


def test_a_margin_refuses_near_ties_and_ties():
    stored, query = _stored_with_near_ties()
    # Query 1 is row 10; row 120 differs by one bit: gap 1/60. Query 0 is row 3, tied with
    # rows 150 and 199: gap 0. Query 2 is row 120 (row 10 one bit behind).
    route, _, _ = match_routes(query[:3], stored, K, 0.5)
    assert route.tolist() == [3, 10, 120]  # no margin: earliest of the ties, the near-tie's best
    route, _, _ = match_routes(query[:3], stored, K, 0.5, route_margin=1 / K)
    assert route.tolist() == [NO_ROUTE, 10, 120]  # a gap of exactly the margin routes
    route, _, _ = match_routes(query[:3], stored, K, 0.5, route_margin=1.5 / K)
    assert route.tolist() == [NO_ROUTE, NO_ROUTE, NO_ROUTE]


def test_disabled_edits_are_neither_best_nor_second():
    stored, query = _stored_with_near_ties()
    enabled = torch.ones(200, dtype=torch.bool)
    enabled[120] = False  # the near-tie rival of row 10 is off: row 10 stands out again
    route, _, _ = match_routes(query[1:2], stored, K, 0.5, enabled, route_margin=0.1)
    assert route.tolist() == [10]
    enabled[[3, 150]] = False  # of the three-way tie only row 199 is left: no rival
    route, best, _ = match_routes(query[0:1], stored, K, 0.5, enabled, route_margin=0.1)
    assert route.tolist() == [199] and best.tolist() == [199]


def test_one_enabled_edit_has_second_overlap_zero():
    stored, query = _stored_with_near_ties()
    only = torch.zeros(200, dtype=torch.bool)
    only[10] = True
    best, row, second = top_two_overlaps(query[1:2], stored, only)
    assert (best.item(), row.item(), second.item()) == (K, 10, -1)
    assert route_gap(best, second, K).item() == 1.0
    route, _, _ = match_routes(query[1:2], stored, K, 0.9, only, route_margin=1.0)
    assert route.tolist() == [10]
    # Nothing enabled: nothing routes, whatever the margin.
    route, _, _ = match_routes(query, stored, K, 0.0, torch.zeros(200, dtype=torch.bool), route_margin=0.01)
    assert set(route.tolist()) == {NO_ROUTE}


@pytest.mark.parametrize("queries", [1, 9])  # both sides of MATMUL_MIN_QUERIES
@pytest.mark.parametrize("chunk_rows", [None, 7, 64])
def test_numpy_and_torch_paths_find_the_same_top_two(queries, chunk_rows, monkeypatch):
    """The CPU path (numpy reduction) and the torch path a GPU runs, block by block."""
    stored, query = _stored_with_near_ties()
    for enabled in _enabled_cases():
        on_numpy = top_two_overlaps(query[:queries], stored, enabled, chunk_rows)
        with monkeypatch.context() as patch:
            patch.setattr(tophash, "_on_numpy", lambda stored: False)
            on_torch = top_two_overlaps(query[:queries], stored, enabled, chunk_rows)
        assert all(torch.equal(a, b) for a, b in zip(on_numpy, on_torch))


@pytest.mark.parametrize("queries", [1, 3, 4, 9])
def test_numpy_and_torch_paths_route_the_same(queries, monkeypatch):
    stored, query = _stored_with_near_ties()
    margins = (0.0, 1 / K, 0.02, 0.3)
    for enabled in _enabled_cases():
        on_numpy = [match_routes(query[:queries], stored, K, 0.3, enabled, route_margin=m) for m in margins]
        with monkeypatch.context() as patch:
            patch.setattr(tophash, "_on_numpy", lambda stored: False)
            on_torch = [match_routes(query[:queries], stored, K, 0.3, enabled, route_margin=m) for m in margins]
        for a, b in zip(on_numpy, on_torch):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_match_routes_refuses_a_margin_outside_0_to_1():
    stored, query = _stored_with_near_ties()
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match="route_margin"):
            match_routes(query, stored, K, 0.5, route_margin=bad)


def test_hyperparameter_default_and_range():
    assert MemoirHyperParams().validate().route_margin == 0.0
    assert MemoirHyperParams.from_dict({"route_margin": 0.03}).route_margin == 0.03
    for bad in (-0.1, 1.5, "wide"):
        with pytest.raises(HParamsError, match="route_margin"):
            MemoirHyperParams.from_dict({"route_margin": bad}, "facts.yaml")


def _manifest_json(**extra) -> dict:
    return {"base_model": "m", "base_fingerprint": "f", "module_path": "model.layers.0.mlp.down_proj",
            "layer_index": 0, "hidden_size": 8, "intermediate_size": DIM, "dtype": "float32", "top_k": K,
            "irr_threshold": 0.5, "aggregation": "mean", "format_version": 1, **extra}


def test_manifests_without_the_field_read_as_zero_and_with_it_as_written():
    assert ArtifactManifest.from_json(_manifest_json(), "old/manifest.json").route_margin == 0.0
    manifest = ArtifactManifest.from_json(_manifest_json(route_margin=0.03), "new/manifest.json")
    assert manifest.route_margin == 0.03
    import dataclasses
    again = json.loads(json.dumps(dataclasses.asdict(manifest)))
    assert ArtifactManifest.from_json(again, "again").route_margin == 0.03
    for bad, says in ((1.5, "outside 0..1"), (-0.1, "outside 0..1"), ("0.1", "must be a number")):
        with pytest.raises(ArtifactError, match=says):
            ArtifactManifest.from_json(_manifest_json(route_margin=bad), "bad/manifest.json")


def test_the_router_routes_with_the_manifest_margin():
    """EditRouter (the transformers path and the plugin's decide_tensors) takes the margin
    from the manifest: a prompt between two near-equal edits is refused only with it."""
    from vllm_memoir.core import MemoirArtifact
    from vllm_memoir.routing.decisions import ShardedPromptRouter

    gen = torch.Generator().manual_seed(3)
    permutation = torch.randperm(DIM, generator=gen)
    base = torch.randn(DIM, generator=gen)
    rival = base.clone()
    rival[torch.topk(base.abs(), K).indices[-3:]] = 0.0  # drops 3 of the top-K dims
    stored = pack_indices(tophash_indices(torch.stack([base, rival]), K, permutation), DIM)
    manifest = ArtifactManifest.from_json(_manifest_json(route_margin=0.0), "m")
    artifact = MemoirArtifact(manifest=manifest, memory=torch.zeros(8, DIM), masks=stored,
                              permutation=permutation, background_mean=None, edits=[])
    artifact.edits = _records(2)
    query = base.unsqueeze(0)
    for margin, route in ((0.0, 0), (0.1, NO_ROUTE), (0.05, 0)):  # the gap is 3 / 60 = 0.05
        manifest.route_margin = margin
        assert [d.route for d in EditRouter(artifact).route_features(query)] == [route]
        # The plugin's decisions (decide_tensors) go through the same router.
        sharded = ShardedPromptRouter(artifact, tp_rank=0, tp_size=1, device=torch.device("cpu"))
        assert sharded.decide_tensors(query)[0].tolist() == [route]


def _records(count: int):
    from vllm_memoir.core.artifact import EditRecord

    return [EditRecord(edit_id=i, prompt=f"p{i}", target=f"t{i}") for i in range(count)]
