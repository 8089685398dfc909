"""The API server's side of live edits: drives the workers' live_edits through collective_rpc.

A swap: read the new manifest here (a quick refusal for a missing or malformed artifact),
`prepare` on every worker (load + the start-up checks on a worker thread, beside the served
edits, while serving continues; polled with `prepared`), then pause the engine in vLLM's
"wait" mode (new requests queue, requests already running finish under the old edits),
`commit` on every worker, resume. So every request is served wholly by one version, and
none fails. Enable/disable need no drain: the rows keep their meaning, so running requests
keep their route and new ones re-route. One change at a time (a lock); the HTTP layer
(admin_api) maps EditControlError to a status. Every refusal leaves the served edits as they
were: a persisted enable/disable is written to disk first and served after, never flipped
in place before the write is known to succeed. It is written as a version that keeps the
tensors file (a new edits file and manifest only) and served by flipping the flag in the
workers' memory and relabelling their version, not by a swap: its cost is the records file's,
not a listing of every edit, a tensor rewrite and a load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_memoir.core import ArtifactError, ArtifactManifest, read_manifest
from vllm_memoir.core.artifact import load_edit_records, save_edit_records, shown_path, unfinished_job
from vllm_memoir.core.edit_records import EditRecords
from vllm_memoir.validation import artifact_sha256

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_ENV = "MEMOIR_ADMIN_DRAIN_TIMEOUT"
LOAD_TIMEOUT_ENV = "MEMOIR_ADMIN_LOAD_TIMEOUT"
POLL_SECONDS = 0.05
# Dotted, not "module:Class": vLLM resolves --worker-extension-cls with resolve_obj_by_qualname.
EXTENSION = "vllm_memoir.worker_extension.MemoirWorkerExtension"
# Linux's PATH_MAX: no longer path can name a file, so it is refused before any file system call.
MAX_PATH_CHARS = 4096
# Edits per worker answer when listing (GET /memoir/edits asks for a page, or for them all).
LISTING_CHUNK = 10_000


@dataclass
class PreparedSwap:
    """An artifact version loaded on every worker, not yet served (EditControl.prepare_swap)."""

    path: Path
    version: int
    previous_version: int
    load_seconds: float


class EditControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_STATUS = {"unknown_edit": 404, "refused": 422}


def artifact_dir(path: str | os.PathLike) -> Path:
    """The absolute artifact directory a client named; refused (422) in one line when no file
    system call could use it, so a bad path never reaches the loader as an exception."""
    text = os.fspath(path)
    if not text:
        raise EditControlError(422, "the artifact path is empty")
    if "\0" in text:
        raise EditControlError(422, f"{shown_path(text)}: not a usable path (it contains a NUL character)")
    if len(text) > MAX_PATH_CHARS:
        raise EditControlError(422, f"{shown_path(text)}: the path is longer than {MAX_PATH_CHARS} characters")
    try:
        return Path(text).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, on some Pythons
        raise EditControlError(422, f"{shown_path(text)}: cannot be resolved ({exc.__class__.__name__})") from None


class EditControl:
    def __init__(self, engine_client: Any, drain_timeout: float | None = None, load_timeout: float | None = None):
        self.engine = engine_client
        self.drain_timeout = drain_timeout or float(os.environ.get(DRAIN_TIMEOUT_ENV, "300"))
        self.load_timeout = load_timeout or float(os.environ.get(LOAD_TIMEOUT_ENV, "600"))
        self._lock = asyncio.Lock()

    async def _on_workers(self, method: str, *args: Any) -> list[dict[str, Any]]:
        """Call a MemoirWorkerExtension method on every worker; raise on the first refusal."""
        try:
            answers = await self.engine.collective_rpc(method, args=args)
        except NotImplementedError as exc:
            raise EditControlError(503, f"the workers lack MEMOIR's admin methods ({exc}): start the server "
                                        f"with --worker-extension-cls {EXTENSION} (memoir-serve adds it "
                                        "when MEMOIR_ADMIN=1)") from exc
        except Exception as exc:  # the engine reports a worker failure as a plain exception
            if "not implemented" in str(exc):
                raise EditControlError(503, f"the workers lack MEMOIR's admin methods: start the server with "
                                            f"--worker-extension-cls {EXTENSION}") from exc
            raise
        for answer in answers:
            if not answer.get("ok"):
                raise EditControlError(_STATUS.get(answer.get("kind"), 500), answer.get("error", "worker failed"))
        return answers

    async def state(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The served edits offset..offset+limit (all from offset when limit is None), asked of
        the workers LISTING_CHUNK at a time: each answer stays small, so the engine loop is held
        for a chunk at most, and no process is left holding (then freeing, on the next call) a
        1,000,000-entry answer. A listing that spans a swap is refused (409): retry it."""
        state = await self._state_chunk(offset, _chunk(limit))
        listed, last = state["edits"], len(state["edits"])
        while last == LISTING_CHUNK and (limit is None or len(listed) < limit):
            chunk = await self._state_chunk(offset + len(listed), _chunk(None if limit is None else limit - len(listed)))
            last = len(chunk["edits"])
            if (chunk["version"], chunk.get("artifact_sha256")) != (state["version"], state.get("artifact_sha256")):
                raise EditControlError(409, f"the served edits changed (version {state['version']} -> "
                                            f"{chunk['version']}) while they were listed; retry")
            listed += chunk["edits"]
            state = {**chunk, "offset": offset, "edits": listed}
        return state

    async def _state_chunk(self, offset: int, limit: int) -> dict[str, Any]:
        answers = await self._on_workers("memoir_state", True, offset, limit)
        versions = {a["version"] for a in answers}
        if len(versions) != 1:  # cannot happen through this controller; say so if it does
            raise EditControlError(500, f"tensor-parallel ranks serve different artifact versions {sorted(versions)}")
        rank0 = next(a for a in answers if a.get("tp_rank", 0) == 0)
        rank0.pop("ok")
        rank0.pop("tp_rank", None)
        return rank0

    async def summary(self) -> dict[str, Any]:
        """The served path, version and counts, without the per-edit list."""
        answer = dict((await self._on_workers("memoir_state", False))[0])
        answer.pop("ok")
        answer.pop("tp_rank", None)
        return answer

    async def swap(self, path: str | os.PathLike) -> dict[str, Any]:
        path = artifact_dir(path)
        async with self._lock:
            return await self._swap(path)

    async def set_enabled(self, edit_id: int, enabled: bool, persist: bool) -> dict[str, Any]:
        """Turn one edit on or off; with `persist`, as a new artifact version that is then served.

        A persisted change is written first (refused, 409, when the artifact on disk is not the
        served one), as a version with the served flags and this change and the same tensors
        file; then every worker flips the flag and takes the new version's manifest (refused
        unless it serves the version the change was written over, with the same tensors). A
        refusal before the write leaves everything as it was; one after it leaves the served
        edits as they were and says that the new version is on disk.
        """
        async with self._lock:
            answer: dict[str, Any] = {"edit_id": edit_id, "enabled": enabled}
            if not persist:
                await self._on_workers("memoir_set_enabled", edit_id, enabled)
                return answer
            answer["persisted"] = await persist_flag(await self.served_flags(edit_id), edit_id, enabled,
                                                     self.adopt_flags)
            return answer

    async def adopt_flags(self, previous_version: int, manifest_json: dict[str, Any], edit_id: int,
                          enabled: bool) -> dict[str, Any]:
        """Every worker flips the flag and takes the manifest of the version a persisted change
        wrote over `previous_version` (refused unless that is the one it serves)."""
        answers = await self._on_workers("memoir_adopt_flags", previous_version, manifest_json, edit_id, enabled)
        return {key: answers[0][key] for key in ("version", "num_edits")}

    async def served_flags(self, edit_id: int) -> dict[str, Any]:
        """Rank 0's served version, manifest and disabled rows (404 when `edit_id` is not served)."""
        answers = await self._on_workers("memoir_flags", edit_id)
        if len({a["version"] for a in answers}) != 1:  # cannot happen through this controller; say so if it does
            raise EditControlError(500, f"tensor-parallel ranks serve different artifact versions "
                                        f"{sorted({a['version'] for a in answers})}")
        return next(a for a in answers if a.get("tp_rank", 0) == 0)

    async def _swap(self, path: Path) -> dict[str, Any]:
        return await self.commit_swap(await self.prepare_swap(path))

    async def prepare_swap(self, path: str | os.PathLike) -> PreparedSwap:
        """Load `path` on every worker beside the served edits (serving goes on); nothing
        changes until commit_swap. A refusal drops what was staged.

        The first half of a swap, so that several replicas can all load before any switches
        (ray_live_edits); a caller that splits the swap serialises its own calls.
        """
        path = artifact_dir(path)
        try:
            manifest = await asyncio.to_thread(read_manifest, path)
        except ArtifactError as exc:
            raise EditControlError(422, str(exc)) from exc
        except OSError as exc:  # read_manifest words the expected ones; any other is the path's fault too
            raise EditControlError(422, f"{shown_path(path)}: cannot be read ({exc.strerror or exc})") from exc
        previous = await self.summary()
        started = time.perf_counter()
        try:
            await self._prepare(path, manifest.version)
        except BaseException:
            await self.abort_swap()
            raise
        return PreparedSwap(path, manifest.version, previous["version"], time.perf_counter() - started)

    async def abort_swap(self) -> None:
        await self._on_workers("memoir_abort")

    async def commit_swap(self, prepared: PreparedSwap) -> dict[str, Any]:
        """Serve the prepared version: hold new requests, let running ones finish, switch, resume."""
        paused_at = time.perf_counter()
        try:
            await asyncio.wait_for(self.engine.pause_generation(mode="wait", clear_cache=False), self.drain_timeout)
        except asyncio.TimeoutError:
            await self.engine.resume_generation()
            await self.abort_swap()
            raise EditControlError(503, f"requests in flight did not finish within {self.drain_timeout:.0f} s "
                                        f"({DRAIN_TIMEOUT_ENV}); still serving version {prepared.previous_version}")
        drained = time.perf_counter()
        try:
            committed = await self._on_workers("memoir_commit", prepared.version)
        finally:
            await self.engine.resume_generation()
        done = time.perf_counter()
        timing = {"load_seconds": prepared.load_seconds, "drain_seconds": drained - paused_at,
                  "commit_seconds": done - drained, "paused_seconds": done - paused_at}
        logger.info("MEMOIR: swapped to %s version %d (load %.2f s while serving, then new requests held %.3f s: "
                    "drain %.3f s, commit %.3f s)", prepared.path, prepared.version, prepared.load_seconds,
                    timing["paused_seconds"], timing["drain_seconds"], timing["commit_seconds"])
        return {"path": str(prepared.path), "version": committed[0]["version"], "num_edits": committed[0]["num_edits"],
                "previous_version": prepared.previous_version, **{k: round(v, 4) for k, v in timing.items()}}

    async def _prepare(self, path: Path, version: int) -> None:
        """Every rank loads `path` on its loader thread; wait until all are ready (or one refuses)."""
        await self._on_workers("memoir_prepare", str(path), version)
        deadline = time.monotonic() + self.load_timeout
        while not all(answer["ready"] for answer in await self._on_workers("memoir_prepared")):
            if time.monotonic() > deadline:
                raise EditControlError(503, f"loading {path} took over {self.load_timeout:.0f} s ({LOAD_TIMEOUT_ENV})")
            await asyncio.sleep(POLL_SECONDS)



