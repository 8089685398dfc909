"""Where each batch row's tokens sit in a forward, read from vLLM's attention metadata.

Row r owns tokens query_start[r]:query_start[r+1], at positions seq_lens[r] - (its token
count) onwards. Everything here stays on the device the metadata lives on: the per-token
row and position are computed with tensor ops of fixed shape (the forward's token count and
batch size), so the routing step reads no batch layout on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from vllm.forward_context import get_forward_context, is_forward_context_available


@dataclass
class TokenLayout:
    query_start: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R]
    # Where each token's KV goes and each row's KV blocks (for prompts seen in parts).
    slot_mapping: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    _tokens: tuple[int, "TokenIndex"] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # Tests build layouts from lists.
        if not isinstance(self.query_start, torch.Tensor):
            self.query_start = torch.as_tensor(self.query_start)
        if not isinstance(self.seq_lens, torch.Tensor):
            self.seq_lens = torch.as_tensor(self.seq_lens)

    @property
    def num_rows(self) -> int:
        return self.seq_lens.shape[0]

    @cached_property
    def row_tokens(self) -> torch.Tensor:
        """[R] tokens each row has in this forward."""
        starts = self.query_start[: self.num_rows + 1].long()
        return starts[1:] - starts[:-1]

    @cached_property
    def row_first_position(self) -> torch.Tensor:
        """[R] prompt position of each row's first token in this forward."""
        return self.seq_lens.long() - self.row_tokens

    def tokens_of(self, num_tokens: int) -> "TokenIndex":
        """The per-token index of a forward of `num_tokens` (made once per layout)."""
        if self._tokens is None or self._tokens[0] != num_tokens:
            self._tokens = (num_tokens, TokenIndex.of(self, num_tokens))
        return self._tokens[1]

    # --- host views, for the checks and debug logs that read the layout on the host -------

    @cached_property
    def host(self) -> "HostLayout":
        return HostLayout(self.query_start[: self.num_rows + 1].tolist(), self.seq_lens.tolist())


@dataclass
class HostLayout:
    query_start: list[int]
    seq_lens: list[int]

    def tokens(self, row: int) -> tuple[int, int]:
        return self.query_start[row], self.query_start[row + 1]

    def first_position(self, row: int) -> int:
        start, end = self.tokens(row)
        return self.seq_lens[row] - (end - start)


@dataclass
class TokenIndex:
    """Per token of a forward of `num_tokens` (padding included): its row, position, validity."""

    row: torch.Tensor  # [T] int64, clamped into 0..R-1
    position: torch.Tensor  # [T] int64
    valid: torch.Tensor  # [T] bool: a real token (not CUDA-graph padding)
    is_row_last: torch.Tensor  # [T] bool: the last token its row has in this forward
    num_rows: int

    # Decode-only forward: as many tokens as rows (every row has at least one), so token i is
    # row i's only token. Decided from shapes alone, like everything else here.
    decode_only: bool = False

    @classmethod
    def of(cls, layout: TokenLayout, num_tokens: int) -> "TokenIndex":
        rows = layout.num_rows
        if num_tokens == rows:
            row, every = _decode_index(rows, layout.seq_lens.device)
            return cls(row, layout.seq_lens.long() - 1, every, every, rows, decode_only=True)
        starts = layout.query_start[: rows + 1].long()
        token = torch.arange(num_tokens, device=starts.device)
        row = torch.searchsorted(starts[1:], token, right=True)
        valid = row < rows
        row = row.clamp(max=max(rows - 1, 0))
        position = layout.row_first_position[row] + token - starts[row]
        is_row_last = valid & (token == starts[1:][row] - 1)
        return cls(row, position, valid, is_row_last, rows)


_DECODE_INDEX: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _decode_index(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(arange(rows), all True): the row index of a decode-only forward, made once per batch size."""
    key = (rows, device)
    if key not in _DECODE_INDEX:
        _DECODE_INDEX[key] = (torch.arange(rows, device=device), torch.ones(rows, dtype=torch.bool, device=device))
    return _DECODE_INDEX[key]


def current_layout() -> TokenLayout | None:
    """This forward's token layout, or None for runs without requests (profiling, warm-up)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not metadata:
        return None
    if isinstance(metadata, list):
        raise RuntimeError("MEMOIR does not support micro-batching (dual batch overlap)")
    for layer_metadata in metadata.values():
        query_start = getattr(layer_metadata, "query_start_loc", None)
        seq_lens = getattr(layer_metadata, "seq_lens", None)
        if query_start is not None and seq_lens is not None:
            return TokenLayout(query_start, seq_lens, getattr(layer_metadata, "slot_mapping", None),
                               getattr(layer_metadata, "block_table", None))
    return None
