"""Cost of the prefill routing step against the number of stored edits.

The step the prompts that finish their prefill in one engine step pay together: aggregate
their down_proj inputs into features, TopHash them, and match all their masks against every
stored mask in one pass (bit-packed AND + popcount). It is timed with the project's own
functions for 1 .. 1,000,000 stored edits (random masks with exactly top_k bits: the
matching cost does not depend on their content), next to the memory the packed masks take.

    python benchmarks/routing_cost.py [--shape 1024:384 --shape 14336:4096] [--prompts 1,8,32]
        [--json benchmarks/results/routing_cost.json --plot benchmarks/results/routing_cost.png]

Shapes are intermediate_size:top_k; 14336:4096 is Llama-3-8B with the paper's top_k.

`--compare REVISION` times REVISION's match_routes against this one's, interleaved:
    python benchmarks/routing_cost.py --compare 4a31f06 --edits 10000,100000,1000000 \
        --json benchmarks/results/routing_cost_compare.json

`--prune-rates` instead measures how much an exact index could skip (see prune_rates):
    python benchmarks/routing_cost.py --prune-rates --artifact ARTIFACT --model models/facts-llama \
        --data data/facts/zsre-facts-T1000.json --json benchmarks/results/mask_prune_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vllm_memoir.core import aggregate_prompt_feature, match_routes, overlap_counts, pack_indices, tophash_indices

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # synthetic_artifact, when run as a script
from synthetic_artifact import random_masks  # noqa: E402

EDIT_COUNTS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
MAX_SECONDS_PER_POINT = 20.0
PRUNE_THRESHOLDS = (0.5, 0.6, 0.7, 0.79, 0.8)
PRUNE_FRACTIONS = (0.25, 0.5, 0.75)


def time_routing(masks: torch.Tensor, dim: int, top_k: int, prompts: int, prompt_len: int,
                 generator: torch.Generator, repeats: int) -> float:
    """Median seconds of one routing step for `prompts` prompts of `prompt_len` tokens."""
    permutation = torch.randperm(dim, generator=generator)
    background = torch.randn(dim, generator=generator)
    x = torch.randn(prompts, prompt_len, dim, generator=generator)
    prompt_mask = torch.ones(prompts, prompt_len, dtype=torch.bool)
    times = []
    for run in range(repeats + 1):  # the first run warms up allocations
        started = time.perf_counter()
        feature = aggregate_prompt_feature(x, prompt_mask, "mean_decentered", background)
        query = pack_indices(tophash_indices(feature, top_k, permutation), dim)
        match_routes(query, masks, top_k, 0.5)
        times.append(time.perf_counter() - started)
        if run >= 2 and sum(times[1:]) > MAX_SECONDS_PER_POINT:  # 1M edits x 32 prompts: seconds a run
            break
    times = sorted(times[1:])
    return times[len(times) // 2]


def module_at_revision(revision: str, path: str = "vllm_memoir/core/tophash.py"):
    """The module `path` as committed at `revision` (git show; nothing is checked out)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{revision}", handle.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(handle.name)
    return module


def compare_with(revision: str, shapes, counts, prompt_counts, rounds: int = 2) -> list[dict]:
    """Matching time of `revision`'s match_routes against this one's, interleaved (A, B, A, B)
    on the same masks and queries, so machine load hits both alike; reports the ratio."""
    baseline = module_at_revision(revision)
    rows = []
    for dim, top_k in shapes:
        all_masks = random_masks(max(counts), dim, top_k, seed=0)
        queries = random_masks(max(prompt_counts), dim, top_k, seed=1)
        for count in counts:
            for prompts in prompt_counts:
                masks, query = all_masks[:count], queries[:prompts]
                times = {"baseline": [], "current": []}
                for _ in range(rounds):
                    for name, match in (("baseline", baseline.match_routes), ("current", match_routes)):
                        started = time.perf_counter()
                        match(query, masks, top_k, 0.5)
                        times[name].append(time.perf_counter() - started)
                row = {"dim": dim, "top_k": top_k, "edits": count, "prompts": prompts,
                       "baseline_ms": statistics.median(times["baseline"]) * 1e3,
                       "current_ms": statistics.median(times["current"]) * 1e3}
                row["speedup"] = row["baseline_ms"] / row["current_ms"]
                rows.append(row)
                print(f"{dim:>6} {top_k:>5} {prompts:>7} {count:>8} {row['baseline_ms']:>10.1f} "
                      f"{row['current_ms']:>10.1f} {row['speedup']:>6.2f}x", flush=True)
    return rows