def _chunk(limit: int | None) -> int:
    return LISTING_CHUNK if limit is None else min(limit, LISTING_CHUNK)


async def persist_flag(served: dict[str, Any], edit_id: int, enabled: bool, adopt) -> dict[str, Any]:
    """Write the served flags (`served`: a `served_flags` answer) with this change as the
    artifact's next version, then have the server take it: `adopt(previous_version,
    manifest_json, edit_id, enabled)`, every worker (or replica) flipping the flag. A refusal
    after the write says that the flags are on disk. The caller holds its controller's lock."""
    started = time.perf_counter()
    written = await write_flags_version(served, {edit_id: enabled})
    wrote = time.perf_counter()
    try:
        adopted = await adopt(served["version"], dataclasses.asdict(written), edit_id, enabled)
    except EditControlError as exc:
        raise EditControlError(exc.status, f"{exc} ({_saved_note(Path(served['path']))})") from exc
    flipped = time.perf_counter()
    logger.info("MEMOIR: edit %d %s and persisted as %s version %d (was %d; write %.2f s, flip %.3f s)",
                edit_id, "enabled" if enabled else "disabled", served["path"], written.version,
                served["version"], wrote - started, flipped - wrote)
    return {"path": served["path"], "version": adopted["version"], "num_edits": adopted["num_edits"],
            "previous_version": served["version"], "write_seconds": round(wrote - started, 4),
            "flip_seconds": round(flipped - wrote, 4)}


