"""`memoir` command line: edit, evaluate, background, inspect, convert, tiny-model.

The MEMOIR reference's spellings (`--top_k`, `--irr_threshold`, `--ds_size`, `--hparams_dir`,
`--data_type`, `--sequential_edit`, `--editing_method=MEMOIR`, any `--<hyperparameter>=VALUE`)
are accepted next to ours; docs/migrating.md maps its commands to these.

Every refusal is one line, `memoir <command>: error: ...`, with exit status 2. Paths are
checked before torch is imported and hyperparameters against the model's config.json before
any weight or data set is read, so a mistake costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("memoir")

# --data_type as the reference spells it -> our dataset kind, and the file the reference reads
# from its --data_dir (used when --data / --data_dir names a directory).
DATA_TYPES = {"zsre": "zsre", "hallucination": "hallucination", "temporal": "temporal"}
REFERENCE_FILES = {"zsre": ("ZsRE", "zsre_mend_edit.json"), "hallucination": ("hallucination", "hallucination-edit.json"),
                   "temporal": ("temporal", "temporal-edit.json")}


class UsageError(Exception):
    """A refusal that names the flag at fault; printed as one line, exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors without the usage block in front: the error is the one line a user reads."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- argument types


def _data_type(text: str) -> str:
    kind = DATA_TYPES.get(text.lower())
    if kind is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported (allowed: ZsRE, hallucination, temporal)")
    return kind


def _editing_method(text: str) -> str:
    if text.upper() != "MEMOIR":
        raise argparse.ArgumentTypeError(f"{text!r}: this tool runs MEMOIR only (allowed: MEMOIR)")
    return "MEMOIR"


