"""MemoirDownProj and its custom op on a hand-made batch, eager and under torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import init_single_rank_vllm, synthetic_artifact

from vllm_memoir.core import NO_ROUTE, masked_residual, unpack_bits
from vllm_memoir.routing import requests as request_routes
from vllm_memoir.routing.layout import TokenLayout
from vllm_memoir.routing.requests import RequestRoutes

H, D = 16, 64


@pytest.fixture(scope="module")
def layer():
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    # Whole prompts in each forward (prefix caching and chunked prefill off), as the start-up
    # checks require below the last layer; test_a_prompt_in_chunks covers the other case.
    config.cache_config.enable_prefix_caching = False
    config.scheduler_config.enable_chunked_prefill = False
    with set_current_vllm_config(config):
        init_single_rank_vllm()
        artifact, features = synthetic_artifact(hidden=H, dim=D, top_k=8, aggregation="mean")
        module, weight = wrapped_layer(artifact, "model.layers.1.mlp.down_proj")
    return module, artifact, features, weight


def wrapped_layer(artifact, prefix):
    """A loaded RowParallelLinear (random weights) wrapped in a MemoirDownProj, as the model class does."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_memoir.routing.layer import MemoirDownProj

    base = RowParallelLinear(input_size=D, output_size=H, bias=False, prefix=prefix)
    torch.nn.init.normal_(base.weight)
    weight = base.weight.detach().clone()
    base.quant_method.process_weights_after_loading(base)  # what vLLM does after loading (may repack)
    return MemoirDownProj(base, artifact), weight


@pytest.fixture
def batch(monkeypatch):
    from vllm_memoir.routing import step as routing_step

    """A RequestRoutes fed by hand, and the token layout the op will see."""
    routes = RequestRoutes()
    layout = {}
    monkeypatch.setattr(request_routes, "_ACTIVE", routes)
    monkeypatch.setattr(routing_step, "current_layout", lambda: layout.get("now"))
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
    routes.add(1, [1, 2, 3])
    routes.set_batch(2)
    # Row 0: the last 2 tokens of a 6-token prompt, the first 4 never seen here; row 1 whole.
    layout["now"] = TokenLayout(query_start=[0, 2, 5], seq_lens=[6, 3])
    with torch.no_grad():
        module(torch.randn(5, D))
    # Decided on the device; the host finds out when it reads the decisions back.
    with pytest.raises(RuntimeError, match="chunked prefill"):
        routes.row_routes()


def test_many_edits_in_one_forward_each_row_gets_its_own_edit(layer, batch):
    """One matmul adds each routed row its own edit's residual, and nothing to the unrouted one."""
    from vllm_memoir.core.routing import RouteDecision

    module, artifact, _, _ = layer
    routes, layout = batch
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
            assert torch.allclose(out[start:end], want, atol=1e-4), edit


def test_a_prompt_in_chunks_is_routed_when_its_last_token_arrives(layer, batch):
    """Chunked prefill (edits at the last layer): the first chunk stays pending and unrouted,
    the last one is routed as the whole prompt is, from the chunks' per-block input sums."""
    from vllm.config import VllmConfig, set_current_vllm_config

    _, artifact, features, _ = layer
    routes, layout = batch
    config = VllmConfig()
    config.cache_config.block_size = 4
    config.cache_config.enable_prefix_caching = True
    with set_current_vllm_config(config):
        module, _ = wrapped_layer(artifact, "model.layers.3.mlp.down_proj")
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
    # Counted once, when the host reads the decision back (at the next forward: a decode step).
    with torch.no_grad():
        layout["now"] = TokenLayout([0, 1], [7], torch.tensor([18]), table)
        module(torch.randn(1, D))
    assert module.route_counts[artifact.edits[1].edit_id] == 1


