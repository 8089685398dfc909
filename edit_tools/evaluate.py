"""EasyEdit's lifelong protocol: metrics before any edit, then every edit on the final model.

- Rel: teacher-forced token accuracy of the target given the edit prompt.
- Gen: the same given the rephrase (temporal: the out-of-distribution rephrase).
- Loc: fraction of locality-answer tokens whose post-edit argmax equals the pre-edit argmax, on
  the unrelated locality prompt (`loc`).
- Loc-neighbour (`loc_neighbour`): the same on the edit's question about another subject, where
  the data has one (the facts edit sets); the harder test of routing.
- hallucination sets also get the perplexity of the target.
Plus routing statistics: how often prompts, rephrases and locality prompts were routed, and
to the right edit.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from vllm_memoir.core import NO_ROUTE, MemoirArtifact, load_artifact

from .datasets import EditRequest, load_edit_dataset
from .hf_model import MemoirHFModel, ScoredRow

logger = logging.getLogger(__name__)


def _perplexity(row: ScoredRow) -> float:
    return math.exp(-mean(row.target_logprobs))


def edit_rows(artifact: MemoirArtifact, requests: list[EditRequest]) -> list[int]:
    """Each request's row in the artifact (by prompt and target), NO_ROUTE when absent."""
    index = {(e.prompt, e.target): row for row, e in enumerate(artifact.edits)}
    return [index.get((r.prompt, r.target), NO_ROUTE) for r in requests]


@dataclass
class RequestScores:
    """Everything the summary needs about one request; None where the request has no such prompt."""

    own_row: int  # the request's edit row in the artifact (NO_ROUTE when absent)
    rel_pre: float
    rel_post: float
    prompt_route: int
    prompt_overlap: float
    ppl_pre: float | None = None  # hallucination sets only
    ppl_post: float | None = None
    gen_pre: float | None = None
    gen_post: float | None = None
    rephrase_route: int | None = None
    rephrase_overlap: float | None = None
    loc_agreement: float | None = None  # share of locality answer tokens whose argmax is unchanged
    loc_routed: bool | None = None
    loc_overlap: float | None = None
    neighbour_agreement: float | None = None  # as loc_agreement, on the loc_neighbour prompt
    neighbour_routed: bool | None = None
    neighbour_overlap: float | None = None


def _loc_agreement(before: ScoredRow, after: ScoredRow) -> float:
    same = sum(a == b for a, b in zip(before.predicted_ids, after.predicted_ids))
    return same / max(len(before.predicted_ids), 1)


def score_block(hf: MemoirHFModel, requests: list[EditRequest]) -> list[RequestScores]:
    """Scores of one batch of requests: each of its prompt kinds runs as one batch, pre and post."""
    with_rephrase = [i for i, r in enumerate(requests) if r.rephrase]
    with_loc = [i for i, r in enumerate(requests) if r.loc and r.loc_ans]
    with_neighbour = [i for i, r in enumerate(requests) if r.loc_neighbour and r.loc_neighbour_ans]

    def run_all() -> dict[str, list[ScoredRow]]:
        return {
            "rel": hf.score([r.prompt for r in requests], [r.target for r in requests]),
            "gen": hf.score([requests[i].rephrase for i in with_rephrase], [requests[i].target for i in with_rephrase]) if with_rephrase else [],
            "loc": hf.score([requests[i].loc for i in with_loc], [requests[i].loc_ans for i in with_loc]) if with_loc else [],
            "neighbour": hf.score([requests[i].loc_neighbour for i in with_neighbour],
                                  [requests[i].loc_neighbour_ans for i in with_neighbour]) if with_neighbour else [],
        }

    with hf.routing_off():
        pre = run_all()
    post = run_all()
    prompt_routes = hf.route([r.prompt for r in requests])
    rephrase_routes = hf.route([requests[i].rephrase for i in with_rephrase]) if with_rephrase else []
    loc_routes = hf.route([requests[i].loc for i in with_loc]) if with_loc else []
    neighbour_routes = hf.route([requests[i].loc_neighbour for i in with_neighbour]) if with_neighbour else []

    hallucination = requests[0].kind == "hallucination"
    scores = [
        RequestScores(own_row=row, rel_pre=before.accuracy, rel_post=after.accuracy, prompt_route=decision.route,
                      prompt_overlap=decision.overlap,
                      ppl_pre=_perplexity(before) if hallucination else None,
                      ppl_post=_perplexity(after) if hallucination else None)
        for row, before, after, decision in zip(edit_rows(hf.artifact, requests), pre["rel"], post["rel"], prompt_routes)
    ]
    for j, i in enumerate(with_rephrase):
        scores[i].gen_pre, scores[i].gen_post = pre["gen"][j].accuracy, post["gen"][j].accuracy
        scores[i].rephrase_route, scores[i].rephrase_overlap = rephrase_routes[j].route, rephrase_routes[j].overlap
    for j, i in enumerate(with_loc):
        scores[i].loc_agreement = _loc_agreement(pre["loc"][j], post["loc"][j])
        scores[i].loc_routed, scores[i].loc_overlap = loc_routes[j].routed, loc_routes[j].overlap
    for j, i in enumerate(with_neighbour):
        scores[i].neighbour_agreement = _loc_agreement(pre["neighbour"][j], post["neighbour"][j])
        scores[i].neighbour_routed, scores[i].neighbour_overlap = neighbour_routes[j].routed, neighbour_routes[j].overlap
    return scores


