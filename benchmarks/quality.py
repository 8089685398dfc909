"""Edit quality on the facts models: sequential MEMOIR edits for T = 1, 10, 100, 1000 (and 10,000).

For each T, the edit tools apply the first T edits of data/facts/zsre-facts-T<T>.json one after
another (edit_tools.editor.run_edit_job), then EasyEdit's lifelong protocol scores every edit
on the final model (edit_tools.evaluate): Rel (edit prompt), Gen (held-out paraphrase), Loc
(unrelated facts unchanged: another relation, another subject) and Loc-neighbour (the edit's
own question about another subject unchanged). Also measured: how many edits took (their
training met edit_loss_target; the artifact's edit records keep loss and steps), edits per minute of the edit job, and two
diagnostics that separate the causes of a miss:
  - `own_mask`: Rel and Gen when each prompt is forced onto its own edit's mask. Low values
    mean the memory lost the edit (later edits overwrote shared columns, weight decay, no
    convergence); high values with a low Rel/Gen mean the router sent the prompt elsewhere.
    `own_mask.rel_by_tenth` and `took.by_tenth` split own-mask Rel and took by tenth of the
    edit sequence (oldest first): which edits the memory lost, and which never took.
  - the mask-overlap distributions of benchmarks/mask_overlap.py for the largest T, with the
    artifact's own background mean: (a) edit prompts vs the other edits, (b) paraphrases vs
    their own edit, (c) unrelated prompts' best match.

    python benchmarks/quality.py                      # T = 1,10,100,1000, configs/facts-llama.yaml
    python benchmarks/quality.py --sizes 10,100 --set edit_lr=20 --out /tmp/try
    # the reference's step settings vs this tool's default step, the YAML's routing kept:
    python benchmarks/quality.py --compare-steps --sizes 1,10 --model M --hparams H --data D --label NAME
    # the reference's defaults (the YAML's layer/top_k/threshold, the reference's step) vs the YAML
    # as given, each T; rows in quality_compare.json, plot quality_compare_<label>.png:
    python benchmarks/quality.py --compare-config --sizes 1,10,100,1000 --reference-set irr_threshold=0.79
    python benchmarks/quality.py --compare-config --label facts-broad --model models/facts-broad \
        --hparams configs/facts-broad.yaml --data 'data/facts/broad/zsre-facts-T{size}.json' --sizes 1,10,100,1000,10000
    # a finished T=1000 artifact rescored at other routing settings (irr_threshold x route_margin):
    python benchmarks/quality.py --sizes 1000 --thresholds-only --thresholds 0.79 --margins 0,0.02,0.05

Writes <out>/quality.json, <out>/quality.png (Rel/Gen/Loc against T, log x, with the MEMOIR
paper's Llama-3-8B ZsRE anchor) and <out>/quality_overlap_T<T>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script (python benchmarks/quality.py): the package is in REPO
    sys.path.insert(0, str(REPO))

from benchmarks.mask_overlap import best_threshold, overlap_distributions, plot_histogram, quantiles  # noqa: E402
from benchmarks.report_paths import repo_relative  # noqa: E402
from edit_tools.datasets import EditRequest, load_edit_dataset  # noqa: E402
from edit_tools.editor import run_edit_job  # noqa: E402
from edit_tools.evaluate import edit_rows, evaluate_edits  # noqa: E402
from edit_tools.hf_model import MemoirHFModel  # noqa: E402
from edit_tools.hparams import MemoirHyperParams  # noqa: E402
from vllm_memoir.core import MemoirArtifact, read_manifest  # noqa: E402
from vllm_memoir.core.tophash import remove_background_components, route_gap, top_two_overlaps, unpack_indices  # noqa: E402

log = logging.getLogger("quality")

DEFAULT_MODEL = REPO / "models" / "facts-llama"
DEFAULT_HPARAMS = REPO / "configs" / "facts-llama.yaml"
DEFAULT_DATA = REPO / "data" / "facts" / "zsre-facts-T{size}.json"
# The MEMOIR paper's Llama-3-8B ZsRE results (Rel, Gen, Loc), for comparison on the plot.
PAPER_ANCHOR = {1: (1.0, 1.0, 1.0), 1000: (0.94, 0.85, 1.0)}
TARGETS_T1000 = {"rel": 0.95, "gen": 0.80, "loc": 0.99}


ROUTING_KEYS = ("inner_params", "top_k", "irr_threshold", "prompt_feature_agg", "routing_span", "use_chat_template")
# Margins at which the masks-only routing shares are reported beside a --margins rescoring
# (cheap: one pass of features; the full evaluation runs only at the --margins given).
ROUTE_MARGIN_GRID = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1)
STEP_SETTINGS = {
    # The reference's step at the reference's defaults (edit_lr 1.0, n_iter 30, weight decay 1e-5 on all of W_m).
    "reference defaults": {"update_rule": "reference"},
    # This tool's default: the adaptive step (edit_tools/edit_step.py).
    "default": {},
}


def step_hparams(path: Path, setting: str, overrides: list[str] = ()) -> MemoirHyperParams:
    """The YAML's routing settings (layer, top_k, threshold, aggregation) and, for everything
    about the step, STEP_SETTINGS[setting] over the defaults; then `key=value` overrides."""
    obj = yaml.safe_load(Path(path).read_text()) or {}
    routing = {key: obj[key] for key in ROUTING_KEYS if key in obj}
    return MemoirHyperParams.from_dict({**routing, **STEP_SETTINGS[setting], **parse_overrides(overrides)},
                                       f"{path} (routing keys) + {setting} + {list(overrides)}")


def compare_steps(args, data_for, limit_for) -> None:
    """Rel/Gen/Loc/Loc-neighbour and edits/min per T for each STEP_SETTINGS entry; appends to quality_steps.json."""
    settings = {setting: step_hparams(args.hparams, setting) for setting in STEP_SETTINGS}
    compare_settings(args, data_for, limit_for, settings, args.out / "quality_steps.json")


def compare_config(args, data_for, limit_for) -> None:
    """The reference's defaults (the YAML's routing keys, the reference's step) against the YAML as
    given (with --set): rows in <out>/quality_compare.json, plot <out>/quality_compare_<label>.png."""
    settings = {"reference defaults": step_hparams(args.hparams, "reference defaults", args.reference_set),
                "config": load_hparams(args.hparams, args.set)}
    if args.only:
        if args.only not in settings:
            raise SystemExit(f"--only {args.only!r}: expected one of {sorted(settings)}")
        settings = {args.only: settings[args.only]}
    path = args.out / "quality_compare.json"
    rows = compare_settings(args, data_for, limit_for, settings, path)
    plot_compare([r for r in rows if r["label"] == args.label], args.out / f"quality_compare_{args.label}.png",
                 f"MEMOIR on {args.label}: the reference's defaults vs {repo_relative(args.hparams)}")


def compare_settings(args, data_for, limit_for, settings: dict, path: Path) -> list[dict]:
    """Each setting at each T of --sizes; rows (label, setting, T) replace earlier ones in `path`."""
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    sizes = [int(s) for s in args.sizes.split(",")]
    for setting, hp in settings.items():
        for size in sizes:
            row = run_size(args.model, data_for(size), hp, args.work / f"{setting}-T{size}".replace(" ", "-"),
                           limit=limit_for(size), resume=args.resume)
            keep = ("T", "rel", "gen", "loc", "loc_neighbour", "own_mask", "took", "routing", "memory_norm",
                    "edits_per_minute", "edit_seconds", "eval_seconds", "resumed_after")
            rows = [r for r in rows if (r["label"], r["setting"], r["T"]) != (args.label, setting, size)]
            rows.append({"label": args.label, "model": repo_relative(args.model), "hparams": repo_relative(args.hparams),
                         "data": repo_relative(Path(args.data)), "setting": setting, "update_rule": hp.update_rule,
                         "memoir": hp.to_dict(), **{key: row[key] for key in keep if key in row}})
            rows.sort(key=lambda r: (r["label"], r["setting"], r["T"]))
            path.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"\n{'model':<18} {'setting':<19} {'T':>5} {'Rel':>6} {'Gen':>6} {'Loc':>6} {'LocN':>6} {'took':>6} {'edits/min':>10}")
    for r in rows:
        print(f"{r['label']:<18} {r['setting']:<19} {r['T']:>5} {r['rel']:>6.3f} {_fmt(r['gen']):>6} {_fmt(r['loc']):>6} "
              f"{_fmt(r['loc_neighbour']):>6} {_fmt(r['took'].get('share')):>6} {_rate(r['edits_per_minute']):>10}")
    return rows


def parse_overrides(overrides: list[str]) -> dict:
    """`key=value` items (values parsed as YAML) as a dict."""
    parsed_items = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:  # YAML reads 1e-5 (no dot) as a string
                parsed = float(parsed)
            except ValueError:
                pass
        parsed_items[key] = parsed
    return parsed_items


def load_hparams(path: Path, overrides: list[str]) -> MemoirHyperParams:
    """The YAML's hyperparameters with `key=value` overrides (values parsed as YAML)."""
    obj = yaml.safe_load(Path(path).read_text()) or {}
    obj.update(parse_overrides(overrides))
    return MemoirHyperParams.from_dict(obj, f"{path} with --set {overrides}")