class _Override(argparse.Action):
    """Collect hyperparameter overrides in order as (key, value, the flag as typed), for messages."""

    def __init__(self, option_strings, dest, key=None, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        from .hparams import HParamsError, parse_override

        if self.key is None:  # --set KEY=VALUE
            try:
                key, value = parse_override(value)
            except HParamsError as exc:
                parser.error(str(exc))
            flag = f"--set {key}"
        else:
            key, flag = self.key, option_string
            if isinstance(value, str):
                value = parse_override(f"{key}={value}")[1]
        overrides = list(getattr(namespace, "overrides", None) or [])
        overrides.append((key, value, flag))
        setattr(namespace, "overrides", overrides)


def _add_overrides(p, edit_flags: bool = False) -> None:
    p.add_argument("--set", dest="overrides", action=_Override, metavar="KEY=VALUE",
                   help="override a hyperparameter of the YAML (repeatable; VALUE is read as YAML: 4096, 0.4, true, a path); "
                        "the reference's --KEY=VALUE spelling works too")
    p.set_defaults(overrides=[])
    if edit_flags:  # the settings the reference's edit commands pass on the command line
        p.add_argument("--top-k", "--top_k", dest="overrides", action=_Override, key="top_k", type=int, metavar="N",
                       help="mask width: the number of down_proj inputs each edit trains (overrides top_k)")
        p.add_argument("--irr-threshold", "--irr_threshold", dest="overrides", action=_Override, key="irr_threshold",
                       type=float, metavar="X", help="mask overlap a prompt needs to use an edit, 0-1 (overrides irr_threshold)")
        p.add_argument("--RUN_SAVE_BACKGROUND_FEATURES", dest="overrides", action=_Override, key="RUN_SAVE_BACKGROUND_FEATURES",
                       nargs="?", const="true", metavar="BOOL",
                       help="compute the background features (as `memoir background` does) over the locality prompts of "
                            "--data's first --ds_size records (default num_background_texts), save them where the YAML's "
                            "dir_to_save_background_features (else dir_background_features) says, a .pt name as the "
                            ".safetensors file beside it, and edit nothing")


def _add_reference_flags(p) -> None:
    p.add_argument("--data_type", type=_data_type, metavar="{ZsRE,hallucination,temporal}",
                   help="read --data as this format (default: told from the first record's keys)")
    p.add_argument("--editing_method", type=_editing_method, metavar="MEMOIR",
                   help="accepted for the reference's command lines; this tool runs MEMOIR only")


# ---------------------------------------------------------------------- sub-commands


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="apply a dataset's edits sequentially and write (or extend) an artifact")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", "--data_dir", dest="data", required=True,
                   help="edit dataset: ZsRE (MEND), hallucination, temporal JSON or plain JSONL; a directory is read "
                        "as the reference's --data_dir (with --data_type)")
    p.add_argument("--hparams", "--hparams_dir", dest="hparams", required=True,
                   help="MEMOIR hyperparameter YAML (the reference's files load as they are)")
    p.add_argument("--out", help="artifact directory (resumed if it holds this job, see --append); "
                                 "not needed with RUN_SAVE_BACKGROUND_FEATURES")
    p.add_argument("--append", action="store_true", help="add these edits to an existing artifact")
    p.add_argument("--limit", "--ds_size", dest="limit", type=int, metavar="N",
                   help="edit the first N usable records (with --skip-invalid, skipped records do not count)")
    p.add_argument("--evaluate", action="store_true", help="evaluate the edits afterwards (Rel/Gen/Loc)")
    p.add_argument("--skip-invalid", action="store_true", help="leave out records that cannot be edited (e.g. empty targets)")
    p.add_argument("--sequential_edit", action="store_true",
                   help="accepted for the reference's command lines: this tool always edits sequentially")
    p.add_argument("--no-progress", action="store_true")
    _add_overrides(p, edit_flags=True)
    _add_reference_flags(p)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Rel/Gen/Loc of an artifact's edits, pre- and post-edit")
    p.add_argument("--model", required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", "--data_dir", dest="data", required=True)
    p.add_argument("--limit", "--ds_size", dest="limit", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-invalid", action="store_true", help="leave out records that cannot be edited (e.g. empty targets)")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--plot", help="write a PNG plot of the metrics here")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="score the requests in N Ray tasks (same metrics as one process; needs `pip install 'ray[serve]'`)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1, help="CPUs Ray reserves for each worker (default 1)")
    p.add_argument("--ray-address", help="Ray cluster to use (default: RAY_ADDRESS, else a local one for this run)")
    _add_reference_flags(p)


def _add_background(sub) -> None:
    p = sub.add_parser("background", help="compute background features (mean down_proj input over irrelevant texts)")
    p.add_argument("--model", required=True)
    p.add_argument("--texts", required=True, help="a .txt (one text per line) or any supported dataset file")
    p.add_argument("--hparams", "--hparams_dir", dest="hparams", required=True, help="names the edited layer (inner_params)")
    p.add_argument("--num", type=int, default=100, help="number of texts (default 100)")
    p.add_argument("--components", type=int, default=0,
                   help="also store the texts' top N principal directions (for background_components N; needs more "
                        "than N texts)")
    p.add_argument("--out", required=True, help="output .safetensors")
    _add_overrides(p)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a summary of an artifact")
    p.add_argument("artifact")
    p.add_argument("--edits", type=int, default=5, help="how many edit records to list")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert the reference's background .pt to .safetensors (weights_only load)")
    p.add_argument("input")
    p.add_argument("output")


def _add_tiny_model(sub) -> None:
    p = sub.add_parser("tiny-model", help="build a small untrained model with a byte-level tokenizer that reads real "
                                          "text, for pipeline checks (offline, seconds)")
    p.add_argument("--out", required=True, help="model directory to write (e.g. runs/tiny-real)")
    p.add_argument("--texts", nargs="*", default=[], metavar="FILE",
                   help="fit the tokenizer's merges to these files (.txt lines, or a data set's strings); "
                        "default: a few built-in English sentences")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--intermediate-size", type=int, default=512, help="MLP width: the edited down_proj's inputs (default 512)")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------- cheap checks, before torch loads


def _require_file(flag: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag} {value}: {'not a file' if path.exists() else 'no such file'}")
    return path


def _resolve_data(value: str, kind: str | None, flag: str = "--data") -> Path:
    """A data set file; a directory is the reference's --data_dir: <dir>/<DataType>/<file> or <dir>/<file>."""
    path = Path(value)
    if path.is_file():
        return path
    if not path.exists():
        raise UsageError(f"{flag} {value}: no such file or directory")
    if kind is None:
        raise UsageError(f"{flag} {value}: is a directory; give a data set file, or --data_type to pick the "
                         "reference's file in it")
    folder, name = REFERENCE_FILES[kind]
    tried = [path / folder / name, path / name]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise UsageError(f"{flag} {value}: has no {name} (looked for {', '.join(map(str, tried))})")


def _overrides(args) -> dict:
    return {key: (value, flag) for key, value, flag in args.overrides}


def _reference_overrides(extras: list[str], parser: argparse.ArgumentParser) -> list[tuple]:
    """The reference passes any hyperparameter as --KEY=VALUE (its `top_k`, `n_iter`, ...): accept those; refuse the
    rest like argparse does, with the closest flag or key."""
    from .hparams import HParamsError, close_keys, hyperparameter_names, parse_override

    names = set(hyperparameter_names())
    found = []
    for token in extras:
        key = token.lstrip("-").partition("=")[0]
        if token.startswith("--") and "=" in token and key in names:
            try:
                found.append((key, parse_override(token[2:], flag=f"--{key}")[1], f"--{key}"))
            except HParamsError as exc:
                parser.error(str(exc))
            continue
        flags = [o for action in parser._actions for o in action.option_strings]
        close = (difflib.get_close_matches(token.partition("=")[0], flags, n=1, cutoff=0.75)
                 or [f"--{k}=VALUE" for k in close_keys(key)])
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        parser.error(f"unrecognized argument: {token}{hint}")
    return found


# ---------------------------------------------------------------------- commands


def _load_hparams(args, background_job: bool = False):
    """The YAML with the command line's overrides, checked against the model's config.json."""
    from .hparams import MemoirHyperParams
    from .preflight import check_model_dir, preflight

    check_model_dir(args.model)  # before torch is imported: a wrong path costs well under a second
    _require_file("--hparams", args.hparams)
    hp = MemoirHyperParams.from_yaml(args.hparams, _overrides(args))
    background_job = background_job or hp.RUN_SAVE_BACKGROUND_FEATURES
    if not background_job and getattr(args, "command", "") == "edit" and not args.out:
        raise UsageError("--out is required: the artifact directory to write (only RUN_SAVE_BACKGROUND_FEATURES runs without it)")
    _, device = preflight(hp, args.model, background_job=background_job)
    return hp, device


def cmd_edit(args) -> int:
    from .preflight import check_model_dir

    check_model_dir(args.model)
    data = _resolve_data(args.data, args.data_type)
    hp, device = _load_hparams(args)
    if hp.RUN_SAVE_BACKGROUND_FEATURES:
        return _run_save_background_features(args, hp, device, data)

    from .datasets import load_edit_dataset
    from .editor import run_edit_job

    requests = load_edit_dataset(data, kind=args.data_type or "auto", limit=args.limit, skip_invalid=args.skip_invalid)
    started = time.perf_counter()
    artifact = run_edit_job(args.model, requests, hp, args.out, append=args.append, progress=not args.no_progress,
                            device=device, data_label=str(data))
    elapsed = time.perf_counter() - started
    print(f"artifact {args.out}: {artifact.manifest.num_edits} edits, version {artifact.manifest.version} ({elapsed:.1f} s)")
    if args.evaluate:
        from .evaluate import evaluate_edits, format_table
        from .hf_model import MemoirHFModel

        hf = MemoirHFModel.from_pretrained(args.model, artifact=args.out, device=device)
        print(format_table(evaluate_edits(hf, requests)))
    return 0


def _run_save_background_features(args, hp, device: str, data: Path) -> int:
    """The reference's RUN_SAVE_BACKGROUND_FEATURES mode: background features over the data set's locality
    prompts (each followed by its answer, as the reference feeds them), saved, and no edit made."""
    from .background import save_background_features
    from .datasets import load_locality_texts
    from .preflight import background_save_path

    out = background_save_path(hp)
    texts = load_locality_texts(data, limit=args.limit or hp.num_background_texts)
    save_background_features(args.model, hp.module_path, texts, out, device=device, data_name=str(data))
    print(f"RUN_SAVE_BACKGROUND_FEATURES: background features of {len(texts)} locality prompts of {data} at "
          f"{hp.module_path} -> {out}; no edits were made (set dir_background_features: {out} to use them)")
    return 0


def cmd_evaluate(args) -> int:
    from .preflight import check_model_dir

    check_model_dir(args.model)
    data = _resolve_data(args.data, args.data_type)
    if args.data_type:
        from .datasets import load_edit_dataset

        load_edit_dataset(data, kind=args.data_type, limit=1, skip_invalid=True)  # the format fits, or one line says why
    from .evaluate import evaluate_artifact, format_table, plot_metrics, write_json

    if args.ray_workers:
        from .ray_eval import evaluate_artifact_on_ray

        result = evaluate_artifact_on_ray(args.model, args.artifact, data, args.ray_workers, limit=args.limit,
                                          batch_size=args.batch_size, skip_invalid=args.skip_invalid,
                                          cpus_per_worker=args.ray_cpus_per_worker, address=args.ray_address)
    else:
        result = evaluate_artifact(args.model, args.artifact, data, limit=args.limit, batch_size=args.batch_size,
                                   skip_invalid=args.skip_invalid)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot_metrics(result, args.plot)
    return 0


def cmd_background(args) -> int:
    if Path(args.out).suffix != ".safetensors":
        raise UsageError(f"--out {args.out}: background features are written as .safetensors; name the file *.safetensors")
    _require_file("--texts", args.texts)
    hp, device = _load_hparams(args, background_job=True)
    from .background import save_background_features
    from .datasets import load_text_pool

    if args.components < 0:
        raise UsageError(f"--components {args.components}: expected 0 or more principal directions")
    texts = load_text_pool(args.texts, limit=args.num)
    if args.components >= len(texts):
        raise UsageError(f"--components {args.components} needs more texts than components; {args.texts} gives "
                         f"{len(texts)} (--num {args.num})")
    save_background_features(args.model, hp.module_path, texts, args.out, device=device, data_name=args.texts,
                             components=args.components)
    extra = f" and {args.components} principal directions" if args.components else ""
    print(f"background features{extra} of {len(texts)} texts at {hp.module_path} -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    import dataclasses

    from vllm_memoir.core import load_artifact

    artifact = load_artifact(args.artifact)
    m = artifact.manifest
    enabled = rolled_back = 0
    for edit in artifact.edits:
        enabled += edit.enabled
        rolled_back += edit.rolled_back
    print(f"MEMOIR artifact {args.artifact} (format {m.format_version}, version {m.version})")
    print(f"  base model     {m.base_model} (fingerprint {m.base_fingerprint[:16]})")
    print(f"  edited module  {m.module_path}  memory {m.hidden_size}x{m.intermediate_size} {m.dtype}")
    print(f"  routing        top_k={m.top_k} irr_threshold={m.irr_threshold} route_margin={m.route_margin} "
          f"aggregation={m.aggregation} background_components={m.background_components}")
    rolled = f", {rolled_back} rolled back (they did not take)" if rolled_back else ""
    print(f"  edits          {m.num_edits} ({enabled} enabled{rolled}); masks {artifact.masks.numel() / 1024:.1f} KiB")
    print(f"  memory norm    {artifact.memory.float().norm():.4f}; columns touched {(artifact.memory != 0).any(0).sum()}")
    job = m.job
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


def cmd_tiny_model(args) -> int:
    for path in args.texts:
        _require_file("--texts", path)
    if args.layers < 1 or args.intermediate_size < 1:
        raise UsageError("--layers and --intermediate-size must be at least 1")
    from .tiny_models import build_real_text_model, training_texts

    try:
        texts = training_texts(args.texts) if args.texts else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--texts: cannot read the texts ({exc})") from None
    try:
        out = build_real_text_model(args.out, texts, num_layers=args.layers, intermediate_size=args.intermediate_size,
                                    seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"small real-text model (byte-level BPE tokenizer, untrained weights) -> {out}")
    return 0


COMMANDS = {"edit": cmd_edit, "evaluate": cmd_evaluate, "background": cmd_background, "inspect": cmd_inspect,
            "convert": cmd_convert, "tiny-model": cmd_tiny_model}
# Commands that take the reference's --KEY=VALUE hyperparameter spelling.
_TAKES_HPARAMS = ("edit", "background")


def _is_user_error(exc: BaseException) -> bool:
    """Errors that mean bad input (printed as one line), as opposed to bugs (left as tracebacks)."""
    from .hparams import HParamsError

    if isinstance(exc, (UsageError, HParamsError, FileNotFoundError)):
        return True  # without importing torch: the early refusals stay fast
    from vllm_memoir.core import ArtifactError

    from .datasets import DatasetError
    from .editor import EditJobError

    return isinstance(exc, (ArtifactError, DatasetError, EditJobError))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _OneLineParser(prog="memoir", description="MEMOIR lifelong model editing tools")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_edit, _add_evaluate, _add_background, _add_inspect, _add_convert, _add_tiny_model):
        add(sub)
    return parser, sub.choices


def main(argv: list[str] | None = None) -> int:
    # Model directories are local: never spend half a minute asking the hub about a mistyped path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser, commands = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = commands[args.command]
        if args.command not in _TAKES_HPARAMS:
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = list(args.overrides) + _reference_overrides(extras, command)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if _is_user_error(exc):
            print(f"memoir {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
