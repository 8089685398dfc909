"""A KV-cache size for vLLM's CPU engine, from the model instead of a share of the machine.

Without VLLM_CPU_KVCACHE_SPACE, vLLM's CPU worker reserves --gpu-memory-utilization (0.92)
of a NUMA node's memory and refuses to start when less than that is free: on a 23 GiB
machine with anything else running, a 3M-parameter model does not start, and with a lower
utilization it reserves 11 GiB and takes minutes. memoir-serve instead sets
VLLM_CPU_KVCACHE_SPACE (whole GiB per worker, at least 1, as vLLM reads it) to what
DEFAULT_SEQUENCES full-length sequences need, capped to CAP_FRACTION of the memory the
weights leave free. An explicit VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes or
--gpu-memory-utilization wins. Imports no vLLM.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_memoir.serve_args import ServeArgs, human_int

ENV = "VLLM_CPU_KVCACHE_SPACE"
GIB = 1 << 30
# Full-length sequences the cache holds at once unless --max-num-seqs says otherwise; vLLM
# queues (or preempts) requests beyond what fits, and most requests are far shorter.
DEFAULT_SEQUENCES = 4
# Share of the free memory (after the weights) the cache may take: activations, the API
# server and the rest of the machine keep the other half.
CAP_FRACTION = 0.5
# Context length assumed when neither --max-model-len nor the config gives one.
FALLBACK_MAX_MODEL_LEN = 2048
# Size used when the model's config cannot be read before vLLM starts (a hub model id).
FALLBACK_GIB = 4

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KvCacheChoice:
    gib: int  # per worker: the value for VLLM_CPU_KVCACHE_SPACE
    bytes_per_token: int  # all of a worker's layers, its share of the KV heads (0: model unknown)
    max_model_len: int
    sequences: int
    cap_gib: float  # what CAP_FRACTION of the free memory allows per worker

    @property
    def needed_bytes(self) -> int:
        return self.bytes_per_token * self.max_model_len * self.sequences

    @property
    def capped(self) -> bool:
        return self.needed_bytes > self.gib * GIB or (self.bytes_per_token == 0 and self.gib < FALLBACK_GIB)

    def describe(self) -> str:
        if self.bytes_per_token == 0:
            why = f"the model's config.json is not readable here, so {FALLBACK_GIB} GiB"
        else:
            why = (f"{self.sequences} sequences x {self.max_model_len} tokens x {_size(self.bytes_per_token)}/token "
                   f"= {_size(self.needed_bytes)}")
        if self.capped:
            why += f", capped to {CAP_FRACTION:.0%} of the memory the weights leave free"
        elif self.bytes_per_token:
            why += ", rounded up to whole GiB"
        return (f"CPU KV cache {self.gib} GiB per worker ({ENV}={self.gib}: {why}); "
                f"set {ENV}=N (GiB) or --kv-cache-memory-bytes for another size")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields (multimodal configs nest them under text_config)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "num_hidden_layers" not in config else config


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int, tp_size: int = 1) -> int:
    """Bytes one token's keys and values take in one worker: layers x KV heads x head_dim x 2 x dtype."""
    cfg = text_config(config)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    # Tensor parallelism splits the KV heads (each rank keeps at least one).
    kv_heads_per_worker = max(1, math.ceil(kv_heads / tp_size))
    return layers * kv_heads_per_worker * head_dim * 2 * dtype_bytes


def choose_kv_cache(bytes_per_token: int, max_model_len: int, sequences: int, free_bytes: int,
                    workers: int = 1) -> KvCacheChoice:
    """Whole GiB per worker for `sequences` full-length sequences, within CAP_FRACTION of `free_bytes`.

    bytes_per_token 0 (model unknown) asks for FALLBACK_GIB."""
    need_bytes = bytes_per_token * max_model_len * sequences if bytes_per_token else FALLBACK_GIB * GIB
    need_gib = math.ceil(need_bytes / GIB)
    cap_gib = CAP_FRACTION * max(free_bytes, 0) / GIB / max(workers, 1)
    gib = max(1, min(need_gib, math.floor(cap_gib)))
    return KvCacheChoice(gib=gib, bytes_per_token=bytes_per_token, max_model_len=max_model_len,
                         sequences=sequences, cap_gib=cap_gib)


def runs_on_cpu_platform() -> bool:
    """vLLM's own test (vllm.platforms.cpu_platform_plugin), without importing vLLM.

    Call after serve.install_vllm_cpu_alias(): vllm-cpu's version then reads "X+cpu".
    """
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu" or sys.platform.startswith("darwin"):
        return True
    try:
        return "cpu" in metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return False


def free_memory_per_numa_node() -> int:
    """Available memory of one NUMA node (vLLM's CPU worker sizes against its node's memory)."""
    import psutil

    nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    return psutil.virtual_memory().available // nodes


def checkpoint_bytes(model_dir: Path) -> int:
    """Size of the weight files: the free memory left once they are loaded is what the cache can use."""
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt")
               for path in model_dir.glob(pattern) if path.is_file())


def dtype_bytes(kv_cache_dtype: str, dtype: str, config: dict[str, Any]) -> int:
    if kv_cache_dtype.startswith("fp8"):
        return 1
    if kv_cache_dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[kv_cache_dtype]
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    # --dtype auto: the checkpoint's dtype; 4 bytes when unknown (over-sizing is capped anyway).
    cfg = text_config(config)
    declared = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or config.get("dtype")
                   or "float32")
    return _DTYPE_BYTES.get(declared.removeprefix("torch."), 4)


def model_max_len(config: dict[str, Any]) -> int:
    cfg = text_config(config)
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return FALLBACK_MAX_MODEL_LEN


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def explicit_kv_cache_setting(args: ServeArgs, environ: dict[str, str]) -> str | None:
    """The user's own choice of KV-cache size, if any (it wins over ours)."""
    if environ.get(ENV, "") != "":
        return f"{ENV}={environ[ENV]}"
    if args.kv_cache_memory_bytes is not None:
        return "--kv-cache-memory-bytes"
    if args.gpu_memory_utilization is not None:
        return "--gpu-memory-utilization"
    return None


def default_kv_cache(args: ServeArgs, model_dir: Path | None, free_bytes: int | None = None) -> KvCacheChoice:
    """The KV-cache size for serving `model_dir` (None: not a local directory) with `args`."""
    tp_size = human_int(args.tensor_parallel_size) or 1
    pp_size = human_int(args.pipeline_parallel_size) or 1
    config, per_token = None, 0
    if model_dir is not None:
        try:
            config = read_config(model_dir)
            per_token = kv_bytes_per_token(config, dtype_bytes(args.kv_cache_dtype, args.dtype, config), tp_size)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no config.json with these fields
            config, per_token = None, 0
    # Pipeline stages each hold their share of the layers.
    per_token = math.ceil(per_token / pp_size)
    max_len = human_int(args.max_model_len) or (model_max_len(config) if config else FALLBACK_MAX_MODEL_LEN)
    sequences = human_int(args.max_num_seqs) or DEFAULT_SEQUENCES
    if free_bytes is None:
        free_bytes = free_memory_per_numa_node() - (checkpoint_bytes(model_dir) if model_dir else 0)
    return choose_kv_cache(per_token, max_len, sequences, free_bytes, workers=tp_size * pp_size)