@torch.no_grad()
def own_mask_accuracy(hf: MemoirHFModel, artifact: MemoirArtifact, requests: list[EditRequest]) -> dict:
    """Mean Rel and Gen with each prompt forced onto its own edit's mask (routing bypassed)."""
    masks = unpack_indices(artifact.masks, artifact.manifest.intermediate_size)
    row_of = {(e.prompt, e.target): row for row, e in enumerate(artifact.edits)}
    rel, gen = [], []
    with hf.routing_off():
        try:
            for request in requests:
                hf.layer.train_indices = masks[row_of[(request.prompt, request.target)]].to(hf.device)
                prompts = [request.prompt] + ([request.rephrase] if request.rephrase else [])
                rows = hf.score(prompts, [request.target] * len(prompts))
                rel.append(rows[0].accuracy)
                if request.rephrase:
                    gen.append(rows[1].accuracy)
        finally:
            hf.layer.train_indices = None
    return {"rel": sum(rel) / len(rel), "gen": sum(gen) / len(gen) if gen else None,
            "rel_by_tenth": by_tenth(rel)}


def by_tenth(values: list[float]) -> list[float] | None:
    """Means over ten consecutive slices of the edit sequence, oldest first (None below 10 edits):
    how much of each part of the sequence the memory still holds at the end."""
    if len(values) < 10:
        return None
    bounds = [round(i * len(values) / 10) for i in range(11)]
    return [round(sum(values[a:b]) / (b - a), 3) for a, b in zip(bounds, bounds[1:])]