def word_bits(masks: torch.Tensor) -> np.ndarray:
    """[N, W] uint8 packed masks -> [N, W/8] set bits per 64-bit word."""
    return np.bitwise_count(masks.contiguous().numpy().view(np.uint64)).astype(np.int32)


def prune_rates(stored: torch.Tensor, queries: torch.Tensor, top_k: int) -> dict:
    """How many (query, stored mask) pairs an exact upper bound rules out before a full count.

    A pair can be skipped when a bound on its overlap is below irr_threshold * top_k. Bounds:
      block:     sum over 64-bit words of min(bits of the query's word, bits of the stored
                 word), from per-word bit counts an index would keep;
      prefix f:  the exact overlap on the first f of the words plus min(the query's bits in
                 the rest, top_k - the stored mask's bits in the prefix): the cost of a
                 two-stage scan is f of a full one, plus the pairs that survive;
      densest f: the same with the f of the words where the query has the most bits.
    Also reported: the share of pairs whose exact overlap reaches the threshold (no exact
    index can skip them). Rates are means over queries.
    """
    q_bits, s_bits = word_bits(queries), word_bits(stored)
    exact = overlap_counts(queries, stored).numpy().astype(np.int32)
    q_words = queries.contiguous().numpy().view(np.uint64)
    s_words = stored.contiguous().numpy().view(np.uint64)
    n_words = q_bits.shape[1]
    bounds = {"block": np.stack([np.minimum(s_bits, row).sum(1) for row in q_bits])}
    for fraction in PRUNE_FRACTIONS:
        cut = max(1, int(round(fraction * n_words)))
        for name, order in (("prefix", None), ("densest", "query")):
            rows = []
            for i, q_row in enumerate(q_words):
                words = np.arange(cut) if order is None else np.argsort(-q_bits[i], kind="stable")[:cut]
                partial = np.bitwise_count(s_words[:, words] & q_row[words]).astype(np.int32).sum(1)
                q_rest = int(q_bits[i].sum() - q_bits[i, words].sum())
                s_rest = top_k - s_bits[:, words].sum(1)
                rows.append(partial + np.minimum(q_rest, s_rest))
            bounds[f"{name} {fraction:g}"] = np.stack(rows)
    out = {"stored": int(stored.shape[0]), "queries": int(queries.shape[0]), "rates": []}
    for threshold in PRUNE_THRESHOLDS:
        need = threshold * top_k
        entry = {"threshold": threshold, "reach_threshold": float((exact >= need).mean())}
        for name, bound in bounds.items():
            assert (bound >= exact).all(), name  # an upper bound, or the measurement is wrong
            entry[name] = float((bound < need).mean())
        out["rates"].append(entry)
    return out


