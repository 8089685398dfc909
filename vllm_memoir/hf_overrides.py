"""The `--hf-overrides` that select a MEMOIR model class and its artifact, for launch scripts.

    python -m vllm_memoir.hf_overrides MODEL_DIR ARTIFACT_DIR [--pin]
    -> {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": "/abs/ARTIFACT_DIR", ...}
    python -m vllm_memoir.hf_overrides MODEL_DIR ARTIFACT_DIR --routing-flags
    -> the vLLM flags the artifact needs (empty for an edit at the last decoder layer)
    python -m vllm_memoir.hf_overrides MODEL_DIR ARTIFACT_DIR --engine-args [--pin]
    -> both, one argument per line (what deploy/serve.sh passes to memoir-serve)

The MEMOIR class is picked from the model's config.json `architectures`. With --pin the
artifact's version and memory-file sha256 are added (memoir_expected_version,
memoir_expected_sha256): every replica started with these overrides refuses an artifact
that differs from the one seen here (vllm_memoir.validation.check_expected_artifact).
The rules live in vllm_memoir.engine_requirements. Imports no vLLM.
"""

from __future__ import annotations

import argparse
import json
from vllm_memoir.engine_requirements import engine_args, memoir_hf_overrides, routing_flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_memoir.hf_overrides", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("artifact_dir")
    parser.add_argument("--pin", action="store_true", help="add the artifact's version and sha256 as a pin")
    parser.add_argument("--routing-flags", action="store_true",
                        help="print the vLLM flags the artifact needs instead (none for an edit at the last layer)")
    parser.add_argument("--engine-args", action="store_true",
                        help="print the routing flags and --hf-overrides, one argument per line")
    args = parser.parse_args(argv)
    try:
        if args.engine_args:
            print("\n".join(engine_args(args.model_dir, args.artifact_dir, pin=args.pin)))
            return
        if args.routing_flags:
            print(" ".join(routing_flags(args.model_dir, args.artifact_dir)))
            return
        print(json.dumps(memoir_hf_overrides(args.model_dir, args.artifact_dir, pin=args.pin)))
    except Exception as exc:  # ArtifactError, MemoirConfigError, OSError: one line for the shell script
        raise SystemExit(f"memoir hf-overrides: error: {exc}") from None


if __name__ == "__main__":
    main()