def edits_taken(artifact: MemoirArtifact) -> dict:
    """Share of the edits whose training met its loss target, and their mean steps and loss."""
    outcomes = [e.outcome for e in artifact.edits if e.outcome]
    if not outcomes:
        return {}
    return {"share": sum(o["took"] for o in outcomes) / len(outcomes),
            "mean_steps": round(sum(o["steps"] for o in outcomes) / len(outcomes), 2),
            "mean_loss": round(sum(o["loss"] for o in outcomes) / len(outcomes), 5),
            "by_tenth": by_tenth([float(o["took"]) for o in outcomes])}


def overlap_summary(hf: MemoirHFModel, artifact: MemoirArtifact, requests: list[EditRequest]):
    """mask_overlap's three distributions for this artifact's design and background (on the
    routing keys, as served)."""
    manifest = artifact.manifest
    features = {
        name: routing_keys(hf, artifact, texts)
        for name, texts in (("edit", [r.prompt for r in requests]), ("paraphrase", [r.rephrase for r in requests]),
                            ("unrelated", [r.loc for r in requests]))
    }
    dists = overlap_distributions(features["edit"], features["paraphrase"], features["unrelated"], manifest.top_k)
    threshold, balanced = best_threshold(dists.paraphrase_own, dists.unrelated_best)
    summary = {
        "other_edit_best": quantiles(dists.other_edit_best),
        "paraphrase_own": quantiles(dists.paraphrase_own),
        "paraphrase_best_is_own": dists.paraphrase_best_is_own.float().mean().item(),
        "unrelated_best": quantiles(dists.unrelated_best),
        "irr_threshold": manifest.irr_threshold,
        "paraphrase_own_above_threshold": (dists.paraphrase_own >= manifest.irr_threshold).float().mean().item(),
        "unrelated_below_threshold": (dists.unrelated_best < manifest.irr_threshold).float().mean().item(),
        "best_threshold": threshold,
        "best_balanced_accuracy": balanced,
    }
    return summary, dists


