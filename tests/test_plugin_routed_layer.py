"""MemoirDownProj and its custom op on a hand-made batch, eager and under torch.compile."""

from __future__ import annotations

import socket

import pytest
import torch
from helpers import synthetic_artifact

from vllm_memoir import request_routes, routing_op
from vllm_memoir.core import NO_ROUTE, masked_residual, unpack_bits
from vllm_memoir.request_routes import RequestRoutes
from vllm_memoir.routing_op import TokenLayout

H, D = 16, 64


@pytest.fixture(scope="module")
def layer():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from vllm_memoir.routed_down_proj import MemoirDownProj

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = VllmConfig()
    # Whole prompts in each forward (prefix caching and chunked prefill off), as the start-up
    # checks require below the last layer; test_a_prompt_in_chunks covers the other case.
    config.cache_config.enable_prefix_caching = False
    config.scheduler_config.enable_chunked_prefill = False
    with set_current_vllm_config(config):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1)
        artifact, features = synthetic_artifact(hidden=H, dim=D, top_k=8, aggregation="mean")
        module = MemoirDownProj(input_size=D, output_size=H, bias=False, prefix="model.layers.1.mlp.down_proj",
                                artifact=artifact)
        torch.nn.init.normal_(module.weight)
        weight = module.weight.detach().clone()
        module.quant_method.process_weights_after_loading(module)  # what vLLM does after loading (may repack)
    return module, artifact, features, weight


@pytest.fixture
def batch(monkeypatch):
    """A RequestRoutes fed by hand, and the token layout the op will see."""
    routes = RequestRoutes()
    layout = {}
    monkeypatch.setattr(request_routes, "_ACTIVE", routes)
    monkeypatch.setattr(routing_op, "current_layout", lambda: layout.get("now"))
    return routes, layout


def base_projection(module, routes, x):
    """The layer's output with no requests routed: vLLM's own down_proj kernel."""
    num_rows, routes.num_rows = routes.num_rows, 0
    try:
        return module(x)[0]
    finally:
        routes.num_rows = num_rows


def edit_residual(artifact, x, edit):
    columns = unpack_bits(artifact.masks[edit:edit + 1], D)[0].nonzero().flatten()
    return masked_residual(x, artifact.memory, columns)


def make_batch(features):
    """Row 0: a 4-token prompt whose mean is edit 1's feature. Row 1: a random 3-token prompt.
    Row 2: a 3-token prompt close to edit 2 recomputed after preemption with 2 generated
    tokens (large values that must not count). Returns x [12, D] and the layout."""
    row0 = features[1].repeat(4, 1) + torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]) * 0.01
    row1 = torch.randn(3, D)
    row2 = torch.cat([features[2].repeat(3, 1), torch.full((2, D), 50.0) * torch.randn(2, D)])
    x = torch.cat([row0, row1, row2]).float()
    return x, TokenLayout(query_start=[0, 4, 7, 12], seq_lens=[4, 3, 5])


@pytest.mark.parametrize("compiled", [False, True])
def test_prefill_routes_from_prompt_positions_and_decode_keeps_the_route(layer, batch, compiled):
    module, artifact, features, _ = layer
    routes, layout = batch
    forward = torch.compile(lambda x: module(x)[0], fullgraph=True, backend="aot_eager") if compiled else (
        lambda x: module(x)[0])
    for row, prompt in enumerate(([1, 2, 3, 4], [5, 6, 7], [8, 9, 10])):
        routes.add(row, prompt, is_new_request=True)
    routes.set_batch(3)
    x, layout["now"] = make_batch(features)
    with torch.no_grad():
        base = base_projection(module, routes, x)
        out = forward(x)
    assert routes.row_routes() == [1, NO_ROUTE, 2]
    assert torch.allclose(out[:4], base[:4] + edit_residual(artifact, x[:4], 1), atol=1e-5)
    assert torch.equal(out[4:7], base[4:7])  # unrouted: bit-identical to the base projection
    assert torch.allclose(out[7:], base[7:] + edit_residual(artifact, x[7:], 2), atol=1e-4)

    # A decode step, rows reordered: one token each, routes kept without seeing the prompt.
    routes.swap(0, 2)
    x_decode = torch.randn(3, D)
    layout["now"] = TokenLayout(query_start=[0, 1, 2, 3], seq_lens=[6, 4, 5])
    with torch.no_grad():
        base = base_projection(module, routes, x_decode)
        out = forward(x_decode)
    assert torch.allclose(out[0], base[0] + edit_residual(artifact, x_decode[:1], 2)[0], atol=1e-5)
    assert torch.equal(out[1], base[1])
    assert torch.allclose(out[2], base[2] + edit_residual(artifact, x_decode[2:], 1)[0], atol=1e-5)


