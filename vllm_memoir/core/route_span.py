"""Which prompt tokens a route feature averages: all of them, or the last user message's.

The reference routes on the mean of layer L's down_proj input over every prompt token. A
chat endpoint wraps the user's question in a template, often after a long system prompt and
earlier turns, which then dominate that mean and move the route. An artifact made with
`routing_span: last_user_message` averages only the tokens of the last user message, found
from the chat template's role markers in the prompt token ids:

    ... <|start_header_id|>user<|end_header_id|>\\n\\n | What is X? | <|eot_id|><|start_header_id|>assistant ...
        `------------- user_start marker ------------'  `- span -'  `------------ message_end marker --------

The span starts right after the last occurrence of `user_start` and ends where the first
`message_end` after it begins (the prompt's end when there is none). A prompt without a user
marker (a raw prompt sent to /v1/completions) or with an empty last user message is routed
on all its tokens, exactly as the reference does.

One implementation for both sides: the edit tools (training feature, evaluation, routing of
the transformers reference) and the plugin (on the host, from the prompt token ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PROMPT = "prompt"
LAST_USER_MESSAGE = "last_user_message"
ROUTING_SPANS = (PROMPT, LAST_USER_MESSAGE)
MARKER_KEYS = ("user_start", "message_end")


class RouteSpanError(ValueError):
    """A routing span setting that cannot be used; the message names the field."""


def _occurrences(ids: np.ndarray, marker: np.ndarray) -> np.ndarray:
    """Start positions of every occurrence of `marker` in `ids` (ascending; may overlap)."""
    k = marker.shape[0]
    if k == 0 or ids.shape[0] < k:
        return np.empty(0, dtype=np.int64)
    candidates = np.flatnonzero(ids[: ids.shape[0] - k + 1] == marker[0])
    for offset in range(1, k):  # markers are a few tokens: one vector compare per marker token
        if candidates.size == 0:
            break
        candidates = candidates[ids[candidates + offset] == marker[offset]]
    return candidates.astype(np.int64)


@dataclass(frozen=True)
class SpanBoundaries:
    """Where spans may start (right after a user marker) and end (where a message-end marker
    begins) in one prompt: every candidate, for per-KV-block bookkeeping in the plugin."""

    starts: np.ndarray  # int64, ascending
    ends: np.ndarray  # int64, ascending

    @property
    def last(self) -> int:
        """The last position where a span may start or end; -1 when there is none."""
        return int(max(self.starts[-1] if self.starts.size else -1, self.ends[-1] if self.ends.size else -1))


@dataclass(frozen=True)
class RouteSpan:
    kind: str = PROMPT
    user_start: tuple[int, ...] = ()
    message_end: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ROUTING_SPANS:
            raise RouteSpanError(f"routing_span {self.kind!r} is not one of {ROUTING_SPANS}")
        if self.kind == LAST_USER_MESSAGE and not (self.user_start and self.message_end):
            raise RouteSpanError("routing_span 'last_user_message' needs non-empty user_start and message_end marker ids")
        if self.kind == PROMPT and (self.user_start or self.message_end):
            raise RouteSpanError("routing_span 'prompt' takes no marker ids")

    @property
    def whole_prompt(self) -> bool:
        return self.kind == PROMPT

    # --- the manifest's fields ----------------------------------------------------------------

    @classmethod
    def from_manifest(cls, kind: Any, markers: Any, aggregation: str, where: str) -> "RouteSpan":
        """The span an artifact's manifest describes; RouteSpanError naming the field otherwise."""
        if kind not in ROUTING_SPANS:
            raise RouteSpanError(f"{where}: routing_span {kind!r} is not one of {ROUTING_SPANS}")
        if not isinstance(markers, dict):
            raise RouteSpanError(f"{where}: routing_span_markers must be an object")
        if kind == PROMPT:
            if markers:
                raise RouteSpanError(f"{where}: routing_span_markers must be empty for routing_span 'prompt'")
            return cls()
        if aggregation == "last":
            # The last span token may sit in a chunk or cached block that reached the layer earlier,
            # where only sums are kept: the plugin could not reproduce the feature exactly.
            raise RouteSpanError(f"{where}: routing_span 'last_user_message' needs aggregation mean or "
                                 f"mean_decentered, not 'last'")
        if sorted(markers) != sorted(MARKER_KEYS):
            raise RouteSpanError(f"{where}: routing_span_markers must hold exactly {list(MARKER_KEYS)}, found {sorted(markers)}")
        for key in MARKER_KEYS:
            ids = markers[key]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                               and i >= 0 for i in ids):
                raise RouteSpanError(f"{where}: routing_span_markers.{key} must be a non-empty list of token ids")
        return cls(LAST_USER_MESSAGE, tuple(markers["user_start"]), tuple(markers["message_end"]))

    def manifest_markers(self) -> dict[str, list[int]]:
        if self.whole_prompt:
            return {}
        return {"user_start": list(self.user_start), "message_end": list(self.message_end)}

    # --- the span of a prompt ------------------------------------------------------------------

    def boundaries(self, prompt_ids: Sequence[int] | np.ndarray) -> SpanBoundaries:
        ids = np.asarray(prompt_ids, dtype=np.int64)
        starts = _occurrences(ids, np.asarray(self.user_start, dtype=np.int64)) + len(self.user_start)
        ends = _occurrences(ids, np.asarray(self.message_end, dtype=np.int64))
        return SpanBoundaries(starts, ends)

    def span(self, prompt_ids: Sequence[int] | np.ndarray, boundaries: SpanBoundaries | None = None) -> tuple[int, int]:
        """[start, end) of the tokens the route feature averages, as prompt positions."""
        n = len(prompt_ids)
        if self.whole_prompt:
            return 0, n
        found = boundaries if boundaries is not None else self.boundaries(prompt_ids)
        if found.starts.size == 0:
            return 0, n  # no user message: a raw prompt, routed like the reference
        start = int(found.starts[-1])
        later = found.ends[found.ends >= start]
        end = int(later[0]) if later.size else n
        if end <= start:
            return 0, n  # an empty last user message has no tokens to average
        return start, end

    def mask(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: True on each row's span tokens. Rows are batches of padded prompts (and
        maybe targets): prompt_mask marks each row's prompt tokens, contiguous (left or right padding)."""
        if self.whole_prompt:
            return prompt_mask
        out = torch.zeros_like(prompt_mask, dtype=torch.bool)
        for row in range(prompt_mask.shape[0]):
            positions = prompt_mask[row].nonzero().flatten()
            if positions.numel() == 0:
                continue
            start, end = self.span(input_ids[row, positions].tolist())
            out[row, positions[start:end]] = True
        return out
