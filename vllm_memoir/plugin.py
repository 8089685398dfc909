"""vLLM general plugin: runs in every vLLM process (API server, engine core, workers)."""

from __future__ import annotations

import logging
import os

ARCHITECTURES = ("MemoirLlamaForCausalLM", "MemoirQwen2ForCausalLM", "MemoirMistralForCausalLM")
LOG_LEVEL_ENV = "MEMOIR_LOG_LEVEL"


def register() -> None:
    from vllm import ModelRegistry

    _configure_logging()
    _split_compiled_graphs_at_routing_op()
    for name in ARCHITECTURES:
        # Lazy "module:class" strings: the model module imports torch-heavy vLLM layers.
        ModelRegistry.register_model(name, f"vllm_memoir.models:{name}")


def _split_compiled_graphs_at_routing_op() -> None:
    """Make the routing op one of vLLM's default graph-splitting ops, in every process.

    vLLM splits the compiled model at these ops and captures the pieces between them as CUDA
    graphs (piecewise mode); a splitting op runs eagerly, so the routing op's host-side
    decisions run on every step. The default list is vLLM's attention ops, copied into each
    engine's compilation config when it is built, so the op is added before any config
    exists (register() runs first). In models without the op a splitting op is a no-op.
    """
    from vllm.config import CompilationConfig

    from vllm_memoir.engine_requirements import ROUTING_OP

    if ROUTING_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(ROUTING_OP)


def _configure_logging() -> None:
    """Log vllm_memoir through a handler formatted like vLLM's, at MEMOIR_LOG_LEVEL (default INFO).

    Its own handler, because vLLM's filters at VLLM_LOGGING_LEVEL: MEMOIR_LOG_LEVEL=DEBUG
    shows each request's routing decision without turning on vLLM's debug logs.
    """
    memoir_logger = logging.getLogger("vllm_memoir")
    if memoir_logger.handlers:
        return
    vllm_handlers = [h for h in logging.getLogger("vllm").handlers if isinstance(h, logging.StreamHandler)]
    handler = logging.StreamHandler(vllm_handlers[0].stream if vllm_handlers else None)
    if vllm_handlers and vllm_handlers[0].formatter is not None:
        handler.setFormatter(vllm_handlers[0].formatter)
    memoir_logger.addHandler(handler)
    memoir_logger.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
    memoir_logger.propagate = False
