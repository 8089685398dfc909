"""The MEMOIR math: prompt features, TopHash masks, overlap matching, masked residual.

This is the one implementation used by the offline edit tools (transformers) and by
the vLLM plugin, so that an edit trained offline routes identically when served.
All functions are pure torch and work on CPU or GPU.
"""

from __future__ import annotations

import numpy as np
import torch

AGGREGATIONS = ("mean", "mean_decentered", "last")
NO_ROUTE = -1

# Constants of the SWAR popcount on 64-bit words (signed int64 arithmetic wraps in torch).
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def aggregate_prompt_feature(
    x: torch.Tensor,
    prompt_mask: torch.Tensor,
    aggregation: str,
    background_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """One feature vector per row from the down_proj inputs at prompt positions.

    x: [B, T, D] down_proj inputs; prompt_mask: [B, T] bool, True on prompt tokens
    (padding and target tokens are False). Returns [B, D] float32.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown prompt_feature_agg {aggregation!r}; expected one of {AGGREGATIONS}")
    mask = prompt_mask.to(x.device)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a row has no prompt tokens to aggregate")
    xf = x.float()
    if aggregation == "last":
        # Last prompt position of each row (prompt tokens may be left- or right-padded).
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
        return xf[torch.arange(xf.shape[0], device=xf.device), last]
    summed = (xf * mask.unsqueeze(-1)).sum(dim=1)
    feature = summed / counts.unsqueeze(-1).to(xf.dtype)
    if aggregation == "mean_decentered":
        if background_mean is None:
            raise ValueError("prompt_feature_agg 'mean_decentered' needs background features")
        feature = feature - background_mean.to(feature.device, torch.float32)
    return feature


def finish_feature(summed: torch.Tensor, counts: torch.Tensor, aggregation: str,
                   background_mean: torch.Tensor | None) -> torch.Tensor:
    """Turn per-row sums of prompt-position inputs into features (mean/mean_decentered).

    Used where the sum is accumulated token by token (the serving path).
    """
    feature = summed.float() / counts.unsqueeze(-1).float()
    if aggregation == "mean_decentered":
        feature = feature - background_mean.to(feature.device, torch.float32)
    return feature


def tophash_indices(feature: torch.Tensor, top_k: int, permutation: torch.Tensor) -> torch.Tensor:
    """TopHash: top-k of |feature|, then mapped through the fixed permutation.

    feature: [B, D]; permutation: [D] int64. Returns [B, top_k] int64, sorted ascending.
    """
    if not 0 < top_k <= feature.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in 1..{feature.shape[-1]}")
    top = torch.topk(feature.abs(), top_k, dim=-1, sorted=False).indices
    hashed = permutation.to(top.device)[top]
    return torch.sort(hashed, dim=-1).values


def packed_width(dim: int) -> int:
    """Bytes per packed mask: one bit per input dim, padded to whole 64-bit words."""
    return ((dim + 63) // 64) * 8


def pack_indices(indices: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, k] active indices -> [B, packed_width(dim)] uint8 bitsets (bit j at byte j//8, bit j%8)."""
    rows = indices.shape[0]
    width = packed_width(dim)
    bits = torch.zeros(rows, width * 8, dtype=torch.bool, device=indices.device)
    bits.scatter_(1, indices.long(), True)
    weights = (1 << torch.arange(8, device=indices.device, dtype=torch.int32))
    return (bits.view(rows, width, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Inverse of pack_indices: one sorted index tensor per row."""
    bits = unpack_bits(packed, dim)
    return [row.nonzero().flatten() for row in bits]


def unpack_bits(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, W] uint8 -> [B, dim] bool."""
    if packed.device.type == "cpu":
        # numpy unpacks into one byte per bit; the int32 path below peaks at ~8x that
        # (gigabytes for 100k stored masks at start-up validation).
        bits = np.unpackbits(packed.contiguous().numpy(), axis=1, count=dim, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :dim].bool()


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 word (SWAR; no per-bit unpacking)."""
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56) & 0xFF


def overlap_counts(query: torch.Tensor, stored: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """|query_i AND stored_j| for packed masks. query: [Q, W] uint8, stored: [E, W] uint8 -> [Q, E] int32.

    Works on 64-bit words, chunked over stored masks so temporaries stay cache-sized at 100k+
    edits. On CPU it uses numpy's native popcount (np.bitwise_count, ~20x faster than the
    SWAR arithmetic, which remains the path on GPU).
    """
    q = query.contiguous().view(torch.int64)
    s = stored.contiguous().view(torch.int64)
    out = torch.empty(q.shape[0], s.shape[0], dtype=torch.int32, device=s.device)
    if s.device.type == "cpu" and hasattr(np, "bitwise_count"):
        _overlap_counts_numpy(q.cpu().numpy().view(np.uint64), s.numpy().view(np.uint64), out.numpy(), chunk_rows)
        return out
    return _overlap_counts_swar(q.to(s.device), s, out, chunk_rows)


def _overlap_counts_numpy(q: np.ndarray, s: np.ndarray, out: np.ndarray, chunk_rows: int) -> None:
    """overlap_counts on CPU: AND, native popcount per word, then the per-mask sum.

    The sum over a mask's words runs as a float32 matrix-vector product with ones: exact
    (counts stay far below 2**24) and ~5x faster than numpy's integer sum over a short axis,
    which was the largest part of the step. Buffers are reused across chunks and queries.
    """
    rows = min(chunk_rows, s.shape[0])
    both = np.empty((rows, s.shape[1]), dtype=np.uint64)
    counts = np.empty((rows, s.shape[1]), dtype=np.uint8)
    counts_f = np.empty((rows, s.shape[1]), dtype=np.float32)
    sums = np.empty(rows, dtype=np.float32)
    ones = np.ones(s.shape[1], dtype=np.float32)
    for start in range(0, s.shape[0], chunk_rows):
        block = s[start:start + chunk_rows]
        n = block.shape[0]
        for row in range(q.shape[0]):
            np.bitwise_and(block, q[row], out=both[:n])
            np.bitwise_count(both[:n], out=counts[:n])
            counts_f[:n] = counts[:n]
            np.matmul(counts_f[:n], ones, out=sums[:n])
            out[row, start:start + n] = sums[:n]


def _overlap_counts_swar(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """overlap_counts in plain torch ops on int64 words (any device)."""
    for start in range(0, s.shape[0], chunk_rows):
        block = s[start:start + chunk_rows]
        both = q.unsqueeze(1) & block.unsqueeze(0)
        out[:, start:start + block.shape[0]] = popcount64(both).sum(-1).to(torch.int32)
    return out


def match_routes(
    query: torch.Tensor,
    stored: torch.Tensor,
    top_k: int,
    irr_threshold: float,
    enabled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best stored edit per query mask.

    Returns (route [Q] int64: the matched edit's row or NO_ROUTE, best_edit [Q] int64,
    best_overlap [Q] float32 in [0, 1]). A query routes when best_overlap >= irr_threshold.
    Ties go to the earliest edit. Disabled edits never match.
    """
    n_query = query.shape[0]
    if stored.shape[0] == 0:
        none = torch.full((n_query,), NO_ROUTE, dtype=torch.int64, device=query.device)
        return none, none.clone(), torch.zeros(n_query, dtype=torch.float32, device=query.device)
    counts = overlap_counts(query, stored)
    if enabled is not None:
        counts = torch.where(enabled.to(counts.device).unsqueeze(0), counts, torch.full_like(counts, -1))
    best_count, best_edit = counts.max(dim=1)
    overlap = best_count.clamp(min=0).float() / float(top_k)
    routed = (overlap >= irr_threshold) & (best_count >= 0)
    route = torch.where(routed, best_edit, torch.full_like(best_edit, NO_ROUTE))
    return route, best_edit, overlap


def masked_residual(x: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W_m (m * x) using only the active columns: x[..., idx] @ W_m[:, idx].T.

    x: [..., D]; memory: [H, D]; indices: [k]. Costs k/D of a dense down_proj.
    """
    return gathered_residual(x, memory.index_select(1, indices), indices)


def gathered_residual(x: torch.Tensor, memory_columns: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """masked_residual with W_m's active columns already gathered (memory_columns = W_m[:, idx]).

    Lets a server gather an edit's columns once instead of on every decode step.
    """
    return x.index_select(-1, indices) @ memory_columns.t()


def dense_masked_residual(x: torch.Tensor, memory: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """W_m (m_t * x_t) for tokens that each carry their own mask, in one matmul.

    x: [N, D]; memory: [H, D]; masks: [N, D] bool. Costs a dense [N, D] x [D, H] product
    whatever the number of distinct masks, where gathering columns costs a few small
    operations per mask; equal to masked_residual up to float summation order.
    """
    return (x * masks.to(x.dtype)) @ memory.t()


def residual_by_route(
    x: torch.Tensor,
    memory: torch.Tensor,
    routes: torch.Tensor,
    packed_masks: torch.Tensor,
) -> torch.Tensor:
    """Per-token residual where each token may follow a different edit (or none).

    x: [N, D] tokens; routes: [N] edit row or NO_ROUTE; packed_masks: [E, W] the stored
    edits' masks. Tokens with NO_ROUTE get an exact zero residual.
    """
    out = torch.zeros(x.shape[0], memory.shape[0], dtype=x.dtype, device=x.device)
    routed = routes != NO_ROUTE
    if not bool(routed.any()):
        return out
    dim = memory.shape[1]
    for edit in torch.unique(routes[routed]).tolist():
        rows = (routes == edit).nonzero().flatten()
        indices = unpack_bits(packed_masks[edit:edit + 1], dim)[0].nonzero().flatten()
        out[rows] = masked_residual(x[rows], memory.to(x.dtype), indices.to(x.device))
    return out
