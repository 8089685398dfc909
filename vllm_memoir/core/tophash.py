"""The MEMOIR math: prompt features, TopHash masks, overlap matching, masked residual.

This is the one implementation used by the offline edit tools (transformers) and by
the vLLM plugin, so that an edit trained offline routes identically when served.
All functions are pure torch and work on CPU or GPU.
"""

from __future__ import annotations

from typing import Callable

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


def remove_background_components(feature: torch.Tensor, basis: torch.Tensor | None,
                                 sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The routing key: the (decentered) feature [B, D] minus its part along `basis` [r, D],
    orthonormal rows, the background's top principal directions. Those directions are what
    prompts of one template or relation share (phrasing, relation, position), so removing them
    leaves what tells subjects apart. None: the feature unchanged (the reference).

    sum_over_ranks: when feature and basis are one tensor-parallel rank's columns, the function
    that sums the [B, r] coefficients over the ranks (each rank holds a part of every dot product)."""
    if basis is None:
        return feature
    basis = basis.to(feature.device, torch.float32)
    coefficients = feature @ basis.T
    if sum_over_ranks is not None:
        coefficients = sum_over_ranks(coefficients)
    return feature - coefficients @ basis


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
    if bits.device.type == "cpu":  # numpy packs in one call (a routing decision's path)
        return torch.from_numpy(np.packbits(bits.numpy(), axis=1, bitorder="little"))
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
    return unpack_as(packed, torch.bool)[:, :dim]


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 word (SWAR; no per-bit unpacking)."""
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56) & 0xFF


# Stored rows per matching step are sized in bytes, not rows: on CPU a block of packed masks
# must stay in the core's L2 cache while every query of the call reads it (at 4,096 rows of
# Llama-3-8B width, 7 MiB, the scan was ~7x slower per prompt); on GPU the unpacked float
# block must stay a bounded temporary.
CPU_BLOCK_BYTES = 256 << 10
DEVICE_BLOCK_BYTES = 256 << 20
# Below this many queries the torch path counts bits with SWAR arithmetic on the packed
# words; from it on, one float matrix product per block (the unpack is paid once per block).
MATMUL_MIN_QUERIES = 4


