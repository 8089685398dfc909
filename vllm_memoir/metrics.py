"""Prometheus counters of routing decisions and of the routing step's own time.

Decisions are made in the worker process, while /metrics is served by the API server
process. They meet through prometheus_client's multiprocess mode: when
PROMETHEUS_MULTIPROC_DIR is set before any process imports prometheus_client (memoir-serve
sets it; vLLM itself sets it when it runs several API server processes), counters written
here land in that directory and vLLM's /metrics collects every process's files. Without it
the counters still count, but only inside the worker.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_counters = None


def _get_counters():
    global _counters
    if _counters is None:
        from prometheus_client import Counter

        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            logger.info("MEMOIR: PROMETHEUS_MULTIPROC_DIR is unset; routing counters stay out of /metrics "
                        "(memoir-serve sets it)")
        _counters = (
            Counter("memoir:routed_requests", "Requests routed to a stored MEMOIR edit"),
            Counter("memoir:unrouted_requests", "Requests served by the base model (no edit matched)"),
            # The plugin's whole per-forward cost, so operators (and benchmarks/serving_overhead.py)
            # read its overhead directly instead of inferring it from noisy end-to-end throughput.
            Counter("memoir:routing_step_seconds", "Time in the MEMOIR routing op (all forwards, rank 0)"),
            Counter("memoir:routing_steps", "Forwards that ran the MEMOIR routing op with requests (rank 0)"),
        )
    return _counters


def count_decision(routed: bool) -> None:
    routed_counter, unrouted_counter, _, _ = _get_counters()
    (routed_counter if routed else unrouted_counter).inc()


def count_routing_step(seconds: float) -> None:
    _, _, step_seconds, steps = _get_counters()
    step_seconds.inc(seconds)
    steps.inc()


_inexact_span_counter = None


def count_inexact_span_feature() -> None:
    """A route feature over the last user message that block sums could not give exactly
    (vllm_memoir/routing/span_sums.py): the request was routed on an approximation."""
    global _inexact_span_counter
    if _inexact_span_counter is None:
        from prometheus_client import Counter

        _inexact_span_counter = Counter(
            "memoir:inexact_span_features", "Route features over the last user message approximated from whole KV blocks")
    _inexact_span_counter.inc()
