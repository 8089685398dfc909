"""Does a TopHash mask identify the subject? The overlap distributions behind MEMOIR's routing.

For a model, a ZsRE-format edit set and candidate (layer, top_k) designs, over the first N records:
  (a) each edit prompt's (`src`) best overlap with the OTHER edits' masks,
  (b) each paraphrase's (`rephrase`) overlap with ITS OWN edit's mask, and how often its
      best match is its own edit,
  (c) each unrelated prompt's (`loc`) best overlap with any edit's mask.
Routing works when (b) sits well above (c), so that one irr_threshold separates them.

    python benchmarks/mask_overlap.py --model models/facts-llama --data data/facts/zsre-facts-T1000.json \
        --layer 3,4 --top-k 256,300 --n 1000 [--plot benchmarks/results/mask_overlap.png]

--layer, --top-k and --components take comma lists to sweep several designs in one run. The
background (for `mean_decentered`) is computed over --background-texts, else over the `loc`
prompts of the records after the first N (or of all records when there are none left);
--components N removes its top N principal directions from every feature first (the routing
key of hyperparameter background_components).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from edit_tools.background import compute_background
from edit_tools.datasets import load_text_pool
from edit_tools.hf_model import MemoirHFModel
from vllm_memoir.core.tophash import overlap_counts, pack_indices, remove_background_components, tophash_indices

log = logging.getLogger("mask_overlap")


@dataclass
class Distributions:
    other_edit_best: torch.Tensor  # (a) per edit prompt
    paraphrase_own: torch.Tensor  # (b) per paraphrase
    paraphrase_best_is_own: torch.Tensor  # (b) bool per paraphrase
    unrelated_best: torch.Tensor  # (c) per loc prompt


def overlap_distributions(edit_feat, para_feat, loc_feat, top_k: int, seed: int = 0) -> Distributions:
    dim = edit_feat.shape[-1]
    # The permutation relabels dims; overlaps do not depend on it, but masks are built as served.
    permutation = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))

    def masks(feature):
        return pack_indices(tophash_indices(feature, top_k, permutation), dim)

    stored = masks(edit_feat)
    edit_vs_edit = overlap_counts(stored, stored).float() / top_k
    edit_vs_edit.fill_diagonal_(-1.0)
    para_vs_edit = overlap_counts(masks(para_feat), stored).float() / top_k
    own = para_vs_edit.diagonal()
    return Distributions(
        other_edit_best=edit_vs_edit.max(dim=1).values,
        paraphrase_own=own,
        paraphrase_best_is_own=para_vs_edit.argmax(dim=1) == torch.arange(len(own)),
        unrelated_best=(overlap_counts(masks(loc_feat), stored).float() / top_k).max(dim=1).values,
    )


def best_threshold(own: torch.Tensor, unrelated: torch.Tensor) -> tuple[float, float]:
    """The threshold with the best balanced accuracy (paraphrases route, unrelated prompts don't)."""
    best = (0.0, 0.0)
    for threshold in torch.unique(torch.cat([own, unrelated])).tolist():
        score = 0.5 * ((own >= threshold).float().mean() + (unrelated < threshold).float().mean()).item()
        if score > best[1]:
            best = (threshold, score)
    return best


def quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.float(), torch.tensor([0.05, 0.5, 0.95]))
    return {"p5": q[0].item(), "median": q[1].item(), "p95": q[2].item(), "max": values.max().item()}


def describe(name: str, values: torch.Tensor) -> str:
    q = quantiles(values)
    return f"  {name:<36} p5 {q['p5']:.3f}  median {q['median']:.3f}  p95 {q['p95']:.3f}  max {q['max']:.3f}"


