"""`memoir` command line: edit, evaluate, background, inspect, convert."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("memoir")


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="apply a dataset's edits sequentially and write (or extend) an artifact")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", required=True, help="edit dataset: ZsRE (MEND), hallucination, temporal JSON or plain JSONL")
    p.add_argument("--hparams", required=True, help="MEMOIR hyperparameter YAML (the reference's keys are accepted)")
    p.add_argument("--out", required=True, help="artifact directory (resumed if it holds this job, see --append)")
    p.add_argument("--append", action="store_true", help="add these edits to an existing artifact")
    p.add_argument("--limit", type=int, help="use the first N records")
    p.add_argument("--evaluate", action="store_true", help="evaluate the edits afterwards (Rel/Gen/Loc)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out records that cannot be edited (e.g. empty targets)")
    p.add_argument("--no-progress", action="store_true")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Rel/Gen/Loc of an artifact's edits, pre- and post-edit")
    p.add_argument("--model", required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-invalid", action="store_true", help="leave out records that cannot be edited (e.g. empty targets)")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--plot", help="write a PNG plot of the metrics here")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="score the requests in N Ray tasks (same metrics as one process; needs `pip install 'ray[serve]'`)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1, help="CPUs Ray reserves for each worker (default 1)")
    p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else a local one for this run)")


def _add_background(sub) -> None:
    p = sub.add_parser("background", help="compute background features (mean down_proj input over irrelevant texts)")
    p.add_argument("--model", required=True)
    p.add_argument("--texts", required=True, help="a .txt (one text per line) or any supported dataset file")
    p.add_argument("--hparams", required=True, help="names the edited layer (inner_params)")
    p.add_argument("--num", type=int, default=100, help="number of texts (default 100)")
    p.add_argument("--out", required=True, help="output .safetensors")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a summary of an artifact")
    p.add_argument("artifact")
    p.add_argument("--edits", type=int, default=5, help="how many edit records to list")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert the reference's background .pt to .safetensors (weights_only load)")
    p.add_argument("input")
    p.add_argument("output")


def cmd_edit(args) -> int:
    from .editor import run_edit_job
    from .evaluate import evaluate_artifact, format_table
    from .hparams import MemoirHyperParams

    hp = MemoirHyperParams.from_yaml(args.hparams)
    started = time.perf_counter()
    artifact = run_edit_job(args.model, args.data, hp, args.out, append=args.append, limit=args.limit,
                            progress=not args.no_progress, skip_invalid=args.skip_invalid)
    elapsed = time.perf_counter() - started
    print(f"artifact {args.out}: {artifact.manifest.num_edits} edits, version {artifact.manifest.version} ({elapsed:.1f} s)")
    if args.evaluate:
        print(format_table(evaluate_artifact(args.model, args.out, args.data, limit=args.limit, skip_invalid=args.skip_invalid)))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_artifact, format_table, plot_metrics, write_json

    if args.ray_workers:
        from .ray_eval import evaluate_artifact_on_ray

        result = evaluate_artifact_on_ray(args.model, args.artifact, args.data, args.ray_workers, limit=args.limit,
                                          batch_size=args.batch_size, skip_invalid=args.skip_invalid,
                                          cpus_per_worker=args.ray_cpus_per_worker, address=args.ray_address)
    else:
        result = evaluate_artifact(args.model, args.artifact, args.data, limit=args.limit, batch_size=args.batch_size,
                                   skip_invalid=args.skip_invalid)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot_metrics(result, args.plot)
    return 0


def cmd_background(args) -> int:
    from .background import compute_background_mean, save_background
    from .datasets import load_text_pool
    from .hf_model import MemoirHFModel
    from .hparams import MemoirHyperParams

    hp = MemoirHyperParams.from_yaml(args.hparams)
    texts = load_text_pool(args.texts, limit=args.num)
    hf = MemoirHFModel.from_pretrained(args.model, module_path=hp.module_path)
    mean = compute_background_mean(hf, texts)
    save_background(mean, args.out)
    print(f"background features of {len(texts)} texts at {hp.module_path} -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    import dataclasses

    from vllm_memoir.core import load_artifact

    artifact = load_artifact(args.artifact)
    m = artifact.manifest
    enabled = sum(e.enabled for e in artifact.edits)
    print(f"MEMOIR artifact {args.artifact} (format {m.format_version}, version {m.version})")
    print(f"  base model     {m.base_model} (fingerprint {m.base_fingerprint[:16]})")
    print(f"  edited module  {m.module_path}  memory {m.hidden_size}x{m.intermediate_size} {m.dtype}")
    print(f"  routing        top_k={m.top_k} irr_threshold={m.irr_threshold} aggregation={m.aggregation}")
    print(f"  edits          {m.num_edits} ({enabled} enabled); masks {artifact.masks.numel() / 1024:.1f} KiB")
    print(f"  memory norm    {artifact.memory.float().norm():.4f}; columns touched {(artifact.memory != 0).any(0).sum()}")
    job = m.hparams.get("job")
    if job:
        print(f"  last job       {job['done']}/{job['total']} edits done")
    for edit in artifact.edits[: args.edits]:
        print("  " + json.dumps(dataclasses.asdict(edit)))
    return 0


def cmd_convert(args) -> int:
    from .background import convert_reference_background

    mean = convert_reference_background(args.input, args.output)
    print(f"{args.input} -> {args.output}: background_mean of shape {tuple(mean.shape)}")
    return 0


COMMANDS = {"edit": cmd_edit, "evaluate": cmd_evaluate, "background": cmd_background, "inspect": cmd_inspect, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoir", description="MEMOIR lifelong model editing tools")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_edit, _add_evaluate, _add_background, _add_inspect, _add_convert):
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vllm_memoir.core import ArtifactError

    from .datasets import DatasetError
    from .editor import EditJobError
    from .hparams import HParamsError

    try:
        return COMMANDS[args.command](args)
    except (ArtifactError, DatasetError, EditJobError, HParamsError, FileNotFoundError) as exc:
        print(f"memoir {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