async def write_flags_version(served: dict[str, Any], changes: dict[int, bool]) -> ArtifactManifest:
    """Write the served flags with `changes` ({edit_id: enabled}) applied into the served
    artifact as its next version, keeping its tensors file; returns the new manifest. `served`
    is a worker's `memoir_flags` answer: path, version, manifest (as JSON) and disabled_rows.

    Reads only the manifest and the edits file (its sha256 checked): the rows on disk are the
    served rows, since the manifest on disk names the same files, with the same sha256, as the
    served one. Refused, with nothing written: 409 when it does not (another version was
    written meanwhile, or another checkpoint of a job with the same version), so a newer
    version is never overwritten with stale flags, or when an edit job is still checkpointing
    into it; 404 for an edit id that is not served.
    """
    path = Path(served["path"])

    def write() -> ArtifactManifest:
        served_manifest = ArtifactManifest.from_json(served["manifest"], "the served manifest")
        on_disk = _served_on_disk(path, served_manifest)
        records = load_edit_records(path, on_disk)
        wanted = np.ones(len(records), dtype=bool)
        wanted[np.asarray(served["disabled_rows"], dtype=np.int64)] = False
        ids = np.fromiter(changes, np.int64, len(changes))
        rows = records.rows_of(ids)
        if (rows < 0).any():
            raise EditControlError(404, f"no edit with id {int(ids[rows < 0][0])} in the served artifact "
                                        f"(version {served['version']})")
        for row, enable in zip(rows, changes.values()):
            if enable and (refusal := records.record(int(row)).enable_refusal()):
                raise EditControlError(422, refusal)
        wanted[rows] = np.fromiter(changes.values(), bool, len(changes))
        set_enabled_rows(records, wanted)
        return save_edit_records(path, on_disk, records)

    return await _write_refusing_409(path, write)


