"""Which edit each request of the running batch follows, on one worker.

The one place that knows about requests. Runner adapters (runner_v1, runner_v2) feed it
batch changes before each forward; the routing op reads it during the forward and records
the decisions it makes at a prompt's prefill.

State is kept per *slot*, in persistent int64 buffers (route, prompt length, routing span).
The V1 runner's slots are its persistent-batch rows (moved and swapped as the batch
condenses); the V2 runner's slots are its request-state indices, and each step maps batch
rows to slots. Decisions are cached by a hash of the prompt token ids:
the decision depends only on the prompt, so a request that leaves the batch (unscheduled or
preempted) and comes back gets the same route without its prompt being seen again.

The routing span (the prompt tokens whose inputs the route feature averages: all of them, or
the last user message's, as the served artifact says) is found here, on the host, from the
prompt token ids when a request enters the batch, so the forward pass only reads two
positions per request.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vllm_memoir.core import NO_ROUTE
from vllm_memoir.core.route_span import RouteSpan, SpanBoundaries
from vllm_memoir.core.routing import RouteDecision

logger = logging.getLogger(__name__)

PENDING = -2  # decided by the routing op at this request's prefill
DEFAULT_CACHE_SIZE = 1 << 18
DEFAULT_CAPACITY = 256  # slots, when the runner does not say (max_num_seqs)


def prompt_key(prompt_token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(prompt_token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


# The served artifact's routing span rule; set by the edited layer whenever it serves an
# artifact (start-up, live swap), read when a request enters the batch.
_served_span = RouteSpan()


def serve_route_span(span: RouteSpan) -> None:
    global _served_span
    _served_span = span


class RequestRoutes:
    """Per-slot routes and prompt lengths in persistent int64 buffers, plus the decision cache.

    The buffers are allocated once (sized for the runner's max_num_seqs) and written in
    place before each forward, so the routing op reads state that outlives the step.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, capacity: int = DEFAULT_CAPACITY,
                 route_span: RouteSpan | None = None):
        self.slot_route = torch.full((capacity,), NO_ROUTE, dtype=torch.int64)
        self.slot_prompt_len = torch.zeros(capacity, dtype=torch.int64)
        # [start, end) prompt positions the route feature averages (the whole prompt unless the
        # served artifact routes on the last user message).
        self.slot_span = torch.zeros(capacity, 2, dtype=torch.int64)
        self._key: list[bytes | None] = [None] * capacity
        # Every place a span may start or end in the slot's prompt (span rules other than
        # "prompt" only): the plugin keeps partial KV-block sums at those places.
        self._boundaries: list[SpanBoundaries | None] = [None] * capacity
        self._route_span = route_span  # None: the served artifact's
        self._row_slots: torch.Tensor | None = None  # None: row i is slot i (V1)
        self.num_rows = 0
        # Entries are plain (route, best_edit, overlap) tuples, not RouteDecision objects: up
        # to 2**18 of them live for the server's lifetime, and tuples of numbers are untracked
        # by the cyclic garbage collector, so full collections never walk them.
        self._cache: OrderedDict[bytes, tuple[int, int, float]] = OrderedDict()
        self._cache_size = cache_size
        # Decisions made before the last change of the served edits, re-indexed into the new
        # rows: only for requests already running then (see rebase), never for new ones.
        self._carried: dict[bytes, tuple[int, int, float]] = {}
        # Decisions not yet logged and counted: (decision, prompt length). New requests only.
        self.new_decisions: list[tuple[RouteDecision, int]] = []

    # --- batch changes (runner adapters) ------------------------------------------------------

    def _ensure(self, slot: int) -> None:
        capacity = self.slot_route.shape[0]
        if slot < capacity:
            return
        # Only when a runner has more slots than it announced; growing reallocates once.
        grown = max(slot + 1, 2 * capacity)
        logger.warning("MEMOIR: growing per-request buffers from %d to %d slots", capacity, grown)
        route = torch.full((grown,), NO_ROUTE, dtype=torch.int64)
        prompt_len = torch.zeros(grown, dtype=torch.int64)
        span = torch.zeros(grown, 2, dtype=torch.int64)
        route[:capacity], prompt_len[:capacity], span[:capacity] = self.slot_route, self.slot_prompt_len, self.slot_span
        self.slot_route, self.slot_prompt_len, self.slot_span = route, prompt_len, span
        self._key += [None] * (grown - capacity)
        self._boundaries += [None] * (grown - capacity)

    @property
    def route_span(self) -> RouteSpan:
        return self._route_span if self._route_span is not None else _served_span

    def _set(self, slot: int, route: int, prompt_len: int, key: bytes | None, span: tuple[int, int] | None = None,
             boundaries: SpanBoundaries | None = None) -> None:
        self.slot_route[slot] = route
        self.slot_prompt_len[slot] = prompt_len
        self.slot_span[slot, 0], self.slot_span[slot, 1] = span if span is not None else (0, prompt_len)
        self._key[slot] = key
        self._boundaries[slot] = boundaries

    def add(self, slot: int, prompt_token_ids: Sequence[int] | None, is_new_request: bool = False) -> None:
        """A request enters the batch at `slot` (new, resumed after preemption, or rescheduled)."""
        self._ensure(slot)
        if not prompt_token_ids:
            # Prompt embeddings carry no token ids; start-up refuses them, so this is a guard.
            logger.warning("MEMOIR: request in slot %d has no prompt token ids; serving it unrouted", slot)
            self._set(slot, NO_ROUTE, 0, None)
            return
        key = prompt_key(prompt_token_ids)
        rule = self.route_span
        # Found even for a cached decision: the blocks this request computes keep the partial
        # sums that later requests sharing them through the prefix cache may need.
        boundaries = None if rule.whole_prompt else rule.boundaries(prompt_token_ids)
        span = (0, len(prompt_token_ids)) if boundaries is None else rule.span(prompt_token_ids, boundaries)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        elif not is_new_request:
            cached = self._carried.get(key)  # routed before the served edits changed
        if cached is None:
            self._set(slot, PENDING, len(prompt_token_ids), key, span, boundaries)
            return
        decision = RouteDecision(*cached)
        self._set(slot, decision.route, len(prompt_token_ids), key, span, boundaries)
        if is_new_request:
            self.new_decisions.append((decision, len(prompt_token_ids)))
        else:
            logger.debug("MEMOIR: request back in the batch (rescheduled or resumed after preemption) "
                         "keeps its route %d (prompt_tokens=%d)", decision.route, len(prompt_token_ids))

    def remove(self, slot: int) -> None:
        if slot < self.slot_route.shape[0]:
            self._set(slot, NO_ROUTE, 0, None)

    def move(self, src: int, dst: int) -> None:
        """One-way move src -> dst (dst's previous occupant is gone)."""
        self._ensure(max(src, dst))
        self._set(dst, int(self.slot_route[src]), int(self.slot_prompt_len[src]), self._key[src],
                  tuple(self.slot_span[src].tolist()), self._boundaries[src])
        self.remove(src)

    def swap(self, a: int, b: int) -> None:
        self._ensure(max(a, b))
        for column in (self.slot_route, self.slot_prompt_len, self.slot_span):
            column[[a, b]] = column[[b, a]]
        self._key[a], self._key[b] = self._key[b], self._key[a]
        self._boundaries[a], self._boundaries[b] = self._boundaries[b], self._boundaries[a]

    def rebase(self, new_row: Callable[[int], int]) -> None:
        """The served edits changed (swap, enable, disable): `new_row(old row)` is the row of
        the same edit in the new edits, NO_ROUTE if it is gone.

        New requests must route against the new edits, so the decision cache is emptied.
        Requests already running keep the edit they were routed to, re-indexed into the new
        rows, in their slots and, for when they leave the batch and come back, in the
        carried decisions.
        """
        def remap(route: int) -> int:
            return route if route < 0 else new_row(route)  # NO_ROUTE, PENDING stay

        self.slot_route.apply_(remap)
        carried = {**self._carried, **self._cache}
        if len(carried) > self._cache_size:
            carried = dict(list(carried.items())[-self._cache_size:])
        self._carried = {key: (remap(route), remap(best), overlap) for key, (route, best, overlap) in carried.items()}
        self._cache.clear()

    def set_batch(self, num_rows: int, row_slots: Sequence[int] | None = None) -> None:
        """This step's batch size and, for runners whose rows are not slots, row -> slot."""
        self.num_rows = num_rows
        self._row_slots = None if row_slots is None else torch.as_tensor(list(row_slots), dtype=torch.int64)
        if num_rows:
            self._ensure(int(self._slot_index(num_rows).max()))

    # --- the forward pass (routing op) --------------------------------------------------------

    def _slot_index(self, num_rows: int) -> torch.Tensor:
        if self._row_slots is None:
            return torch.arange(num_rows)
        return self._row_slots[:num_rows]

    def _slot(self, row: int) -> int:
        return row if self._row_slots is None else int(self._row_slots[row])

    def row_routes(self) -> list[int]:
        """Route of each batch row this step: an edit row, NO_ROUTE or PENDING."""
        if self._row_slots is None:
            return self.slot_route[: self.num_rows].tolist()
        return self.slot_route[self._slot_index(self.num_rows)].tolist()

    def row_prompt_len(self, row: int) -> int:
        return int(self.slot_prompt_len[self._slot(row)])

    def row_span(self, row: int) -> tuple[int, int]:
        """[start, end) prompt positions whose inputs the row's route feature averages."""
        start, end = self.slot_span[self._slot(row)].tolist()
        return start, end

    def row_boundaries(self, row: int) -> SpanBoundaries | None:
        return self._boundaries[self._slot(row)]

    def record(self, row: int, decision: RouteDecision) -> None:
        """The routing op decided a pending row at its prefill."""
        slot = self._slot(row)
        key = self._key[slot]
        self.slot_route[slot] = decision.route
        if key is not None:
            self._cache[key] = (decision.route, decision.best_edit, decision.overlap)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self.new_decisions.append((decision, int(self.slot_prompt_len[slot])))

    def take_new_decisions(self) -> list[tuple[RouteDecision, int]]:
        decisions, self.new_decisions = self.new_decisions, []
        return decisions


_ACTIVE: RequestRoutes | None = None
_OWNER: object | None = None


def attach(owner: object, capacity: int = DEFAULT_CAPACITY) -> RequestRoutes:
    """The worker's RequestRoutes, fed by exactly one runner adapter (`owner`), with
    buffers for `capacity` slots (the runner's max_num_seqs).

    Two feeders would apply every batch change twice (e.g. the tracker listed twice in
    --logits-processors), so a second one is refused.
    """
    global _ACTIVE, _OWNER
    if _OWNER is not None and _OWNER is not owner:
        raise RuntimeError(
            f"MEMOIR: a second request tracker ({type(owner).__name__}) was created in this worker; "
            "list vllm_memoir.runner_v1:MemoirBatchTracker once in --logits-processors"
        )
    if _ACTIVE is None:
        _ACTIVE = RequestRoutes(capacity=capacity)
    _OWNER = owner
    return _ACTIVE


def active() -> RequestRoutes | None:
    """The worker's RequestRoutes, or None when no runner adapter is feeding one."""
    return _ACTIVE