def run_size(model: Path, data: Path, hp: MemoirHyperParams, work: Path, limit: int | None = None,
             histogram: Path | None = None, resume: bool = False) -> dict:
    """Edit, evaluate and diagnose one edit set; returns its row of the results.

    resume: continue the edit job a stopped run left in `work` (the same hyperparameters and
    edit set, or the job refuses); edits/min then counts only the edits this run made."""
    done_before = _edits_done(work) if resume else 0
    if work.exists() and not resume:
        shutil.rmtree(work)  # a fresh job: an old artifact would be resumed or refused
    requests = load_edit_dataset(data, limit=limit)
    started = time.perf_counter()
    artifact = run_edit_job(model, requests, hp, work, progress=False)
    edit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    hf = MemoirHFModel.from_pretrained(model, artifact=artifact)
    metrics = evaluate_edits(hf, requests)
    eval_seconds = time.perf_counter() - started
    row = {
        "T": len(requests),
        "data": repo_relative(data),
        "rel": metrics["post"]["rel"],
        "gen": metrics["post"]["gen"],
        "loc": metrics["post"]["loc"],
        "loc_neighbour": metrics["post"].get("loc_neighbour"),
        "update_rule": hp.update_rule,
        "took": edits_taken(artifact),
        "pre": metrics["pre"],
        "routing": metrics["routing"],
        "own_mask": own_mask_accuracy(hf, artifact, requests),
        "memory_norm": round(float(artifact.memory.float().norm()), 1),
        "edit_seconds": round(edit_seconds, 3),  # ms: a short job's rate stays recomputable from it
        # None when an earlier run had made every edit: this one timed none.
        "edits_per_minute": round(60 * (len(requests) - done_before) / edit_seconds, 1) if len(requests) > done_before else None,
        "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(edit_seconds + eval_seconds, 1),
    }
    if done_before:
        row["resumed_after"] = done_before  # edits an earlier run made; not in edit_seconds
    if histogram is not None:
        row["overlap"], dists = overlap_summary(hf, artifact, requests)
        plot_histogram(dists, f"facts-llama: layer {hp.layer_index}, top_k {hp.top_k}, T={len(requests)}", histogram,
                       threshold=hp.irr_threshold)
        log.info("wrote %s", histogram)
    log.info("T=%d: Rel %.3f Gen %.3f Loc %.3f Loc-neighbour %s (own mask: Rel %.3f Gen %.3f), took %s, %s edits/min",
             row["T"], row["rel"], row["gen"], row["loc"], _fmt(row["loc_neighbour"]), row["own_mask"]["rel"],
             row["own_mask"]["gen"] or 0.0, row["took"].get("share"), _rate(row["edits_per_minute"]))
    return row