def _served_on_disk(path: Path, served: ArtifactManifest) -> ArtifactManifest:
    """The manifest on disk, when it is the `served` version with the same files (else 409) and
    no job checkpoints into it."""
    on_disk = read_manifest(path)
    served_sha = artifact_sha256(served)
    if on_disk.version != served.version or artifact_sha256(on_disk) != served_sha or on_disk.files != served.files:
        raise EditControlError(409, f"{shown_path(path)} is at version {on_disk.version} on disk (memory sha256 "
                                    f"{artifact_sha256(on_disk)[:12]}) but the server serves version "
                                    f"{served.version} ({served_sha[:12]}); POST the artifact first")
    job = unfinished_job(on_disk.job)
    if job is not None:
        raise EditControlError(409, f"{shown_path(path)} is a checkpoint of an edit job ({job['done']} of "
                                    f"{job['total']} edits done): persist once the job has finished")
    return on_disk


async def _write_refusing_409(path: Path, write):
    """Run `write` on a thread; a refusal of the files (ArtifactError, OSError) is a 409."""
    try:
        return await asyncio.to_thread(write)
    except (ArtifactError, OSError) as exc:
        reason = exc if isinstance(exc, ArtifactError) else (exc.strerror or exc)
        raise EditControlError(409, f"cannot persist into {shown_path(path)}: {reason}") from exc


def set_enabled_rows(records: EditRecords, wanted: np.ndarray) -> None:
    """Give every row the flag `wanted` ([N] bool) gives it; only the rows that change are
    rewritten."""
    for row in np.flatnonzero(records.enabled != wanted).tolist():
        records.set_enabled(row, bool(wanted[row]))


def _saved_note(path: Path) -> str:
    return f"the flags are saved in {shown_path(path)} as its newest version; POST the artifact to serve them"
