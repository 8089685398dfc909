"""Edit-loop speed: the fast loop (cached lower layers) against the plain full-model loop.

A 32-layer Llama-shaped model with narrow random weights, editing layer 27, the same edits
and hyperparameters for both loops. Times the edit loop itself (model loading, templates and
background features are the same one-off cost for both). Prints edits/minute, the speed-up and
whether both loops produced the same masks and the same memory.

    python benchmarks/edit_speed.py --edits 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edit_tools.datasets import load_edit_dataset
from edit_tools.edit_step import apply_edit, build_edit_batch
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from edit_tools.templates import generate_context_templates
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
    requests = load_edit_dataset(data, limit=args.edits, skip_invalid=True)
    hp = MemoirHyperParams(
        inner_params=[f"model.layers[{args.layer}].mlp.down_proj.weight"],
        top_k=max(1, int(0.286 * args.intermediate)),  # the reference's 4096 / 14336
        n_iter=args.n_iter,
        early_stop_loss=-1.0,  # run every step in both loops so they do equal work
        prompt_feature_agg="mean",
    ).validate()
    # Two copies of the model, one per loop, each editing sequentially; edits are interleaved
    # (fast, full, fast, ...) so that any other load on the machine hits both alike.
    models = {name: MemoirHFModel.from_pretrained(model, module_path=hp.module_path) for name in ("fast", "full")}
    templates = generate_context_templates(models["fast"].model, models["fast"].tokenizer)
    permutation = torch.randperm(models["fast"].layer.base.weight.shape[1], generator=torch.Generator().manual_seed(0))
    seconds = {"fast": 0.0, "full": 0.0}
    masks = {"fast": [], "full": []}
    for request in requests:
        for name, hf in models.items():
            batch = build_edit_batch(hf, request.prompt, request.target, templates, request.loc)
            started = time.perf_counter()
            result = apply_edit(hf, hp, batch, permutation, None, fast=name == "fast")
            seconds[name] += time.perf_counter() - started
            masks[name].append(result.mask_indices)
    results = {
        name: {"seconds": round(s, 2), "edits_per_minute": round(60 * len(requests) / s, 2)} for name, s in seconds.items()
    }
    for name in ("fast", "full"):
        print(f"{name:5} loop: {len(requests)} edits, {results[name]['seconds']} s in the edit loop ({results[name]['edits_per_minute']} edits/min)")
    same_masks = all(torch.equal(a, b) for a, b in zip(masks["fast"], masks["full"]))
    max_diff = float((models["fast"].layer.memory - models["full"].layer.memory).abs().max())
    speedup = seconds["full"] / seconds["fast"]
    results.update(speedup=round(speedup, 2), same_masks=same_masks, max_memory_diff=max_diff, args=vars(args),
                   threads=torch.get_num_threads())
    print(f"speed-up {speedup:.2f}x; same masks: {same_masks}; max |memory diff| {max_diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