def test_runs_without_requests_leave_the_output_alone(layer, batch):
    module, _, _, weight = layer
    x = torch.randn(5, D)
    with torch.no_grad():
        assert torch.allclose(module(x)[0], torch.nn.functional.linear(x, weight), atol=1e-5)


def test_a_partial_prompt_is_an_error_not_a_silent_misroute(layer, batch):
    module, _, features, _ = layer
    routes, layout = batch
    routes.add(0, [1, 2, 3, 4, 5, 6])
    routes.set_batch(1)
    layout["now"] = TokenLayout(query_start=[0, 4], seq_lens=[4])  # a 4-token chunk of a 6-token prompt
    with pytest.raises(RuntimeError, match="chunked prefill"), torch.no_grad():
        module(torch.randn(4, D))


@pytest.mark.parametrize("dense_from", [1, 10**9], ids=["one-matmul", "per-edit"])
def test_many_edits_in_one_forward_each_row_gets_its_own_edit(layer, batch, monkeypatch, dense_from):
    """The one-matmul path (from DENSE_MIN_EDITS distinct edits) and the per-edit path add the
    same residual to each routed row, and nothing to the unrouted one."""
    from vllm_memoir import routed_down_proj
    from vllm_memoir.core.routing import RouteDecision

    module, artifact, _, _ = layer
    routes, layout = batch
    monkeypatch.setattr(routed_down_proj, "DENSE_MIN_EDITS", dense_from)
    edits = [0, NO_ROUTE, 1, 2, 0]  # row 0: a 3-token prefill; row 1: 2 unrouted tokens; then decodes
    for row, edit in enumerate(edits):
        routes.add(row, [row + 1, 7], is_new_request=True)
    routes.set_batch(len(edits))
    for row, edit in enumerate(edits):
        routes.record(row, RouteDecision(edit, max(edit, 0), 0.9))
    layout["now"] = TokenLayout(query_start=[0, 3, 5, 6, 7, 8], seq_lens=[3, 2, 9, 9, 9])
    x = torch.randn(8, D)
    spans = [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    with torch.no_grad():
        base = base_projection(module, routes, x)
        out = module(x)[0]
    for (start, end), edit in zip(spans, edits):
        if edit == NO_ROUTE:
            assert torch.equal(out[start:end], base[start:end])
        else:
            want = base[start:end] + edit_residual(artifact, x[start:end], edit)
            assert torch.allclose(out[start:end], want, atol=1e-4), (edit, dense_from)


def test_a_prompt_in_chunks_is_routed_when_its_last_token_arrives(layer, batch):
    """Chunked prefill (edits at the last layer): the first chunk stays pending and unrouted,
    the last one is routed as the whole prompt is, from the chunks' per-block input sums."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_memoir.routed_down_proj import MemoirDownProj

    _, artifact, features, _ = layer
    routes, layout = batch
    config = VllmConfig()
    config.cache_config.block_size = 4
    with set_current_vllm_config(config):
        module = MemoirDownProj(input_size=D, output_size=H, bias=False, prefix="model.layers.3.mlp.down_proj",
                                artifact=artifact)
    torch.nn.init.normal_(module.weight)
    module.quant_method.process_weights_after_loading(module)
    # Routes to edit 1 as a whole; its last token alone (all the last chunk holds) does not.
    noise = torch.randn(6, D, generator=torch.Generator().manual_seed(3))
    prompt = torch.cat([features[1].repeat(5, 1) + noise[:5] * 0.05, noise[5:] * 3])
    decide = lambda x: module.router.decide(module.router.prompt_feature(x).unsqueeze(0))[0].route  # noqa: E731
    assert decide(prompt) == 1 and decide(prompt[5:]) != 1
    routes.add(0, list(range(1, 7)), is_new_request=True)
    routes.set_batch(1)
    table = torch.tensor([[9, 4]])  # positions 0-3 in block 9, 4-5 in block 4
    slots = torch.tensor([36, 37, 38, 39, 16, 17])
    with torch.no_grad():
        layout["now"] = TokenLayout([0, 5], [5], slots[:5], table)  # chunk 1: positions 0-4
        base = base_projection(module, routes, prompt[:5])
        assert torch.equal(module(prompt[:5])[0], base)  # no route yet: the base output
        assert routes.row_routes() == [request_routes.PENDING]
        layout["now"] = TokenLayout([0, 1], [6], slots[5:], table)  # chunk 2: position 5, the last
        base = base_projection(module, routes, prompt[5:])
        out = module(prompt[5:])[0]
    assert routes.row_routes() == [1]
    assert torch.allclose(out, base + edit_residual(artifact, prompt[5:], 1), atol=1e-5)
    assert module.route_counts[artifact.edits[1].edit_id] == 1  # decided (and counted) once, at the last chunk
