"""Which edit each request of the running batch follows, on one worker.

The one place that knows about requests. Runner adapters (runner_v1, runner_v2) feed it
batch changes before each forward; it publishes each step's per-slot routes and prompt
lengths, and the batch's row -> slot map, into persistent device buffers (host staging, one
copy per step), as vLLM's LoRA publishes its token-to-adapter mapping. The routing op reads
only those buffers during the forward; route decisions it makes at a prompt's prefill are
written into the device buffer there and come back to the host afterwards (`settle`, at the
next batch change or forward) for the decision cache, metrics and logs.

State is kept per *slot*. The V1 runner's slots are its persistent-batch rows (moved and
swapped as the batch condenses); the V2 runner's slots are its request-state indices, and
each step maps batch rows to slots. Decisions are cached by a hash of the prompt token ids:
the decision depends only on the prompt, so a request that leaves the batch (unscheduled or
preempted) and comes back gets the same route without its prompt being seen again.

The routing span (the prompt tokens whose inputs the route feature averages: all of them, or
the last user message's, as the served artifact says) is found here, on the host, from the
prompt token ids when a request enters the batch, and published with the routes, as are the
places in its KV blocks where partial sums start and end (span_marks), for span routing.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_memoir.core import NO_ROUTE
from vllm_memoir.core.route_span import RouteSpan, SpanBoundaries
from vllm_memoir.core.routing import RouteDecision
from vllm_memoir.routing.span_marks import SlotBlockMarks

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


@dataclass
class PendingReport:
    """Route decisions made on the device in one forward, not yet seen by the host."""

    slots: list[int]  # the slots of the pending rows, in order
    deciding: torch.Tensor  # [P] bool: the row's last prompt token was in the forward
    route: torch.Tensor  # [P] the decisions (meaningful where deciding)
    best: torch.Tensor
    overlap: torch.Tensor
    lost: torch.Tensor  # [P] bool: a resumed prompt with no cached decision and no earlier sums
    partial: torch.Tensor  # [P] bool: decided on part of a prompt (prompt splitting without sums)
    first: torch.Tensor  # [P] the row's first position in the forward (> 0: seen in parts)
    approximate: torch.Tensor  # [P] bool: a span feature summed over a whole boundary block (span_sums)
    span_start: torch.Tensor  # [P] the routing span's prompt positions, [start, end)
    span_end: torch.Tensor


class RequestRoutes:
    """Per-slot routes, prompt lengths and routing spans, plus the decision cache.

    Host buffers (int64, CPU) are the host's view; `slot_route_dev`, `slot_prompt_len_dev`,
    `slot_span_dev` and `row_slots_dev` are the routing op's, allocated once on the model's
    device (sized for the runner's max_num_seqs) and refreshed in place by `publish()` before
    each forward.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, capacity: int = DEFAULT_CAPACITY,
                 route_span: RouteSpan | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
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
        self._allocate_device_buffers(capacity)
        self._changed = False  # host state not yet published to the device buffers
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
        self._reports: list[PendingReport] = []
        # Span routing under prompt splitting: each slot's block marks (track_block_marks).
        self.block_marks: SlotBlockMarks | None = None
        self.approximate_features = 0  # span features flagged approximate, not yet reported

    def _allocate_device_buffers(self, capacity: int) -> None:
        # One spare slot past the end, never routed: rows beyond this step's batch (padding)
        # map to it.
        self.slot_route_dev = torch.full((capacity + 1,), NO_ROUTE, dtype=torch.int64, device=self.device)
        self.slot_prompt_len_dev = torch.zeros(capacity + 1, dtype=torch.int64, device=self.device)
        self.row_slots_dev = torch.full((capacity + 1,), capacity, dtype=torch.int64, device=self.device)
        self.slot_span_dev = torch.zeros(2, capacity + 1, dtype=torch.int64, device=self.device)  # start; end
        pin = self.device.type == "cuda"
        # Host staging for the per-step copies (pinned on CUDA, so the copies do not block), two
        # in turn: with asynchronous scheduling the host prepares a step while the previous
        # one's copy may still be queued.
        self._staging = [torch.empty(5, capacity + 1, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._publishes = 0

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
        if self.block_marks is not None:
            self.block_marks = self.block_marks.grown(grown)
        self._allocate_device_buffers(grown)

    def track_block_marks(self, block_size: int, num_blocks: int) -> SlotBlockMarks:
        """Keep and publish each slot's block marks (span routing under prompt splitting), with
        `num_blocks` logical blocks per request; from now on, and for the requests already here."""
        if self.block_marks is None:
            self.block_marks = SlotBlockMarks(self.slot_route.shape[0], num_blocks, block_size, self.device)
            for slot, boundaries in enumerate(self._boundaries):
                if boundaries is not None:
                    self.block_marks.set(slot, boundaries)
            self.block_marks.publish()
        return self.block_marks

    @property
    def route_span(self) -> RouteSpan:
        return self._route_span if self._route_span is not None else _served_span

    def _set(self, slot: int, route: int, prompt_len: int, key: bytes | None, span: tuple[int, int] | None = None,
             boundaries: SpanBoundaries | None = None) -> None:
        self._changed = True
        self.slot_route[slot] = route
        self.slot_prompt_len[slot] = prompt_len
        self.slot_span[slot, 0], self.slot_span[slot, 1] = span if span is not None else (0, prompt_len)
        self._key[slot] = key
        self._boundaries[slot] = boundaries
        if self.block_marks is not None:
            self.block_marks.set(slot, boundaries)

    def add(self, slot: int, prompt_token_ids: Sequence[int] | None, is_new_request: bool = False) -> None:
        """A request enters the batch at `slot` (new, resumed after preemption, or rescheduled)."""
        self.settle()
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
        self.settle()
        if slot < self.slot_route.shape[0]:
            self._set(slot, NO_ROUTE, 0, None)

    def move(self, src: int, dst: int) -> None:
        """One-way move src -> dst (dst's previous occupant is gone)."""
        self.settle()
        self._ensure(max(src, dst))
        self._set(dst, int(self.slot_route[src]), int(self.slot_prompt_len[src]), self._key[src],
                  tuple(self.slot_span[src].tolist()), self._boundaries[src])
        self.remove(src)

    def swap(self, a: int, b: int) -> None:
        self.settle()
        self._ensure(max(a, b))
        for column in (self.slot_route, self.slot_prompt_len, self.slot_span):
            column[[a, b]] = column[[b, a]]
        self._changed = True
        self._key[a], self._key[b] = self._key[b], self._key[a]
        self._boundaries[a], self._boundaries[b] = self._boundaries[b], self._boundaries[a]
        if self.block_marks is not None:
            self.block_marks.swap(a, b)

    def rebase(self, new_row: Callable[[int], int]) -> None:
        """The served edits changed (swap, enable, disable): `new_row(old row)` is the row of
        the same edit in the new edits, NO_ROUTE if it is gone.

        New requests must route against the new edits, so the decision cache is emptied.
        Requests already running keep the edit they were routed to, re-indexed into the new
        rows, in their slots and, for when they leave the batch and come back, in the
        carried decisions.
        """
        self.settle()

        def remap(route: int) -> int:
            return route if route < 0 else new_row(route)  # NO_ROUTE, PENDING stay

        self.slot_route.apply_(remap)
        carried = {**self._carried, **self._cache}
        if len(carried) > self._cache_size:
            carried = dict(list(carried.items())[-self._cache_size:])
        self._carried = {key: (remap(route), remap(best), overlap) for key, (route, best, overlap) in carried.items()}
        self._cache.clear()
        self.publish()

    def set_batch(self, num_rows: int, row_slots: Sequence[int] | None = None) -> None:
        """This step's batch size and, for runners whose rows are not slots, row -> slot."""
        self.settle()
        self.num_rows = num_rows
        self._row_slots = None if row_slots is None else torch.as_tensor(list(row_slots), dtype=torch.int64)
        if num_rows:
            self._ensure(int(self._slot_index(num_rows).max()))
        self.publish()

    def publish(self) -> None:
        """Copy the host's per-slot routes, prompt lengths and spans, and the row -> slot map,
        into the routing op's device buffers (one staged, non-blocking copy each)."""
        self._changed = False
        capacity = self.slot_route.shape[0]
        staging = self._staging[self._publishes % 2]
        self._publishes += 1
        staging[0, :capacity] = self.slot_route
        staging[0, capacity] = NO_ROUTE
        staging[1, :capacity] = self.slot_prompt_len
        staging[1, capacity] = 0
        staging[2] = capacity  # rows past the batch: the spare slot
        staging[2, : self.num_rows] = self._slot_index(self.num_rows)
        staging[3:5, :capacity] = self.slot_span.T
        staging[3:5, capacity] = 0
        self.slot_route_dev.copy_(staging[0], non_blocking=True)
        self.slot_prompt_len_dev.copy_(staging[1], non_blocking=True)
        self.row_slots_dev.copy_(staging[2], non_blocking=True)
        self.slot_span_dev.copy_(staging[3:5], non_blocking=True)
        if self.block_marks is not None:
            self.block_marks.publish()

    def publish_if_changed(self) -> None:
        """publish(), when the host state changed since (runners publish at each batch change)."""
        if self._changed:
            self.publish()

    # --- the forward pass (routing op) --------------------------------------------------------

    def _slot_index(self, num_rows: int) -> torch.Tensor:
        if self._row_slots is None:
            return torch.arange(num_rows)
        return self._row_slots[:num_rows]

    def _slot(self, row: int) -> int:
        return row if self._row_slots is None else int(self._row_slots[row])

    def row_routes(self) -> list[int]:
        """Route of each batch row this step, as the host knows it: an edit row, NO_ROUTE or PENDING."""
        return self.host_row_routes().tolist()

    def host_row_routes(self) -> torch.Tensor:
        """row_routes() as a CPU tensor (the host's view: nothing is read from the device)."""
        self.settle()
        if self._row_slots is None:
            return self.slot_route[: self.num_rows]
        return self.slot_route.index_select(0, self._row_slots[: self.num_rows])

    def slots_of_rows(self, rows: torch.Tensor) -> list[int]:
        """The slots of batch rows `rows` (a CPU tensor), on the host."""
        return rows.tolist() if self._row_slots is None else self._row_slots.index_select(0, rows).tolist()

    def row_prompt_len(self, row: int) -> int:
        return int(self.slot_prompt_len[self._slot(row)])

    def record(self, row: int, decision: RouteDecision) -> None:
        """A decision for a pending row made on the host, taken as settle() takes the device's
        (the routing op decides on the device; tests and tools drive routes this way)."""
        self._record_slot(self._slot(row), decision)
        self.slot_route_dev[self._slot(row)] = decision.route

    def _record_slot(self, slot: int, decision: RouteDecision) -> None:
        # The device already holds the route (written by the forward that decided it).
        key = self._key[slot]
        self.slot_route[slot] = decision.route
        if key is not None:
            self._cache[key] = (decision.route, decision.best_edit, decision.overlap)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self.new_decisions.append((decision, int(self.slot_prompt_len[slot])))

    def defer(self, report: PendingReport) -> None:
        """Decisions the routing op wrote into slot_route_dev; the host reads them at settle()."""
        self._reports.append(report)

    def settle(self) -> None:
        """Bring the device's decisions of earlier forwards into the host's view and cache.

        Runs before any batch change and at the start of each forward, after the forward
        that made them finished (so reading them back waits for nothing on CPU, and on a GPU
        at most for the previous step, which the sampler has already waited for).
        """
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        for report in reports:
            columns = [report.deciding, report.route, report.best, report.overlap, report.lost, report.partial,
                       report.first, report.approximate]
            deciding, route, best, overlap, lost, partial, first, approximate = (t.tolist() for t in columns)
            for i, slot in enumerate(report.slots):
                if partial[i]:
                    raise RuntimeError(
                        "MEMOIR: a request's prompt reached the edited layer in parts (is prefix caching or "
                        "chunked prefill on?); routing needs whole prompts unless the edit sits at the last layer")
                if lost[i]:
                    # Only a request resumed after preemption whose decision left the cache
                    # (2**18 newer prompts) and whose prompt the forward did not hold.
                    logger.error("MEMOIR: a resumed request's prompt (%d tokens) did not reach the edited layer "
                                 "and its route is unknown; serving it unrouted", int(self.slot_prompt_len[slot]))
                    self._record_slot(slot, RouteDecision(NO_ROUTE, NO_ROUTE, 0.0))
                elif deciding[i]:
                    self._record_slot(slot, RouteDecision(route[i], best[i], overlap[i]))
                    self.approximate_features += approximate[i]
                    if first[i] > 0 and logger.isEnabledFor(logging.DEBUG):
                        self._log_parts(report, i, int(self.slot_prompt_len[slot]), first[i], approximate[i])

    def _log_parts(self, report: PendingReport, i: int, prompt_len: int, first: int, approximate: bool) -> None:
        """Debug: a decision on a prompt that reached the layer in parts, and how its span did."""
        start, end = int(report.span_start[i]), int(report.span_end[i])
        span = ""
        if (start, end) != (0, prompt_len) and self.block_marks is not None:
            size = self.block_marks.block_size
            span = (f"; its last user message, positions {start}-{end}, starts "
                    f"{'mid-block' if start % size else 'at a block start'} and ends "
                    f"{'in this forward' if end > first else 'earlier'} "
                    f"({'approximate' if approximate else 'exact'})")
        logger.debug("MEMOIR: route of a prompt seen in parts: %d of its %d tokens reached the layer earlier "
                     "(chunked prefill or prefix cache)%s", first, prompt_len, span)

    def take_new_decisions(self) -> list[tuple[RouteDecision, int]]:
        self.settle()
        decisions, self.new_decisions = self.new_decisions, []
        return decisions


_ACTIVE: RequestRoutes | None = None
_OWNER: object | None = None


def attach(owner: object, capacity: int = DEFAULT_CAPACITY, device: torch.device | str = "cpu") -> RequestRoutes:
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
        _ACTIVE = RequestRoutes(capacity=capacity, device=device)
    _OWNER = owner
    return _ACTIVE


def active() -> RequestRoutes | None:
    """The worker's RequestRoutes, or None when no runner adapter is feeding one."""
    return _ACTIVE
