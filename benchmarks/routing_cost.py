"""Cost of the prefill routing step against the number of stored edits.

The step a prompt pays once at its prefill: aggregate its down_proj inputs into a feature,
TopHash it, and match the mask against every stored mask (bit-packed AND + popcount). It is
timed with the project's own functions for 1 .. 100,000 stored edits (random masks with
exactly top_k bits: the matching cost does not depend on their content), next to the memory
the packed masks take.

    python benchmarks/routing_cost.py [--shape 1024:384 --shape 14336:4096] [--prompts 1,8]
        [--json benchmarks/results/routing_cost.json --plot benchmarks/results/routing_cost.png]

Shapes are intermediate_size:top_k; 14336:4096 is Llama-3-8B with the paper's top_k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vllm_memoir.core import aggregate_prompt_feature, match_routes, pack_indices, tophash_indices

sys.path.insert(0, str(Path(__file__).resolve().parent))  # synthetic_artifact, when run as a script
from synthetic_artifact import random_masks  # noqa: E402

EDIT_COUNTS = (1, 10, 100, 1_000, 10_000, 100_000)


def time_routing(masks: torch.Tensor, dim: int, top_k: int, prompts: int, prompt_len: int,
                 generator: torch.Generator, repeats: int) -> float:
    """Median seconds of one routing step for `prompts` prompts of `prompt_len` tokens."""
    permutation = torch.randperm(dim, generator=generator)
    background = torch.randn(dim, generator=generator)
    x = torch.randn(prompts, prompt_len, dim, generator=generator)
    prompt_mask = torch.ones(prompts, prompt_len, dtype=torch.bool)
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocations
        started = time.perf_counter()
        feature = aggregate_prompt_feature(x, prompt_mask, "mean_decentered", background)
        query = pack_indices(tophash_indices(feature, top_k, permutation), dim)
        match_routes(query, masks, top_k, 0.5)
        times.append(time.perf_counter() - started)
    times = sorted(times[1:])
    return times[len(times) // 2]


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
    parser.add_argument("--prompts", default="1,8", help="prompts routed in one step (comma list)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--edits", default=",".join(map(str, EDIT_COUNTS)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split(":"))) for s in (args.shape or ["1024:384", "14336:4096"])]
    counts = [int(v) for v in args.edits.split(",")]
    generator = torch.Generator().manual_seed(0)

    rows = []
    print(f"{'D':>6} {'k':>5} {'prompts':>7} {'edits':>8} {'ms':>9} {'masks MiB':>10}")
    for dim, top_k in shapes:
        all_masks = random_masks(max(counts), dim, top_k, seed=0)
        for count in counts:
            masks = all_masks[:count].clone()
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
