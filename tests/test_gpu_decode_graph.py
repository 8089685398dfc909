"""On a CUDA GPU: the routing step's decode path captured in a CUDA graph and replayed.

Skipped without CUDA (CI is CPU-only); scripts/gpu_check.sh runs it. The CPU half of the
claim, that the decode step traces whole with torch.compile(fullgraph=True), is in
test_plugin_routed_layer.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_artifact

from vllm_memoir.core import NO_ROUTE, masked_residual, unpack_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

H, D, R, BLOCK = 16, 64, 8, 4


def test_decode_step_replays_from_a_cuda_graph_with_new_routes_and_positions():
    from vllm_memoir.routing.decisions import ShardedPromptRouter
    from vllm_memoir.routing.layout import TokenLayout
    from vllm_memoir.routing.block_sums import BlockSums
    from vllm_memoir.routing.step import decode_step

    cuda = torch.device("cuda")
    artifact, _ = synthetic_artifact(hidden=H, dim=D, top_k=8, aggregation="mean")
    router = ShardedPromptRouter(artifact, 0, 1, cuda)
    memory = artifact.memory.float().to(cuda)
    # Persistent buffers, as vLLM's and the request tracker's are: captured once, refilled in place.
    slot_route = torch.full((R,), NO_ROUTE, device=cuda)
    row_slots = torch.arange(R, device=cuda)
    query_start = torch.arange(R + 1, dtype=torch.int32, device=cuda)
    seq_lens = torch.zeros(R, dtype=torch.int64, device=cuda)
    table = torch.arange(R * 8, device=cuda).view(R, 8)
    slot_mapping = torch.zeros(R, dtype=torch.int64, device=cuda)
    x = torch.zeros(R, D, device=cuda)
    out = torch.zeros(R, H, device=cuda)
    sums = BlockSums(BLOCK, D, cuda, num_blocks=R * 8)
    sums.sums = torch.zeros(R * 8 + 2, D, device=cuda)

    def fill(step_seed: int) -> None:
        gen = torch.Generator().manual_seed(step_seed)
        lens = torch.randint(2, 30, (R,), generator=gen)
        seq_lens.copy_(lens)
        positions = lens - 1
        slot_mapping.copy_(table.cpu()[torch.arange(R), positions // BLOCK] * BLOCK + positions % BLOCK)
        slot_route.copy_(torch.randint(-1, 3, (R,), generator=gen))
        x.copy_(torch.randn(R, D, generator=gen))
        out.copy_(torch.randn(R, H, generator=gen))

    def step() -> None:
        decode_step(out, x, TokenLayout(query_start, seq_lens, slot_mapping, table), slot_route, row_slots,
                    router, memory, sums)

    fill(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture, as vLLM does
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2, 3):
        fill(seed)
        base, table_before = out.clone(), sums.sums.clone()
        graph.replay()
        replayed, replayed_sums = out.clone(), sums.sums.clone()
        out.copy_(base)
        sums.sums.copy_(table_before)
        step()
        assert torch.allclose(replayed, out, atol=1e-5)
        assert torch.allclose(replayed_sums, sums.sums)
        for row, edit in enumerate(slot_route.tolist()):
            if edit == NO_ROUTE:
                assert torch.equal(replayed[row], base[row])
            else:
                columns = unpack_bits(artifact.masks[edit:edit + 1], D)[0].nonzero().flatten()
                want = base[row].cpu() + masked_residual(x[row:row + 1].cpu(), artifact.memory.float(), columns)[0]
                assert torch.allclose(replayed[row].cpu(), want, atol=1e-4)