def score_requests(hf: MemoirHFModel, requests: list[EditRequest], batch_size: int = 32) -> list[RequestScores]:
    """Per-request scores, in consecutive batches of `batch_size` requests.

    A request's scores depend only on its own batch, so a shard that starts on a batch
    boundary scores exactly as in one run over all requests (edit_tools.ray_eval relies on it).
    """
    if hf.artifact is None:
        raise ValueError("evaluate needs a model with an artifact loaded")
    scores: list[RequestScores] = []
    for start in range(0, len(requests), batch_size):
        scores += score_block(hf, requests[start:start + batch_size])
    return scores


def _median(values: list) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def summarize_scores(requests: list[EditRequest], scores: list[RequestScores]) -> dict:
    """EasyEdit-style pre/post metrics and routing statistics from per-request scores."""
    if len(scores) != len(requests):
        raise ValueError(f"{len(scores)} scores for {len(requests)} requests")
    gen = [s for s in scores if s.gen_post is not None]
    loc = [s for s in scores if s.loc_agreement is not None]
    neighbour = [s for s in scores if s.neighbour_agreement is not None]

    def stage(which: str) -> dict:
        out = {
            "rel": mean(getattr(s, f"rel_{which}") for s in scores),
            "gen": mean(getattr(s, f"gen_{which}") for s in gen) if gen else None,
        }
        if requests[0].kind == "hallucination":
            out["target_ppl"] = mean(getattr(s, f"ppl_{which}") for s in scores)
        return out

    result = {
        "num_edits": len(requests),
        "pre": stage("pre"),
        "post": stage("post"),
        "routing": {
            "prompt_routed_to_own_edit": mean(s.prompt_route == s.own_row for s in scores),
            "rephrase_routed_to_own_edit": mean(s.rephrase_route == s.own_row for s in gen) if gen else None,
            "loc_routed": mean(s.loc_routed for s in loc) if loc else None,
            "loc_neighbour_routed": mean(s.neighbour_routed for s in neighbour) if neighbour else None,
            "median_overlap": {
                "prompt": _median([s.prompt_overlap for s in scores]),
                "rephrase": _median([s.rephrase_overlap for s in gen]),
                "loc": _median([s.loc_overlap for s in loc]),
                "loc_neighbour": _median([s.neighbour_overlap for s in neighbour]),
            },
        },
    }
    result["post"]["loc"] = mean(s.loc_agreement for s in loc) if loc else None
    result["pre"]["loc"] = 1.0 if loc else None
    # Only where the data has neighbour prompts: summaries of other data keep their keys.
    if neighbour:
        result["post"]["loc_neighbour"] = mean(s.neighbour_agreement for s in neighbour)
        result["pre"]["loc_neighbour"] = 1.0
    return result


def evaluate_edits(hf: MemoirHFModel, requests: list[EditRequest], batch_size: int = 32) -> dict:
    """Pre- and post-edit metrics for `requests` on a model whose artifact holds them."""
    return summarize_scores(requests, score_requests(hf, requests, batch_size))


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
    metrics = [m for m in ("rel", "gen", "loc", "loc_neighbour", "target_ppl") if result["post"].get(m) is not None]
    lines = [f"MEMOIR evaluation: {result['num_edits']} edits", f"{'':6}" + "".join(f"{m:>14}" for m in metrics)]
    for stage in ("pre", "post"):
        lines.append(f"{stage:6}" + "".join(f"{result[stage][m]:>14.4f}" for m in metrics))
    routing = result["routing"]
    lines.append(
        "routing: prompt->own edit {:.3f}, rephrase->own edit {}, loc routed {}".format(
            routing["prompt_routed_to_own_edit"],
            "n/a" if routing["rephrase_routed_to_own_edit"] is None else f"{routing['rephrase_routed_to_own_edit']:.3f}",
            "n/a" if routing["loc_routed"] is None else f"{routing['loc_routed']:.3f}",
        )
        + ("" if routing.get("loc_neighbour_routed") is None else f", loc-neighbour routed {routing['loc_neighbour_routed']:.3f}")
    )
    return "\n".join(lines)


def plot_metrics(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("rel", "gen", "loc", "loc_neighbour") if result["post"].get(m) is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    xs = range(len(metrics))
    ax.bar([x - width / 2 for x in xs], [result["pre"][m] for m in metrics], width, label="pre-edit")
    ax.bar([x + width / 2 for x in xs], [result["post"][m] for m in metrics], width, label="post-edit")
    ax.set_xticks(list(xs), [m.capitalize().replace("_", "-") for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"MEMOIR, T={result['num_edits']} sequential edits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
