"""The tiny model's edits as the server tests serve them: engine flags, the edit job, prompts.

Shared by the modules that start a `vllm serve` of the tiny Llama (test_plugin_server.py,
test_faults_server.py, test_faults_artifacts.py, test_plugin_speed_features.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from plugin_reference import split_clear_of_threshold

from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.engine_requirements import ROUTING_FLAGS

LAYER = 2
THRESHOLD = 0.6
MARGIN = 0.04  # prompts this close to the threshold could flip on float noise; left out
COMMON = ["--dtype", "float32", "--max-model-len", "256", *ROUTING_FLAGS]


def edit(model_dir, words_dataset, out, limit: int | None = 8, layer: int = LAYER) -> Path:
    """The server tests' edit job: `limit` edits of `words_dataset` at `layer`'s down_proj."""
    hp = MemoirHyperParams(inner_params=[f"model.layers[{layer}].mlp.down_proj.weight"], top_k=128, edit_lr=20.0,
                           n_iter=8, irr_threshold=THRESHOLD).validate()
    run_edit_job(model_dir, words_dataset, hp, out, limit=limit, progress=False)
    return out


def clear_prompts(words_dataset: Path, reference: MemoirHFModel, variants: list[str], extra: list[str],
                  at_least: tuple[int, int]) -> dict[str, list[str]]:
    """Routed and unrouted prompts clear of the threshold: each of `variants` (a format string
    over an edit record's fields, e.g. "{prompt}" or "where does {subject} live ?") for the
    first 8 edit records, then `extra`; at least `at_least` = (routed, unrouted) of them."""
    records = [json.loads(line) for line in words_dataset.read_text().splitlines()][:8]
    candidates = [variant.format(**record) for record in records for variant in variants] + extra
    routed, unrouted = split_clear_of_threshold(reference, candidates, THRESHOLD, MARGIN)
    assert len(routed) >= at_least[0] and len(unrouted) >= at_least[1], (len(routed), len(unrouted))
    return {"routed": routed, "unrouted": unrouted, "all": routed + unrouted}
