"""The `--hf-overrides` that select a MEMOIR model class and its artifact, for launch scripts.

    python -m vllm_memoir.hf_overrides MODEL_DIR ARTIFACT_DIR [--pin]
    -> {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": "/abs/ARTIFACT_DIR", ...}
    python -m vllm_memoir.hf_overrides MODEL_DIR ARTIFACT_DIR --routing-flags
    -> the vLLM flags the artifact needs (empty for an edit at the last decoder layer)

The MEMOIR class is picked from the model's config.json `architectures`. With --pin the
artifact's version and memory-file sha256 are added (memoir_expected_version,
memoir_expected_sha256): every replica started with these overrides refuses an artifact
that differs from the one seen here (vllm_memoir.validation.check_expected_artifact).
Imports no vLLM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_memoir.core import read_manifest
from vllm_memoir.validation import (EXPECTED_SHA256_KEY, EXPECTED_VERSION_KEY, MemoirConfigError, artifact_sha256,
                                   routing_flags_for)

# The base architecture in a checkpoint's config.json -> the MEMOIR class registered by the plugin.
MEMOIR_CLASSES = {
    "LlamaForCausalLM": "MemoirLlamaForCausalLM",
    "MistralForCausalLM": "MemoirMistralForCausalLM",
    "Qwen2ForCausalLM": "MemoirQwen2ForCausalLM",
}


def memoir_architecture(model_dir: str | Path) -> str:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise MemoirConfigError(f"{config_path}: missing (serve a local model directory; download it first)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for name in architectures:
        if name in MEMOIR_CLASSES:
            return MEMOIR_CLASSES[name]
        if name in MEMOIR_CLASSES.values():
            return name
    raise MemoirConfigError(
        f"{config_path}: architectures {architectures} has no MEMOIR class (supported: {sorted(MEMOIR_CLASSES)})"
    )


def parse_overrides(text: str) -> dict[str, object]:
    """The JSON object given to --hf-overrides (MemoirConfigError saying what is wrong with it)."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemoirConfigError(f"--hf-overrides is not valid JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(overrides, dict):
        raise MemoirConfigError(f"--hf-overrides must be a JSON object, got {type(overrides).__name__}: {text[:200]!r}")
    return overrides


def memoir_class_in(overrides: dict[str, object]) -> str | None:
    """The MEMOIR class the overrides select, None if they select none; refuses Memoir* names that do not exist."""
    architectures = overrides.get("architectures")
    if architectures is None:
        return None
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise MemoirConfigError(f"--hf-overrides architectures must be a list of class names, got {architectures!r}")
    for name in architectures:
        if name in MEMOIR_CLASSES.values():
            return name
        if name.startswith("Memoir"):
            raise MemoirConfigError(
                f"--hf-overrides architectures {name!r} is not a MEMOIR model class "
                f"(the plugin registers {', '.join(MEMOIR_CLASSES.values())})"
            )
    return None


def artifact_pin(artifact_dir: str | Path) -> dict[str, object]:
    manifest = read_manifest(artifact_dir)
    return {EXPECTED_VERSION_KEY: manifest.version, EXPECTED_SHA256_KEY: artifact_sha256(manifest)}


def memoir_hf_overrides(model_dir: str | Path, artifact_dir: str | Path, pin: bool = False) -> dict[str, object]:
    """Overrides for serving `model_dir` with `artifact_dir` (an absolute path: replicas run elsewhere)."""
    overrides: dict[str, object] = {
        "architectures": [memoir_architecture(model_dir)],
        "memoir_path": str(Path(artifact_dir).resolve()),
    }
    if pin:
        overrides.update(artifact_pin(artifact_dir))
    return overrides


def routing_flags(model_dir: str | Path, artifact_dir: str | Path) -> list[str]:
    """The vLLM flags serving `artifact_dir` on `model_dir` needs (validation.routing_flags_for)."""
    config_path = Path(model_dir) / "config.json"
    num_layers = json.loads(config_path.read_text()).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise MemoirConfigError(f"{config_path}: num_hidden_layers must be an integer, got {num_layers!r}")
    return routing_flags_for(read_manifest(artifact_dir).layer_index, num_layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_memoir.hf_overrides", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("artifact_dir")
    parser.add_argument("--pin", action="store_true", help="add the artifact's version and sha256 as a pin")
    parser.add_argument("--routing-flags", action="store_true",
                        help="print the vLLM flags the artifact needs instead (none for an edit at the last layer)")
    args = parser.parse_args(argv)
    try:
        if args.routing_flags:
            print(" ".join(routing_flags(args.model_dir, args.artifact_dir)))
            return
        print(json.dumps(memoir_hf_overrides(args.model_dir, args.artifact_dir, pin=args.pin)))
    except Exception as exc:  # ArtifactError, MemoirConfigError, OSError: one line for the shell script
        raise SystemExit(f"memoir hf-overrides: error: {exc}") from None


if __name__ == "__main__":
    main()
