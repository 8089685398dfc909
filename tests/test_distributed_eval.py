"""`memoir evaluate --ray-workers N` gives exactly the single-process metrics."""

from __future__ import annotations

import json

import pytest

from edit_tools.editor import run_edit_job
from edit_tools.evaluate import evaluate_artifact
from edit_tools.hparams import MemoirHyperParams
from edit_tools.ray_eval import shard_bounds

BATCH_SIZE = 4  # 8 edits -> 2 batches -> one per worker


def test_shards_are_whole_batches_in_order():
    assert shard_bounds(8, 4, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(10, 4, 2) == [(0, 8), (8, 10)]
    assert shard_bounds(10, 3, 3) == [(0, 6), (6, 9), (9, 10)]
    assert shard_bounds(3, 32, 4) == [(0, 3)]  # never an empty shard
    bounds = shard_bounds(1000, 32, 7)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    assert all(start % 32 == 0 for start, _ in bounds)
    with pytest.raises(ValueError, match="must be >= 1"):
        shard_bounds(8, 0, 2)


@pytest.fixture(scope="module")
def edited(tiny_model_dir, words_dataset, tmp_path_factory):
    hp = MemoirHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"], top_k=128, edit_lr=20.0,
                           n_iter=8, irr_threshold=0.6).validate()
    out = tmp_path_factory.mktemp("ray-eval-artifact")
    run_edit_job(tiny_model_dir, words_dataset, hp, out, limit=8, progress=False)
    return out


@pytest.mark.slow
def test_ray_workers_match_single_process(tiny_model_dir, words_dataset, edited, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[serve]')")
    from edit_tools.cli import main

    single = evaluate_artifact(tiny_model_dir, edited, words_dataset, limit=8, batch_size=BATCH_SIZE)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray.json"
        code = main(["evaluate", "--model", str(tiny_model_dir), "--artifact", str(edited), "--data", str(words_dataset),
                     "--limit", "8", "--batch-size", str(BATCH_SIZE), "--ray-workers", "2", "--json", str(out)])
    finally:
        ray.shutdown()
    assert code == 0
    distributed = json.loads(out.read_text())
    assert distributed.pop("ray_workers") == 2
    # JSON round trip of the single run: tuples and floats as the CLI writes them
    assert distributed == json.loads(json.dumps(single))
    assert single["num_edits"] == 8 and single["post"]["rel"] > single["pre"]["rel"]
