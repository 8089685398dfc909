"""Edit-loop speed: the fast loop (cached lower layers) against the plain full-model loop.

A 32-layer Llama-shaped model with narrow random weights, editing layer 27, the same edits
and hyperparameters for both loops. Prints edits/minute, the speed-up and whether both loops
produced the same masks and (within float tolerance) the same memory.

    python benchmarks/edit_speed.py --edits 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edit_tools.editor import run_edit_job
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama, build_words_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--layer", type=int, default=27)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=896)
    parser.add_argument("--n-iter", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="an existing model directory instead of a random one")
    parser.add_argument("--data", help="an edit dataset instead of a generated one")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="memoir-edit-speed-"))
    model = args.model or build_tiny_llama(
        work / "model", hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=args.hidden // 32, init_std=0.02,
    )
    data = args.data or build_words_dataset(work / "edits.jsonl", args.edits)
    results = {}
    artifacts = {}
    for name, fast in (("fast", True), ("full", False)):
        hp = MemoirHyperParams(
            inner_params=[f"model.layers[{args.layer}].mlp.down_proj.weight"],
            top_k=max(1, int(0.286 * args.intermediate)),  # the reference's 4096 / 14336
            n_iter=args.n_iter,
            early_stop_loss=-1.0,  # run every step in both loops so they do equal work
            prompt_feature_agg="mean",
            fast_loop=fast,
            checkpoint_every=10**9,
        ).validate()
        started = time.perf_counter()
        artifacts[name] = run_edit_job(model, data, hp, work / name, limit=args.edits, progress=False)
        elapsed = time.perf_counter() - started
        results[name] = {"seconds": round(elapsed, 2), "edits_per_minute": round(60 * args.edits / elapsed, 2)}
        print(f"{name:5} loop: {args.edits} edits in {elapsed:.1f} s ({results[name]['edits_per_minute']} edits/min)")
    same_masks = torch.equal(artifacts["fast"].masks, artifacts["full"].masks)
    max_diff = float((artifacts["fast"].memory - artifacts["full"].memory).abs().max())
    speedup = results["full"]["seconds"] / results["fast"]["seconds"]
    results.update(speedup=round(speedup, 2), same_masks=same_masks, max_memory_diff=max_diff, args=vars(args))
    print(f"speed-up {speedup:.2f}x; same masks: {same_masks}; max |memory diff| {max_diff:.2e}")
    print("(job time includes model load, templates and background features, equal for both loops)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