def plot_histogram(dists: Distributions, title: str, path: Path, threshold: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(0, 1, 51).tolist()
    ax.hist(dists.other_edit_best.tolist(), bins=bins, alpha=0.5, label="(a) edit vs other edits (best)")
    ax.hist(dists.paraphrase_own.tolist(), bins=bins, alpha=0.5, label="(b) paraphrase vs own edit")
    ax.hist(dists.unrelated_best.tolist(), bins=bins, alpha=0.5, label="(c) unrelated vs any edit (best)")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"irr_threshold {threshold:.2f}")
    ax.set_xlabel("mask overlap (fraction of top_k)")
    ax.set_ylabel("prompts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (transformers Llama)")
    parser.add_argument("--data", required=True, type=Path, help="ZsRE-format edit set (src, rephrase, loc)")
    parser.add_argument("--layer", default="3", help="edited layer(s), e.g. 3 or 2,3,4")
    parser.add_argument("--top-k", default="256", help="mask size(s), e.g. 256 or 200,300")
    parser.add_argument("--n", type=int, default=100, help="edits (and their paraphrase and loc prompts) to compare")
    parser.add_argument("--background", type=int, default=200, help="background texts (at most) for the background")
    parser.add_argument("--background-texts", type=Path, help="a .txt or dataset file of background texts")
    parser.add_argument("--components", default="0", help="background principal directions removed, e.g. 0 or 0,128,512")
    parser.add_argument("--aggregation", default="mean_decentered")
    parser.add_argument("--plot", type=Path, help="histogram PNG; one per design, named <stem>_L<layer>_k<top_k>.png")
    parser.add_argument("--json", type=Path, help="write the summary table as JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    records = json.loads(args.data.read_text())
    if len(records) < args.n:
        raise SystemExit(f"{args.data}: {len(records)} records, fewer than --n {args.n}")
    edits = records[:args.n]
    spare = records[args.n:] or records
    if spare is records:
        log.warning("no records beyond the first %d: the background mean includes the unrelated prompts", args.n)
    if args.background_texts:
        background_prompts = load_text_pool(args.background_texts, limit=args.background)
    else:
        background_prompts = list(dict.fromkeys(r["loc"] for r in spare))[:args.background]
    components_list = [int(v) for v in args.components.split(",")]
    layers = [int(v) for v in args.layer.split(",")]
    top_ks = [int(v) for v in args.top_k.split(",")]
    prompts = {
        "edit": [r["src"] for r in edits],
        "paraphrase": [r["rephrase"] for r in edits],
        "unrelated": [r["loc"] for r in edits],
    }

    table = []
    for layer in layers:
        hf = MemoirHFModel.from_pretrained(args.model, module_path=f"model.layers.{layer}.mlp.down_proj")
        background = compute_background(hf, background_prompts, max(components_list), batch_size=128)
        raw = {name: hf.prompt_features(texts, args.aggregation, background.mean, batch_size=128)
               for name, texts in prompts.items()}
        for top_k, components in ((k, c) for k in top_ks for c in components_list):
            basis = background.basis[:components] if components else None
            features = {name: remove_background_components(f, basis) for name, f in raw.items()}
            d = overlap_distributions(features["edit"], features["paraphrase"], features["unrelated"], top_k)
            threshold, balanced = best_threshold(d.paraphrase_own, d.unrelated_best)
            table.append({
                "layer": layer, "top_k": top_k, "components": components, "background_texts": len(background_prompts),
                "n": args.n, "aggregation": args.aggregation,
                "other_edit_best": quantiles(d.other_edit_best),
                "paraphrase_own": quantiles(d.paraphrase_own),
                "paraphrase_best_is_own": d.paraphrase_best_is_own.float().mean().item(),
                "unrelated_best": quantiles(d.unrelated_best),
                "threshold": threshold, "balanced_accuracy": balanced,
            })
            print(f"\nlayer {layer}  top_k {top_k}  components {components}  ({args.aggregation}, {args.n} edits)")
            print(describe("(a) edit vs other edits, best", d.other_edit_best))
            print(describe("(b) paraphrase vs own edit", d.paraphrase_own))
            print(f"      paraphrase's best match is its own edit: {d.paraphrase_best_is_own.float().mean():.3f}")
            print(describe("(c) unrelated vs any edit, best", d.unrelated_best))
            print(f"  best irr_threshold {threshold:.3f}: balanced accuracy {balanced:.3f}")
            if args.plot:
                suffix = f"_c{components}" if components else ""
                path = args.plot.with_name(f"{args.plot.stem}_L{layer}_k{top_k}{suffix}{args.plot.suffix or '.png'}")
                plot_histogram(d, f"{Path(args.model).name}: layer {layer}, top_k {top_k}, {args.n} edits", path)
                log.info("wrote %s", path)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