def _edits_done(work: Path) -> int:
    """How many edits the job in `work` has stored (0: no job there yet)."""
    return read_manifest(work).num_edits if (work / "manifest.json").exists() else 0


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def threshold_sweep(model: Path, artifact_dir: Path, data: Path, thresholds: list[float],
                    margins: list[float] | None = None) -> list[dict]:
    """Rel/Gen/Loc of a finished artifact at other irr_thresholds and route_margins (each
    threshold with each margin; routing changes, the memory does not)."""
    requests = load_edit_dataset(data)
    hf = MemoirHFModel.from_pretrained(model, artifact=artifact_dir)
    rows = []
    for threshold in thresholds:
        for margin in margins or [hf.layer.router.route_margin]:
            hf.layer.router.irr_threshold, hf.layer.router.route_margin = threshold, margin
            metrics = evaluate_edits(hf, requests)
            rows.append({"irr_threshold": threshold, "route_margin": margin, "rel": metrics["post"]["rel"],
                         "gen": metrics["post"]["gen"], "loc": metrics["post"]["loc"],
                         "loc_neighbour": metrics["post"].get("loc_neighbour"), "routing": metrics["routing"]})
            log.info("irr_threshold %.3f route_margin %.3f: Rel %.3f Gen %.3f Loc %.3f Loc-neighbour %s "
                     "(loc routed %.3f)", threshold, margin, rows[-1]["rel"], rows[-1]["gen"], rows[-1]["loc"],
                     _fmt(rows[-1]["loc_neighbour"]), metrics["routing"]["loc_routed"] or 0.0)
    return rows


def routing_keys(hf: MemoirHFModel, artifact: MemoirArtifact, texts: list[str]) -> torch.Tensor:
    """[N, D] what TopHash ranks for each text when the artifact is served: its feature, with
    the background's principal directions removed when the artifact has them."""
    features = hf.prompt_features(texts, artifact.manifest.aggregation, artifact.background_mean, batch_size=128)
    return remove_background_components(features, artifact.background_basis)


def route_gaps(hf: MemoirHFModel, artifact: MemoirArtifact, texts: list[str]) -> dict:
    """Each prompt's best enabled edit, its overlap and its gap to the second best (route_gap),
    from the artifact's stored masks: what routing at any threshold and margin would see."""
    router = hf.layer.router
    best, row, second = top_two_overlaps(router.query_masks(routing_keys(hf, artifact, texts)), router.masks,
                                         router.enabled)
    return {"best_edit": row, "overlap": best.clamp(min=0).float() / router.top_k,
            "gap": route_gap(best, second, router.top_k)}


def margin_routing(hf: MemoirHFModel, artifact: MemoirArtifact, requests: list[EditRequest],
                   thresholds: list[float], margins: list[float]) -> dict:
    """The routing side of route_margin, from masks alone (any artifact, trained or not): the
    gap distributions of paraphrases (own edit best), unrelated and neighbour prompts, and per
    (threshold, margin) the share of paraphrases routed to their own edit and of unrelated /
    neighbour prompts routed to any edit."""
    own = torch.tensor(edit_rows(artifact, requests))
    kinds = {"paraphrase": [r.rephrase for r in requests if r.rephrase],
             "unrelated": [r.loc for r in requests if r.loc],
             "neighbour": [r.loc_neighbour for r in requests if r.loc_neighbour]}
    seen = {kind: route_gaps(hf, artifact, texts) for kind, texts in kinds.items() if texts}
    para = seen["paraphrase"]
    para_own = para["best_edit"] == own[[i for i, r in enumerate(requests) if r.rephrase]]
    elsewhere = para["gap"][~para_own]
    summary = {"gap": {"paraphrase_best_is_own": quantiles(para["gap"][para_own]),
                       "paraphrase_best_is_other": quantiles(elsewhere) if len(elsewhere) else None,
                       **{kind: quantiles(seen[kind]["gap"]) for kind in ("unrelated", "neighbour") if kind in seen}},
               "rows": []}
    for threshold in thresholds:
        for margin in margins:
            routed = {kind: (got["overlap"] >= threshold) & (got["gap"] >= margin) for kind, got in seen.items()}
            summary["rows"].append({
                "irr_threshold": threshold, "route_margin": margin,
                "paraphrase_routed_to_own_edit": round((routed["paraphrase"] & para_own).float().mean().item(), 4),
                **{f"{kind}_routed": round(routed[kind].float().mean().item(), 4)
                   for kind in ("unrelated", "neighbour") if kind in routed}})
    return summary


