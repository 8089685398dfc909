"""Adapter for vLLM's V1 model runner (the CPU runner; on GPU with VLLM_USE_V2_MODEL_RUNNER=0).

The V1 runner calls every logits processor's update_state(BatchUpdate) after it settles
the persistent batch and *before* the same step's forward; the update names the rows that
were added (with their prompt token ids), removed and moved. This processor only mirrors
those changes into the worker's RequestRoutes and leaves logits alone. Tokens of a forward
are laid out in the same row order, which is what the routing op relies on.

Enable it with `--logits-processors vllm_memoir.runner_v1:MemoirBatchTracker` (memoir-serve
adds it). It is deliberately not installed as a `vllm.logits_processors` entry point: the
V2 runner refuses V1-interface processors found there, for every model.
"""

from __future__ import annotations

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_memoir.routing import requests as request_routes


class MemoirBatchTracker(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # Persistent-batch rows are the slots; there are at most max_num_seqs of them.
        max_rows = vllm_config.scheduler_config.max_num_seqs if vllm_config is not None else None
        self.routes = request_routes.attach(self, max_rows or request_routes.DEFAULT_CAPACITY, device)

    def is_argmax_invariant(self) -> bool:
        return True  # never changes logits

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return  # same rows as the previous step
        # vLLM's documented order: removed, added, moved.
        for row in batch_update.removed:
            self.routes.remove(row)
        for row, _params, prompt_token_ids, output_token_ids in batch_update.added:
            self.routes.add(row, prompt_token_ids, is_new_request=not output_token_ids)
        for src, dst, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.routes.swap(src, dst)
            else:
                self.routes.move(src, dst)
        self.routes.set_batch(batch_update.batch_size)
