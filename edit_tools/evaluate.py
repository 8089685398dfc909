"""EasyEdit's lifelong protocol: metrics before any edit, then every edit on the final model.

- Rel: teacher-forced token accuracy of the target given the edit prompt.
- Gen: the same given the rephrase (temporal: the out-of-distribution rephrase).
- Loc: fraction of locality-answer tokens whose post-edit argmax equals the pre-edit argmax.
- hallucination sets also get the perplexity of the target.
Plus routing statistics: how often prompts, rephrases and locality prompts were routed, and
to the right edit.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from statistics import mean

from vllm_memoir.core import NO_ROUTE, MemoirArtifact, load_artifact

from .datasets import EditRequest, load_edit_dataset
from .hf_model import MemoirHFModel, ScoredRow

logger = logging.getLogger(__name__)


def _batched_score(hf: MemoirHFModel, prompts: list[str], targets: list[str], batch_size: int) -> list[ScoredRow]:
    rows: list[ScoredRow] = []
    for start in range(0, len(prompts), batch_size):
        rows += hf.score(prompts[start:start + batch_size], targets[start:start + batch_size])
    return rows


def _batched_routes(hf: MemoirHFModel, prompts: list[str], batch_size: int) -> list:
    out = []
    for start in range(0, len(prompts), batch_size):
        out += hf.route(prompts[start:start + batch_size])
    return out


def _perplexity(row: ScoredRow) -> float:
    return math.exp(-mean(row.target_logprobs))


def _edit_rows(artifact: MemoirArtifact, requests: list[EditRequest]) -> list[int]:
    """Each request's row in the artifact (by prompt and target), NO_ROUTE when absent."""
    index = {(e.prompt, e.target): row for row, e in enumerate(artifact.edits)}
    return [index.get((r.prompt, r.target), NO_ROUTE) for r in requests]


def evaluate_edits(hf: MemoirHFModel, requests: list[EditRequest], batch_size: int = 32) -> dict:
    """Pre- and post-edit metrics for `requests` on a model whose artifact holds them."""
    if hf.artifact is None:
        raise ValueError("evaluate needs a model with an artifact loaded")
    prompts = [r.prompt for r in requests]
    targets = [r.target for r in requests]
    with_rephrase = [i for i, r in enumerate(requests) if r.rephrase]
    with_loc = [i for i, r in enumerate(requests) if r.loc and r.loc_ans]

    def run_all() -> dict:
        return {
            "rel": _batched_score(hf, prompts, targets, batch_size),
            "gen": _batched_score(hf, [requests[i].rephrase for i in with_rephrase], [targets[i] for i in with_rephrase], batch_size),
            "loc": _batched_score(hf, [requests[i].loc for i in with_loc], [requests[i].loc_ans for i in with_loc], batch_size),
        }

    with hf.routing_off():
        pre = run_all()
    post = run_all()

    def loc_agreement(before: ScoredRow, after: ScoredRow) -> float:
        same = sum(a == b for a, b in zip(before.predicted_ids, after.predicted_ids))
        return same / max(len(before.predicted_ids), 1)

    rows = _edit_rows(hf.artifact, requests)
    routes = {
        "prompt": _batched_routes(hf, prompts, batch_size),
        "rephrase": _batched_routes(hf, [requests[i].rephrase for i in with_rephrase], batch_size),
        "loc": _batched_routes(hf, [requests[i].loc for i in with_loc], batch_size),
    }

    def summary(which: dict) -> dict:
        out = {
            "rel": mean(r.accuracy for r in which["rel"]),
            "gen": mean(r.accuracy for r in which["gen"]) if with_rephrase else None,
        }
        if requests[0].kind == "hallucination":
            out["target_ppl"] = mean(_perplexity(r) for r in which["rel"])
        return out

    result = {
        "num_edits": len(requests),
        "pre": summary(pre),
        "post": summary(post),
        "routing": {
            "prompt_routed_to_own_edit": mean(d.route == row for d, row in zip(routes["prompt"], rows)),
            "rephrase_routed_to_own_edit": (
                mean(routes["rephrase"][j].route == rows[i] for j, i in enumerate(with_rephrase)) if with_rephrase else None
            ),
            "loc_routed": mean(d.routed for d in routes["loc"]) if with_loc else None,
            "median_overlap": {
                name: sorted(d.overlap for d in decisions)[len(decisions) // 2] if decisions else None
                for name, decisions in routes.items()
            },
        },
    }
    result["post"]["loc"] = mean(loc_agreement(b, a) for b, a in zip(pre["loc"], post["loc"])) if with_loc else None
    result["pre"]["loc"] = 1.0 if with_loc else None
    return result


def evaluate_artifact(
    model_dir: str | Path, artifact_dir: str | Path, data: str | Path, limit: int | None = None,
    batch_size: int = 32, skip_invalid: bool = False,
) -> dict:
    artifact = load_artifact(artifact_dir)
    hf = MemoirHFModel.from_pretrained(model_dir, artifact=artifact)
    requests = load_edit_dataset(data, limit=limit, skip_invalid=skip_invalid)
    result = evaluate_edits(hf, requests, batch_size)
    result["artifact"] = str(artifact_dir)
    result["model"] = str(model_dir)
    return result


def format_table(result: dict) -> str:
    metrics = [m for m in ("rel", "gen", "loc", "target_ppl") if result["post"].get(m) is not None]
    lines = [f"MEMOIR evaluation: {result['num_edits']} edits", f"{'':6}" + "".join(f"{m:>12}" for m in metrics)]
    for stage in ("pre", "post"):
        lines.append(f"{stage:6}" + "".join(f"{result[stage][m]:>12.4f}" for m in metrics))
    routing = result["routing"]
    lines.append(
        "routing: prompt->own edit {:.3f}, rephrase->own edit {}, loc routed {}".format(
            routing["prompt_routed_to_own_edit"],
            "n/a" if routing["rephrase_routed_to_own_edit"] is None else f"{routing['rephrase_routed_to_own_edit']:.3f}",
            "n/a" if routing["loc_routed"] is None else f"{routing['loc_routed']:.3f}",
        )
    )
    return "\n".join(lines)


def plot_metrics(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("rel", "gen", "loc") if result["post"].get(m) is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    xs = range(len(metrics))
    ax.bar([x - width / 2 for x in xs], [result["pre"][m] for m in metrics], width, label="pre-edit")
    ax.bar([x + width / 2 for x in xs], [result["post"][m] for m in metrics], width, label="post-edit")
    ax.set_xticks(list(xs), [m.capitalize() for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"MEMOIR, T={result['num_edits']} sequential edits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