def rescore(row: dict, model: Path, artifact_dir: Path, data: Path, thresholds: list[float],
            margins: list[float] | None) -> None:
    """A finished artifact rescored at other routing settings, into its row: `threshold_sweep`
    (thresholds alone), or with margins `margin_sweep` and the masks-only `margin_routing`."""
    if not margins:
        row["threshold_sweep"] = threshold_sweep(model, artifact_dir, data, thresholds)
        return
    row["margin_sweep"] = threshold_sweep(model, artifact_dir, data, thresholds, margins)
    hf = MemoirHFModel.from_pretrained(model, artifact=artifact_dir)
    grid = sorted(set(margins) | set(ROUTE_MARGIN_GRID))
    row["margin_routing"] = margin_routing(hf, hf.artifact, load_edit_dataset(data), thresholds, grid)


def plot_quality(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["T"] for r in rows]
    if all(r.get("loc_neighbour") is not None for r in rows):
        ax.plot(sizes, [r["loc_neighbour"] for r in rows], "o-", color="tab:red", label="Loc-neighbour (facts-llama)")
    for i, (metric, color) in enumerate((("rel", "tab:blue"), ("gen", "tab:orange"), ("loc", "tab:green"))):
        ax.plot(sizes, [r[metric] for r in rows], "o-", color=color, label=f"{metric.capitalize()} (facts-llama)")
        anchor_t = sorted(PAPER_ANCHOR)
        ax.plot(anchor_t, [PAPER_ANCHOR[t][i] for t in anchor_t], "s--", color=color, mfc="none", alpha=0.6,
                label=f"{metric.capitalize()} (paper, Llama-3-8B ZsRE)")
    ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits T")
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(rows: list[dict], path: Path, title: str) -> None:
    """Rel/Gen/Loc/Loc-neighbour against T, one line style per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    metrics = (("rel", "Rel", "tab:blue"), ("gen", "Gen", "tab:orange"), ("loc", "Loc", "tab:green"),
               ("loc_neighbour", "Loc-neighbour", "tab:red"))
    styles = {"reference defaults": "s--", "config": "o-"}
    others = iter(("^:", "v-.", "d:", "x-."))  # further settings, dotted or dash-dotted, in name order
    for setting in sorted({r["setting"] for r in rows}, key=lambda s: (s not in styles, s != "reference defaults", s)):
        style = styles.get(setting) or next(others, "^:")
        mine = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["T"])
        for key, name, color in metrics:
            points = [(r["T"], r[key]) for r in mine if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, color=color, mfc=color if style == "o-" else "none",
                        label=f"{name} ({setting})")
    ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits T")
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: many lines
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--hparams", type=Path, default=DEFAULT_HPARAMS)
    parser.add_argument("--sizes", default="1,10,100,1000", help="comma list of T; data/facts/zsre-facts-T<T>.json each")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="edit set per T: a path with {size} in it, or one file whose first T records are used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the results go")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality", help="artifacts, one folder per T")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thresholds", help="comma list: also score the largest T's artifact at these irr_thresholds")
    parser.add_argument("--margins", help="comma list: also score the largest T's artifact at these route_margins "
                                          "(with each --thresholds value, or the artifact's irr_threshold)")
    parser.add_argument("--thresholds-only", action="store_true",
                        help="skip editing: score the existing artifact in <work>/T<largest> at --thresholds (and "
                             "--margins), update quality.json")
    parser.add_argument("--compare-steps", action="store_true",
                        help="run each T with the reference's step defaults and with the default step (the YAML's "
                             "routing keys only); rows go to <out>/quality_steps.json under --label")
    parser.add_argument("--compare-config", action="store_true",
                        help="run each T with the reference's defaults (the YAML's routing keys) and with the YAML "
                             "as given (and --set); rows go to <out>/quality_compare.json under --label, plot "
                             "<out>/quality_compare_<label>.png")
    parser.add_argument("--reference-set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --compare-config: override a hyperparameter of the reference's side (e.g. its "
                             "own best irr_threshold)")
    parser.add_argument("--only", help="with --compare-config: run only this setting ('reference defaults' or 'config'); "
                                       "the other's rows in quality_compare.json are kept")
    parser.add_argument("--resume", action="store_true",
                        help="continue the edit jobs a stopped run left in --work (same settings and data) instead of "
                             "starting them afresh: for the hours-long T=10,000 runs")
    parser.add_argument("--label", default="facts-llama", help="the model's name in quality_steps.json / quality_compare.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other T's rows of an existing <out>/quality.json (run sizes in separate processes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    hp = load_hparams(args.hparams, args.set)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    margins = [float(m) for m in args.margins.split(",")] if args.margins else None
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else []
    if margins and not thresholds:
        thresholds = [hp.irr_threshold]
    largest = max(sizes)
    data_for = lambda size: Path(args.data.format(size=size))  # noqa: E731
    limit_for = lambda size: None if "{size}" in args.data else size  # noqa: E731
    largest_data = data_for(largest)
    if args.compare_steps:
        compare_steps(args, data_for, limit_for)
        return
    if args.compare_config:
        compare_config(args, data_for, limit_for)
        return
    if args.thresholds_only:
        path = args.out / "quality.json"
        result = json.loads(path.read_text())
        row = next(r for r in result["rows"] if r["T"] == largest)
        rescore(row, args.model, args.work / f"T{largest}", largest_data, thresholds, margins)
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
    rows = []
    for size in sizes:
        histogram = args.out / f"quality_overlap_T{size}.png" if size == max(sizes) else None
        rows.append(run_size(args.model, data_for(size), hp, args.work / f"T{size}", limit=limit_for(size),
                             histogram=histogram, resume=args.resume))
    if thresholds:
        rescore(next(r for r in rows if r["T"] == largest), args.model, args.work / f"T{largest}", largest_data,
                thresholds, margins)
    if args.merge and (args.out / "quality.json").exists():
        earlier = json.loads((args.out / "quality.json").read_text())
        if earlier.get("memoir") != hp.to_dict():
            log.warning("--merge: %s was made with other hyperparameters; not merging its rows", args.out / "quality.json")
        else:
            rows = sorted([r for r in earlier["rows"] if r["T"] not in sizes] + rows, key=lambda r: r["T"])
    result = {
        "model": repo_relative(args.model),
        "hparams": repo_relative(args.hparams),
        "data": repo_relative(Path(args.data)),
        "overrides": args.set,
        "memoir": hp.to_dict(),
        "threads": args.threads,
        "targets_at_T1000": TARGETS_T1000,
        "paper_anchor": {str(t): dict(zip(("rel", "gen", "loc"), v)) for t, v in PAPER_ANCHOR.items()},
        "rows": rows,
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_quality(rows, args.out / "quality.png",
                 f"MEMOIR on {args.model.name} ({hp.update_rule} step, layer {hp.layer_index}, top_k {hp.top_k}, thr {hp.irr_threshold})")
    print(f"\n{'T':>5} {'Rel':>6} {'Gen':>6} {'Loc':>6} {'LocN':>6} {'Rel*':>6} {'Gen*':>6} {'took':>6} {'edits/min':>10} {'wall s':>8}")
    for r in rows:
        print(f"{r['T']:>5} {r['rel']:>6.3f} {r['gen']:>6.3f} {r['loc']:>6.3f} {_fmt(r['loc_neighbour']):>6} "
              f"{r['own_mask']['rel']:>6.3f} {r['own_mask']['gen']:>6.3f} {_fmt(r['took'].get('share')):>6} "
              f"{_rate(r['edits_per_minute']):>10} {r['wall_seconds']:>8.1f}")
    print("(LocN: Loc-neighbour; Rel*, Gen*: each prompt forced onto its own edit's mask; took: share of edits whose "
          "training met edit_loss_target)")
    for r in rows:
        if r["own_mask"].get("rel_by_tenth"):
            print(f"T={r['T']}: Rel* by tenth of the sequence, oldest first: "
                  + " / ".join(f"{v:.2f}" for v in r["own_mask"]["rel_by_tenth"]))
    log.info("wrote %s and %s", args.out / "quality.json", args.out / "quality.png")


if __name__ == "__main__":
    main()
