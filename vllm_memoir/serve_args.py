"""The few `vllm serve` arguments memoir-serve reads before it hands the command line to vLLM.

vLLM's own parser takes 10-25 s to import and build the engine config on a small CPU
machine, which is as long as a failing start-up used to take; this reads the handful of
flags the pre-flight checks and the KV-cache default need, in milliseconds, and leaves
everything else (and every error in it) to vLLM's parser, which still parses the whole line.
Imports no vLLM.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass


class _Unparsable(Exception):
    """Our partial parser could not read the line (e.g. a flag without its value); vLLM will say why."""


class _QuietParser(argparse.ArgumentParser):
    def error(self, message):
        raise _Unparsable(message)


@dataclass(frozen=True)
class ServeArgs:
    """What memoir-serve looks at; None where the flag was not given (vLLM's default then applies)."""

    model: str | None = None
    hf_overrides: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    max_model_len: str | None = None
    max_num_seqs: str | None = None
    tensor_parallel_size: str | None = None
    pipeline_parallel_size: str | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    enable_prompt_embeds: bool | None = None
    speculative_config: str | None = None
    kv_cache_memory_bytes: str | None = None
    gpu_memory_utilization: str | None = None
    wants_help: bool = False
    complete: bool = True  # False: the line did not parse here; checks that need it are left to vLLM


def _parser() -> argparse.ArgumentParser:
    parser = _QuietParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model")
    parser.add_argument("--hf-overrides")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--max-model-len")
    parser.add_argument("--max-num-seqs")
    parser.add_argument("-tp", "--tensor-parallel-size")
    parser.add_argument("-pp", "--pipeline-parallel-size")
    parser.add_argument("--speculative-config")
    parser.add_argument("--kv-cache-memory-bytes")
    parser.add_argument("--gpu-memory-utilization")
    for flag in ("enable-prefix-caching", "enable-chunked-prefill", "enable-prompt-embeds"):
        parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("-h", "--help", nargs="?", const="", dest="wants_help")
    return parser


def _dashed(token: str) -> str:
    """vLLM accepts --max_model_len for --max-model-len; so do we (the value is left alone)."""
    if not token.startswith("--"):
        return token
    key, sep, value = token.partition("=")
    return key.replace("_", "-") + sep + value


def parse_serve_args(argv: list[str]) -> ServeArgs:
    """`vllm serve [MODEL] [options]`: the model is the first argument unless it is an option, else --model."""
    tokens = [_dashed(token) for token in argv]
    positional_model = tokens[0] if tokens and not tokens[0].startswith("-") else None
    try:
        known, _ = _parser().parse_known_args(tokens[1:] if positional_model else tokens)
    except _Unparsable:
        return ServeArgs(model=positional_model, complete=False)
    values = {name: value for name, value in vars(known).items() if name != "wants_help"}
    values["model"] = positional_model or known.model
    return ServeArgs(**values, wants_help=known.wants_help is not None)


_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)")
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str | None) -> int | None:
    """'2048', '4k' (4000), '4K' (4096) as vLLM reads them; None for absent, 'auto', -1 or anything else."""
    if text is None:
        return None
    match = _HUMAN_INT.fullmatch(text.strip())
    if match is None:
        return None
    return int(float(match[1]) * _MULTIPLIERS[match[2]])
