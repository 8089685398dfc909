"""Pieces several test modules share: artifacts made without a model, waiting on a condition.

Test modules import from here (and from plugin_reference.py, served_edits.py), never from
each other: a test file is free to change its own helpers without breaking another.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

import pytest
import torch

from vllm_memoir.core import ArtifactManifest, EditRecord, MemoirArtifact, pack_indices, tophash_indices

T = TypeVar("T")

# make_artifact's shape: hidden size, intermediate columns, mask bits.
HIDDEN, COLUMNS, TOP_K = 16, 300, 20


def synthetic_artifact(edits: int = 3, hidden: int = HIDDEN, dim: int = COLUMNS, top_k: int = TOP_K,
                       aggregation: str = "mean_decentered", seed: int = 0) -> tuple[MemoirArtifact, torch.Tensor]:
    """A random but valid artifact (edit ids 0.., prompts p<i>, targets t<i>) and the [edits, dim]
    prompt features its masks were hashed from; the same seed gives the same artifact."""
    gen = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(dim, generator=gen)
    features = torch.randn(edits, dim, generator=gen)
    manifest = ArtifactManifest(
        base_model="tiny", base_fingerprint="f" * 64, module_path="model.layers.1.mlp.down_proj", layer_index=1,
        hidden_size=hidden, intermediate_size=dim, dtype="float32", top_k=top_k, irr_threshold=0.5,
        aggregation=aggregation, num_edits=edits,
    )
    artifact = MemoirArtifact(
        manifest=manifest, memory=torch.randn(hidden, dim, generator=gen),
        masks=pack_indices(tophash_indices(features, top_k, permutation), dim), permutation=permutation,
        background_mean=torch.randn(dim, generator=gen),
        edits=[EditRecord(edit_id=i, prompt=f"p{i}", target=f"t{i}") for i in range(edits)],
    )
    return artifact, features


def make_artifact(num_edits: int = 3, seed: int = 0) -> MemoirArtifact:
    """synthetic_artifact's artifact alone, at the default shape (HIDDEN, COLUMNS, TOP_K)."""
    return synthetic_artifact(num_edits, seed=seed)[0]


def wait_until(condition: Callable[[], T], timeout: float, what: str, poll: float = 0.02) -> T:
    """condition()'s first truthy answer, asked every `poll` seconds; fails naming `what` once
    `timeout` seconds pass without one (synchronisation by a condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:.0f} s")
        time.sleep(poll)


def init_single_rank_vllm() -> None:
    """vLLM's distributed state for one rank in this process (gloo on a free local port), as
    a routed layer built outside a server needs."""
    import socket

    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
    initialize_model_parallel(1)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (use with pytest.mark.usefixtures): the small facts
    models run no faster on two, and much slower on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
