"""`memoir evaluate --ray-workers N`: the post-edit evaluation of an edit set, fanned out over Ray.

The edits were applied sequentially by the edit job; evaluating them is independent per
request. Each Ray task loads the model and the artifact itself (it gets paths, never
tensors), scores one contiguous shard of the requests, and returns plain per-request
scores; the driver concatenates them in request order and summarizes them exactly as the
single-process `evaluate_artifact` does. Shards start on batch boundaries, so every batch
is the same batch as in the single-process run, and the metrics are identical.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .datasets import load_edit_dataset
from .evaluate import RequestScores, summarize_scores

logger = logging.getLogger(__name__)


def shard_bounds(num_requests: int, batch_size: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of whole batches, as even as possible, none empty."""
    if batch_size < 1 or num_shards < 1:
        raise ValueError(f"batch_size and the number of workers must be >= 1 (got {batch_size}, {num_shards})")
    num_batches = -(-num_requests // batch_size)
    num_shards = min(num_shards, num_batches)
    bounds, first_batch = [], 0
    for shard in range(num_shards):
        batches = num_batches // num_shards + (shard < num_batches % num_shards)
        start, stop = first_batch * batch_size, min((first_batch + batches) * batch_size, num_requests)
        bounds.append((start, stop))
        first_batch += batches
    return bounds


def score_shard(model_dir: str, artifact_dir: str, data: str, limit: int | None, skip_invalid: bool,
                start: int, stop: int, batch_size: int) -> list[RequestScores]:
    """Runs in a Ray worker: load model, artifact and dataset from their paths; score requests[start:stop]."""
    import torch

    from .evaluate import score_requests
    from .hf_model import MemoirHFModel

    # One intra-op thread per CPU Ray gave this task, so workers on a node do not oversubscribe it.
    cpus = os.environ.get("OMP_NUM_THREADS")
    if cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))
    requests = load_edit_dataset(data, limit=limit, skip_invalid=skip_invalid)[start:stop]
    hf = MemoirHFModel.from_pretrained(model_dir, artifact=artifact_dir)
    return score_requests(hf, requests, batch_size)


def evaluate_artifact_on_ray(
    model_dir: str | Path, artifact_dir: str | Path, data: str | Path, workers: int, limit: int | None = None,
    batch_size: int = 32, skip_invalid: bool = False, cpus_per_worker: float = 1, address: str | None = None,
) -> dict:
    """evaluate_artifact's result, computed by `workers` Ray tasks.

    Uses the Ray instance this process already runs, else connects to the cluster at `address`
    (or RAY_ADDRESS, or one `ray start` left on this machine), else starts a local one for the
    duration of the call. Paths must be readable at the same place on every node.
    """
    import ray

    given = {"artifact": str(artifact_dir), "model": str(model_dir)}
    model_dir, artifact_dir, data = (str(Path(p).resolve()) for p in (model_dir, artifact_dir, data))
    requests = load_edit_dataset(data, limit=limit, skip_invalid=skip_invalid)
    if not requests:
        raise ValueError(f"{data}: no edit requests to evaluate")
    bounds = shard_bounds(len(requests), batch_size, workers)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus_per_worker, max_retries=0)(score_shard)
        logger.info("evaluating %d requests in %d Ray tasks: %s", len(requests), len(bounds), bounds)
        refs = [task.remote(model_dir, artifact_dir, data, limit, skip_invalid, start, stop, batch_size)
                for start, stop in bounds]
        scores = [s for shard in ray.get(refs) for s in shard]
    finally:
        if started_here:
            ray.shutdown()
    result = summarize_scores(requests, scores)
    result.update(given)
    result["ray_workers"] = len(bounds)
    return result