def test_decode_step_is_a_pure_tensor_function_that_compiles_without_graph_breaks():
    """The decode step (no prompt to decide) reads only persistent buffers: torch.compile with
    fullgraph=True traces it whole, and it equals the eager step, including the block sums it
    records (span routing's tails and heads too). Unrouted rows keep the base output bit for
    bit; routed rows get their edit's residual."""
    from vllm_memoir.routing.decisions import ShardedPromptRouter
    from vllm_memoir.routing.block_sums import BlockSums
    from vllm_memoir.routing.span_marks import SlotBlockMarks
    from vllm_memoir.routing.span_sums import SpanBlockSums
    from vllm_memoir.routing.step import decode_step

    artifact, _ = synthetic_artifact(hidden=H, dim=D, top_k=8, aggregation="mean")
    router = ShardedPromptRouter(artifact, 0, 1, torch.device("cpu"))
    memory = artifact.memory.float()
    slot_route = torch.tensor([NO_ROUTE, 2, 0, request_routes.PENDING, 1, NO_ROUTE, NO_ROUTE, NO_ROUTE])
    row_slots = torch.tensor([4, 0, 2, 1, 3, 5, 6, 7])  # batch row -> slot (V2's mapping)
    # Four decode rows, then two padding tokens (a CUDA-graph-sized batch).
    # Positions 8, 4, 11, 7; KV block size 4.
    table = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 10, 0]])
    layout = TokenLayout(torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32), torch.tensor([9, 5, 12, 8]),
                         torch.tensor([12, 20, 35, 43, -1, -1]), table)
    x = torch.randn(6, D)
    base = torch.randn(6, H)

    marks = SlotBlockMarks(capacity=7, num_blocks=3, block_size=4, device="cpu")
    marks.device_table.random_(-1, 4, generator=torch.Generator().manual_seed(0))  # any offsets will do

    def step(out, x, sums, spans):
        decode_step(out, x, layout, slot_route, row_slots, router, memory, sums, span_sums=spans, block_marks=marks)
        return out

    eager_sums, compiled_sums = (BlockSums(4, D, "cpu", num_blocks=16) for _ in range(2))
    before = torch.randn(18, D)
    eager_sums.sums, compiled_sums.sums = before.clone(), before.clone()
    eager_spans, compiled_spans = SpanBlockSums(eager_sums), SpanBlockSums(compiled_sums)
    for spans in (eager_spans, compiled_spans):
        spans.record(torch.ones(4, D), layout, layout.tokens_of(4), marks.of_tokens(layout.tokens_of(4), row_slots))
    eager = step(base.clone(), x, eager_sums, eager_spans)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(base.clone(), x, compiled_sums, compiled_spans)
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert torch.allclose(compiled_sums.sums, eager_sums.sums)
    for name in ("parts", "offsets"):
        assert torch.equal(getattr(compiled_spans, name), getattr(eager_spans, name)), name
    assert eager_spans.tail.abs().sum() > 0 and eager_spans.head.abs().sum() > 0  # the marks put tokens in both
    # rows -> slots 4, 0, 2, 1 -> edits 1, none, 0, 2
    for row, edit in enumerate((1, NO_ROUTE, 0, 2)):
        if edit == NO_ROUTE:
            assert torch.equal(eager[row], base[row])
        else:
            want = base[row] + edit_residual(artifact, x[row:row + 1], edit)[0].float()
            assert torch.allclose(eager[row], want, atol=1e-5)
    assert torch.equal(eager[4:], base[4:])  # padding tokens: untouched
    # Run eagerly, the host may name the routed rows: the residual of those rows only, the same.
    by_rows = BlockSums(4, D, "cpu", num_blocks=16)
    by_rows.sums = before.clone()
    layout_rows = TokenLayout(layout.query_start, layout.seq_lens, layout.slot_mapping[:4], table)
    subset = base[:4].clone()
    decode_step(subset, x[:4], layout_rows, slot_route, row_slots, router, memory, by_rows, torch.tensor([0, 2, 3]))
    assert torch.allclose(subset, eager[:4], atol=1e-6) and torch.equal(subset[1], base[1])
    # Each decode token is added to its block; slots 12 and 20 are the first of blocks 3 and 5,
    # which start over from them.
    for row, block in enumerate([3, 5, 8, 10]):
        want = x[row] if block in (3, 5) else before[block] + x[row]
        assert torch.allclose(eager_sums.sums[block], want)
    assert torch.equal(by_rows.sums[:-1], eager_sums.sums[:-1])  # the last row took the padding tokens


def test_a_live_swap_copies_into_the_preallocated_tables(layer):
    """Serving another artifact copies its memory, masks and flags into the tables the layer
    allocated at start-up (same addresses, as captured graphs read them); the new masks route."""
    module, artifact, _, _ = layer
    other, other_features = synthetic_artifact(edits=5, hidden=H, dim=D, top_k=8, aggregation="mean", seed=7)
    addresses = (module.memory.data_ptr(), module.mask_tables.masks.data_ptr(), module.mask_tables.enabled.data_ptr())
    try:
        module.serve(module.stage(other))
        assert (module.memory.data_ptr(), module.router.router.masks.data_ptr(),
                module.router.router.enabled.data_ptr()) == addresses
        assert torch.equal(module.router.router.masks, other.masks)
        assert torch.equal(module.memory, other.memory.to(module.memory.dtype))
        assert [d.route for d in module.router.decide(other_features)] == list(range(5))
        module.set_enabled(3, False)
        assert not bool(module.mask_tables.enabled[3])
    finally:
        module.serve(module.stage(artifact))
    assert torch.equal(module.router.router.masks, artifact.masks) and bool(module.router.router.enabled.all())


def test_mask_tables_grow_only_past_their_spare_rows():
    from vllm_memoir.routing.decisions import MaskTables, ShardedPromptRouter

    tables = MaskTables(torch.device("cpu"))
    small, _ = synthetic_artifact(edits=3, hidden=H, dim=D, top_k=8)
    tables.adopt(ShardedPromptRouter(small, 0, 1, torch.device("cpu")))
    first = tables.masks.data_ptr()
    assert tables.masks.shape[0] == MaskTables.MIN_ROWS
    big, _ = synthetic_artifact(edits=MaskTables.MIN_ROWS + 1, hidden=H, dim=D, top_k=8)
    router = tables.adopt(ShardedPromptRouter(big, 0, 1, torch.device("cpu")))
    assert tables.masks.data_ptr() != first and tables.masks.shape[0] == MaskTables.MIN_ROWS + 1 + 256
    assert torch.equal(router.router.masks, big.masks)