def mask_bit_counts(masks: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """Set bits of each packed mask [E, W] uint8 -> [E] int64, in blocks of rows, so the
    temporaries stay small at 1,000,000 masks (the SWAR path's are 8 bytes per packed byte)."""
    words = masks.contiguous().view(torch.int64)
    out = torch.empty(words.shape[0], dtype=torch.int64, device=words.device)
    for start in range(0, words.shape[0], chunk_rows):
        block = words[start:start + chunk_rows]
        if _on_numpy(block):
            out[start:start + block.shape[0]] = torch.from_numpy(
                np.bitwise_count(block.numpy().view(np.uint64)).sum(axis=1, dtype=np.int64))
        else:
            out[start:start + block.shape[0]] = popcount64(block).sum(-1)
    return out


def overlap_counts(query: torch.Tensor, stored: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """|query_i AND stored_j| for packed masks. query: [Q, W] uint8, stored: [E, W] uint8 -> [Q, E] int32.

    All queries are counted in one pass over the stored masks (blocks of `chunk_rows`,
    default sized to a cache or temporary budget). On CPU it uses numpy's native popcount
    (np.bitwise_count); elsewhere pure torch ops (see _block_counts_torch).
    """
    out = torch.empty(query.shape[0], stored.shape[0], dtype=torch.int32, device=stored.device)
    on_numpy = _on_numpy(stored)
    target = out.numpy() if on_numpy else out
    for start, counts in _block_counts(query, stored, chunk_rows, as_numpy=on_numpy):
        target[:, start:start + counts.shape[1]] = counts  # exact: float32 counts are whole numbers
    return out


def best_overlaps(
    query: torch.Tensor,
    stored: torch.Tensor,
    enabled: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest overlap count per query and the earliest stored row that has it, in one pass.

    Returns (best_count [Q] int64, -1 when no stored mask is enabled; best_row [Q] int64, 0
    then). Disabled rows never win. Only a [Q, block] temporary is held, never the [Q, E]
    count matrix (128 MiB for 32 prompts at 1,000,000 edits).
    """
    best_count, best_row, _ = _scan_best(query, stored, enabled, chunk_rows, keep_second=False)
    return best_count, best_row


def top_two_overlaps(
    query: torch.Tensor,
    stored: torch.Tensor,
    enabled: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """best_overlaps plus each query's second-highest count over the other enabled rows
    (second_count [Q] int64; -1 when fewer than two rows are enabled). Two rows that tie for
    the best give second_count == best_count. Same single pass: a running top-2 per block."""
    return _scan_best(query, stored, enabled, chunk_rows, keep_second=True)


def _scan_best(query: torch.Tensor, stored: torch.Tensor, enabled: torch.Tensor | None, chunk_rows: int | None,
               keep_second: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(best_count, best_row, second_count or None) over blocks of stored masks."""
    if _on_numpy(stored):
        return _best_overlaps_numpy(query, stored, enabled, chunk_rows, keep_second)
    n_query, device = query.shape[0], stored.device
    best_count = torch.full((n_query,), -1, dtype=torch.int64, device=device)
    best_row = torch.zeros(n_query, dtype=torch.int64, device=device)
    second_count = torch.full((n_query,), -1, dtype=torch.int64, device=device) if keep_second else None
    flags = None if enabled is None else enabled.to(device=device, dtype=torch.bool)
    for start, counts in _block_counts(query, stored, chunk_rows):
        counts = counts.to(torch.int64)
        if flags is not None:
            counts.masked_fill_(~flags[start:start + counts.shape[1]], -1)
        block_row = counts.argmax(dim=1)  # argmax: the first maximum, so ties go to the earlier row
        block_count = counts.gather(1, block_row.unsqueeze(1)).squeeze(1)
        if keep_second:
            second_count = _running_second_torch(second_count, best_count, block_count, counts, block_row)
        better = block_count > best_count  # strictly: an earlier block keeps its tie
        best_count = torch.where(better, block_count, best_count)
        best_row = torch.where(better, block_row + start, best_row)
    return best_count, best_row, second_count


def _running_second_torch(second: torch.Tensor, best: torch.Tensor, block_best: torch.Tensor, counts: torch.Tensor,
                          block_row: torch.Tensor) -> torch.Tensor:
    """Second-highest count so far, from the previous top-2 (best, second) and this block's:
    the block's runner-up, or the smaller of the two bests. `counts` is this block's scratch
    [Q, rows] temporary (its best entry is overwritten)."""
    counts.scatter_(1, block_row.unsqueeze(1), -1)
    block_second = counts.max(dim=1).values
    return torch.maximum(second, torch.maximum(block_second, torch.minimum(best, block_best)))


def _best_overlaps_numpy(query: torch.Tensor, stored: torch.Tensor, enabled: torch.Tensor | None,
                         chunk_rows: int | None, keep_second: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """_scan_best on CPU, reduced in numpy: torch's small per-block ops (argmax, casts) with
    two intra-op threads took ~10 ms each on a loaded 2-core machine, more than the counting."""
    n_query = query.shape[0]
    best_count = np.full(n_query, -1, dtype=np.int64)
    best_row = np.zeros(n_query, dtype=np.int64)
    second_count = np.full(n_query, -1, dtype=np.int64) if keep_second else None
    disabled = None if enabled is None else ~enabled.cpu().numpy().astype(bool)
    picked = np.arange(n_query)
    for start, counts in _block_counts(query, stored, chunk_rows, as_numpy=True):
        if disabled is not None:
            np.copyto(counts, -1, where=disabled[start:start + counts.shape[1]])
        block_row = counts.argmax(axis=1)  # the first maximum: ties go to the earlier row
        block_count = counts[picked, block_row].astype(np.int64)
        if keep_second:
            _running_second_numpy(second_count, best_count, block_count, counts, picked, block_row)
        better = block_count > best_count  # strictly: an earlier block keeps its tie
        best_count[better] = block_count[better]
        best_row[better] = block_row[better] + start
    second = None if second_count is None else torch.from_numpy(second_count)
    return torch.from_numpy(best_count), torch.from_numpy(best_row), second


def _running_second_numpy(second: np.ndarray, best: np.ndarray, block_best: np.ndarray, counts: np.ndarray,
                          picked: np.ndarray, block_row: np.ndarray) -> None:
    """_running_second_torch in numpy, updating `second` in place; `counts` is the block's
    reused buffer (its best entry is overwritten; the next block refills it)."""
    counts[picked, block_row] = -1
    block_second = counts.max(axis=1).astype(np.int64)
    np.maximum(second, np.maximum(block_second, np.minimum(best, block_best)), out=second)


def _on_numpy(stored: torch.Tensor) -> bool:
    """Whether stored masks are counted with numpy's native popcount (CPU, numpy >= 2)."""
    return stored.device.type == "cpu" and hasattr(np, "bitwise_count")


def _block_counts(query: torch.Tensor, stored: torch.Tensor, chunk_rows: int | None, as_numpy: bool = False):
    """Yield (first row, [Q, rows] counts) for consecutive blocks of stored masks: torch
    tensors, or float32 numpy arrays with `as_numpy` (numpy path only).

    The yielded array may be a reused buffer: consume it before asking for the next block.
    """
    q = query.contiguous().view(torch.int64)
    s = stored.contiguous().view(torch.int64)
    if s.shape[0] == 0:
        return
    on_numpy = _on_numpy(s)
    if chunk_rows is None:
        budget, row_bytes = (CPU_BLOCK_BYTES, s.shape[1] * 8) if on_numpy else (DEVICE_BLOCK_BYTES, s.shape[1] * 256)
        chunk_rows = max(1, budget // max(row_bytes, 1))
    if on_numpy:
        q_np, s_np = q.cpu().numpy().view(np.uint64), s.numpy().view(np.uint64)
        for start, counts in _block_counts_numpy(q_np, s_np, chunk_rows):
            yield start, counts if as_numpy else torch.from_numpy(counts)
        return
    yield from _block_counts_torch(q.to(s.device), s, chunk_rows)


def _block_counts_numpy(q: np.ndarray, s: np.ndarray, chunk_rows: int):
    """Block counts on CPU: AND, native popcount per word, then the per-mask sum.

    The block loop is outside the query loop, so each block of stored masks comes from memory
    once per call and is re-read by every query from cache. The sum over a mask's words runs
    as a float32 matrix-vector product with ones: exact (counts stay far below 2**24) and ~5x
    faster than numpy's integer sum over a short axis. Buffers are reused across blocks.
    """
    rows = min(chunk_rows, s.shape[0])
    both = np.empty((rows, s.shape[1]), dtype=np.uint64)
    bits = np.empty((rows, s.shape[1]), dtype=np.uint8)
    bits_f = np.empty((rows, s.shape[1]), dtype=np.float32)
    counts = np.empty((q.shape[0], rows), dtype=np.float32)
    ones = np.ones(s.shape[1], dtype=np.float32)
    for start in range(0, s.shape[0], chunk_rows):
        block = s[start:start + chunk_rows]
        n = block.shape[0]
        for row in range(q.shape[0]):
            np.bitwise_and(block, q[row], out=both[:n])
            np.bitwise_count(both[:n], out=bits[:n])
            bits_f[:n] = bits[:n]
            np.matmul(bits_f[:n], ones, out=counts[row, :n])
        yield start, counts[:, :n]


def _block_counts_torch(q: torch.Tensor, s: torch.Tensor, chunk_rows: int):
    """Block counts in pure torch ops (any device; the path on GPU).

    Few queries: SWAR popcount of the ANDed words. More: unpack each block to 0/1 floats once
    and count all queries with one matrix product, exact in float32 (counts < 2**24; 0/1
    inputs stay exact under TF32 or bf16 matmul precision too).
    """
    if q.shape[0] < MATMUL_MIN_QUERIES:
        for start in range(0, s.shape[0], chunk_rows):
            block = s[start:start + chunk_rows]
            yield start, popcount64(q.unsqueeze(1) & block.unsqueeze(0)).sum(-1)
        return
    query_bits = unpack_as(q.view(torch.uint8), torch.float32).t()
    for start in range(0, s.shape[0], chunk_rows):
        yield start, (unpack_as(s[start:start + chunk_rows].view(torch.uint8), torch.float32) @ query_bits).t()


_BYTE_BITS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def unpack_as(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, W] uint8 packed masks -> [N, 8 W] 0/1 of `dtype`, in pack_indices' bit order: one
    lookup per byte in a [256, 8] table of each byte value's bits (made once per device and
    dtype), where shifting and masking every bit costs several operations."""
    key = (packed.device, dtype)
    if key not in _BYTE_BITS:
        values = torch.arange(256, device=packed.device).unsqueeze(1)
        _BYTE_BITS[key] = ((values >> torch.arange(8, device=packed.device)) & 1).to(dtype)
    bits = _BYTE_BITS[key].index_select(0, packed.reshape(-1).long())
    return bits.view(packed.shape[0], packed.shape[1] * 8)


def match_routes(
    query: torch.Tensor,
    stored: torch.Tensor,
    top_k: int,
    irr_threshold: float,
    enabled: torch.Tensor | None = None,
    route_margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best stored edit per query mask, all queries in one pass over the stored masks.

    Returns (route [Q] int64: the matched edit's row or NO_ROUTE, best_edit [Q] int64,
    best_overlap [Q] float32 in [0, 1]). A query routes when best_overlap >= irr_threshold
    and its best overlap beats the second best enabled edit's by at least route_margin
    (route_gap; 0, the reference's rule, skips that check and its cost). Ties go to the
    earliest edit (and, having no gap, are refused by any margin > 0). Disabled edits never match.
    """
    if not 0.0 <= route_margin <= 1.0:
        raise ValueError(f"route_margin {route_margin!r} must be in 0..1 (overlap units, as irr_threshold)")
    n_query = query.shape[0]
    if stored.shape[0] == 0:
        none = torch.full((n_query,), NO_ROUTE, dtype=torch.int64, device=query.device)
        return none, none.clone(), torch.zeros(n_query, dtype=torch.float32, device=query.device)
    second_count = None
    if route_margin > 0:
        best_count, best_edit, second_count = top_two_overlaps(query, stored, enabled)
    else:
        best_count, best_edit = best_overlaps(query, stored, enabled)
    if best_count.device.type == "cpu":  # a handful of numbers: numpy's calls cost less than torch's
        count = best_count.numpy()
        overlap = np.maximum(count, 0).astype(np.float32) / np.float32(top_k)
        routed = (overlap >= irr_threshold) & (count >= 0)
        if second_count is not None:
            routed &= route_gap(best_count, second_count, top_k).numpy() >= route_margin
        route = np.where(routed, best_edit.numpy(), NO_ROUTE)
        return torch.from_numpy(route), best_edit, torch.from_numpy(overlap)
    overlap = best_count.clamp(min=0).float() / float(top_k)
    routed = (overlap >= irr_threshold) & (best_count >= 0)
    if second_count is not None:
        routed &= route_gap(best_count, second_count, top_k) >= route_margin
    route = torch.where(routed, best_edit, torch.full_like(best_edit, NO_ROUTE))
    return route, best_edit, overlap


def route_gap(best_count: torch.Tensor, second_count: torch.Tensor, top_k: int) -> torch.Tensor:
    """(best - second-best) overlap in overlap units, float32 [Q]: the counts' difference over
    top_k (exact for whole counts, so every device agrees). No second edit counts as overlap 0."""
    return (best_count.clamp(min=0) - second_count.clamp(min=0)).float() / float(top_k)


def masked_residual(x: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W_m (m * x) using only the active columns: x[..., idx] @ W_m[:, idx].T.

    x: [..., D]; memory: [H, D]; indices: [k]. Costs k/D of a dense down_proj.
    """
    return x.index_select(-1, indices) @ memory.index_select(1, indices).t()


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