def measure_prune_rates(args) -> dict:
    """Prune rates on random masks at both widths and on a real artifact's masks."""
    results = {"random": [], "real": None}
    for dim, top_k in ((1024, 384), (14336, 4096)):
        stored = random_masks(args.prune_stored, dim, top_k, seed=0)
        queries = random_masks(32, dim, top_k, seed=1)
        results["random"].append({"dim": dim, "top_k": top_k, **prune_rates(stored, queries, top_k)})
    if args.artifact:
        from vllm_memoir.core import load_artifact
        from synthetic_artifact import prompt_masks

        artifact = load_artifact(args.artifact)
        m = artifact.manifest
        records = json.loads(args.data.read_text())[: m.num_edits]
        prompts = [r["rephrase"] for r in records] + [r["loc"] for r in records]
        queries = prompt_masks(args.model, m.module_path, prompts, m.top_k, m.aggregation,
                               artifact.permutation, artifact.background_mean)
        n = len(records)
        results["real"] = {"artifact_edits": m.num_edits, "top_k": m.top_k, "dim": m.intermediate_size,
                           "irr_threshold": m.irr_threshold,
                           "edit_prompts": prune_rates(artifact.masks, artifact.masks, m.top_k),
                           "paraphrases": prune_rates(artifact.masks, queries[:n], m.top_k),
                           "unrelated": prune_rates(artifact.masks, queries[n:], m.top_k)}
    return results


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in sorted({(r["dim"], r["top_k"], r["prompts"]) for r in rows}):
        series = [r for r in rows if (r["dim"], r["top_k"], r["prompts"]) == key]
        ax.plot([r["edits"] for r in series], [r["ms"] for r in series], marker="o",
                label=f"D={key[0]}, k={key[1]}, {key[2]} prompt(s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stored edits")
    ax.set_ylabel("routing step (ms)")
    ax.set_title("Prefill routing cost (aggregate + TopHash + match), CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="intermediate_size:top_k (repeatable)")
    parser.add_argument("--prompts", default="1,8,32", help="prompts routed in one step (comma list)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--edits", default=",".join(map(str, EDIT_COUNTS)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--prune-rates", action="store_true", help="measure index prune rates instead")
    parser.add_argument("--prune-stored", type=int, default=20_000, help="random stored masks (--prune-rates)")
    parser.add_argument("--artifact", type=Path, help="a real artifact (--prune-rates)")
    parser.add_argument("--model", type=Path, help="its model, to compute query masks (--prune-rates)")
    parser.add_argument("--data", type=Path, help="its edit data: rephrase and loc prompts (--prune-rates)")
    parser.add_argument("--compare", metavar="REVISION",
                        help="time REVISION's match_routes against this one's (interleaved) instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compare:
        shapes = [tuple(map(int, s.split(":"))) for s in (args.shape or ["1024:384", "14336:4096"])]
        print(f"{'D':>6} {'k':>5} {'prompts':>7} {'edits':>8} {'before ms':>10} {'after ms':>10} {'ratio':>7}")
        rows = compare_with(args.compare, shapes, [int(v) for v in args.edits.split(",")],
                            [int(v) for v in args.prompts.split(",")])
        if args.json:
            args.json.write_text(json.dumps({"baseline_revision": args.compare, "threads": args.threads,
                                             "rows": rows}, indent=2) + "\n")
        return
    if args.prune_rates:
        results = measure_prune_rates(args)
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    shapes = [tuple(map(int, s.split(":"))) for s in (args.shape or ["1024:384", "14336:4096"])]
    counts = [int(v) for v in args.edits.split(",")]
    generator = torch.Generator().manual_seed(0)

    rows = []
    print(f"{'D':>6} {'k':>5} {'prompts':>7} {'edits':>8} {'ms':>9} {'masks MiB':>10}")
    for dim, top_k in shapes:
        all_masks = random_masks(max(counts), dim, top_k, seed=0)
        for count in counts:
            masks = all_masks[:count]  # a view: 1,000,000 masks of Llama-3-8B width are 1.7 GiB
            for prompts in (int(v) for v in args.prompts.split(",")):
                seconds = time_routing(masks, dim, top_k, prompts, args.prompt_len, generator, args.repeats)
                row = {"dim": dim, "top_k": top_k, "prompts": prompts, "edits": count, "ms": seconds * 1e3,
                       "mask_mib": masks.numel() / 2**20}
                rows.append(row)
                print(f"{dim:>6} {top_k:>5} {prompts:>7} {count:>8} {row['ms']:>9.3f} {row['mask_mib']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "prompt_len": args.prompt_len, "rows": rows},
                                        indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
