"""Changing a worker's served edits while it serves: the engine side of the admin routes.

Runs in each worker (every tensor-parallel rank), called through vLLM's collective_rpc,
which the engine core runs between engine steps. A swap is two-phase so every rank serves
the same version or none changes: `prepare` starts loading and checking the artifact beside
the served one on every rank, `prepared` reports when that is done, then `commit` (or
`abort`) on every rank. The load runs on a background thread, because an RPC blocks the
engine loop: a large artifact would otherwise stall serving for the whole load. The
controller in the API server (edit_control) drains in-flight requests before `commit`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_memoir.routing import requests as request_routes
from vllm_memoir.core import NO_ROUTE, ArtifactManifest
from vllm_memoir.core.edit_records import EditRecords
from vllm_memoir.routing.layer import MemoirDownProj, StagedEdits
from vllm_memoir.validation import MemoirConfigError, artifact_sha256

logger = logging.getLogger(__name__)


class LiveEditError(ValueError):
    """A live change that cannot be applied; the served edits are unchanged."""


class UnknownEditError(LiveEditError):
    pass


def _device_of(layer: torch.nn.Module) -> torch.device:
    return layer.device


def edited_layer(model: torch.nn.Module) -> MemoirDownProj:
    layers = [m for m in model.modules() if isinstance(m, MemoirDownProj)]
    if len(layers) != 1:
        raise LiveEditError(f"expected one MEMOIR layer in the served model, found {len(layers)} "
                            "(is a Memoir*ForCausalLM architecture served?)")
    return layers[0]


def listed_edits(records: EditRecords, start: int, end: int, route_counts: Mapping[int, int]) -> list[dict[str, Any]]:
    """Rows start..end-1 as the admin listing shows them. Only those rows' lines are parsed (a
    page costs O(page) whatever the number of edits), in one call, with no EditRecord built."""
    listed = []
    for obj in records.json_objects(start, end):
        edit_id = int(obj["edit_id"])
        listed.append({"edit_id": edit_id, "prompt": str(obj["prompt"]), "target": str(obj["target"]),
                       "enabled": bool(obj.get("enabled", True)), "routed_requests": route_counts.get(edit_id, 0)})
    return listed


def served_flags(path: Path, manifest: ArtifactManifest, records: EditRecords) -> dict[str, Any]:
    """What a persisted flag change is written from: the served version, its manifest (as JSON)
    and the rows that are off (few, as a rule; one bool pass over the flags, no record parsed)."""
    return {"path": str(path), "version": manifest.version, "manifest": dataclasses.asdict(manifest),
            "disabled_rows": np.flatnonzero(~records.enabled).tolist()}


def flags_version(served: ArtifactManifest, previous_version: int, manifest_json: dict[str, Any]) -> ArtifactManifest:
    """The manifest of a version written from the served one with other enabled flags
    (edit_control.write_flags_version), checked to be that: written over the served version,
    and the same artifact but for its version and edits file (same tensors file and sha256).
    Raises LiveEditError otherwise, before anything is changed."""
    if served.version != previous_version:
        raise LiveEditError(f"this rank serves version {served.version}, the flags were written over version "
                            f"{previous_version}; POST the artifact to serve them")
    try:
        written = ArtifactManifest.from_json(dict(manifest_json), "the persisted manifest")
    except ValueError as exc:  # ArtifactError
        raise LiveEditError(str(exc)) from None
    if written.version <= served.version:
        raise LiveEditError(f"version {written.version} is not newer than the served version {served.version}")
    tensors = {name: digest for name, digest in served.files.items() if name.endswith(".safetensors")}
    if {n: d for n, d in written.files.items() if n.endswith(".safetensors")} != tensors \
            or dataclasses.replace(written, version=served.version, files=served.files) != served:
        raise LiveEditError(f"version {written.version} is not version {served.version} with other flags (other "
                            "tensors or settings); POST the artifact to serve it")
    return written


class LiveEdits:
    """One worker's edited layer, its staged next version, and the request routes to rebase."""

    def __init__(self, model: torch.nn.Module, vllm_config: Any):
        self.layer = edited_layer(model)
        self.vllm_config = vllm_config
        self.path = Path(vllm_config.model_config.hf_config.memoir_path)
        self._staged: tuple[Path, StagedEdits] | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memoir-load")
        self._loading: Future | None = None

    def state(self, with_edits: bool, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        layer = self.layer
        state = {
            "path": str(self.path),
            "version": layer.manifest.version,
            # Tells apart two checkpoints of one edit job (same version, other content).
            "artifact_sha256": artifact_sha256(layer.manifest),
            "num_edits": len(layer.records),
            # Kept by the records as flags change: no pass over 1,000,000 flags (or a device sync) per call.
            "num_enabled": layer.records.num_enabled,
            "tp_rank": layer.tp_rank,
        }
        # Only rank 0 lists the edits (and counts routes): the other ranks' lists are the same.
        if with_edits and layer.tp_rank == 0:
            state["unrouted_requests"] = layer.unrouted_count
            end = len(layer.records) if limit is None else offset + limit
            state["offset"] = offset
            state["edits"] = listed_edits(layer.records, offset, end, layer.route_counts)
        return state

    def prepare(self, path: str, expected_version: int) -> dict[str, Any]:
        """Start loading `path` beside the served edits; `prepared` tells when it is ready."""
        self.abort()
        self._loading = self._loader.submit(self._load, path, expected_version, _device_of(self.layer))
        return {"loading": True}

    def prepared(self) -> dict[str, Any]:
        """{"ready": False} while loading; the staged version once loaded; raises its refusal."""
        loading = self._loading
        if loading is None:
            if self._staged is None:
                raise LiveEditError("no artifact is being prepared on this rank")
        elif not loading.done():
            return {"ready": False}
        else:
            self._loading = None
            self._staged = loading.result()  # re-raises the load's refusal
        manifest = self._staged[1].manifest
        return {"ready": True, "version": manifest.version, "num_edits": manifest.num_edits}

    def _load(self, path: str, expected_version: int, device: torch.device) -> tuple[Path, StagedEdits]:
        """Load and check `path` (the same checks as at start-up) and build this rank's share."""
        from vllm_memoir.models import load_artifact_for

        if device.type == "cuda":
            torch.cuda.set_device(device)  # the loader thread's allocations go to this rank's device
        artifact = load_artifact_for(self.vllm_config, Path(path))
        manifest = artifact.manifest
        if manifest.version != expected_version:
            raise LiveEditError(f"{path}: version {manifest.version} on disk, expected {expected_version} "
                                "(the artifact changed while it was being loaded; retry)")
        served = self.layer.manifest
        if manifest.module_path != served.module_path:
            raise MemoirConfigError(f"{path}: edits {manifest.module_path}, the server edits {served.module_path} "
                                    "(the edited layer is fixed at start-up)")
        return Path(path), self.layer.stage(artifact)

    def commit(self, expected_version: int) -> dict[str, Any]:
        if self._staged is None or self._staged[1].manifest.version != expected_version:
            raise LiveEditError(f"no prepared artifact version {expected_version} to commit on this rank")
        (path, staged), self._staged = self._staged, None
        old_ids, new_rows = self.layer.edit_ids, staged.rows
        previous = self.layer.manifest.version
        self.layer.serve(staged)
        self.path = path
        # Only the rows in use are looked up: a swap of 100,000 edits builds no map here.
        self._rebase(lambda row: new_rows.get(old_ids[row], NO_ROUTE))
        if self.layer.tp_rank == 0:
            logger.info("MEMOIR: now serving %s version %d (%d edits), was version %d",
                        path, staged.manifest.version, len(staged.records), previous)
        return self.state(with_edits=False)

    def abort(self) -> None:
        """Drop the staged version; a load still running finishes on its thread, unused."""
        if self._loading is not None:
            self._loading.cancel()
        self._loading, self._staged = None, None

    def flags(self, edit_id: int) -> dict[str, Any]:
        """served_flags, for a persisted change of `edit_id` (refused when it is not served)."""
        self._row_of(edit_id)
        return {**served_flags(self.path, self.layer.manifest, self.layer.records), "tp_rank": self.layer.tp_rank}

    def adopt_flags(self, previous_version: int, manifest_json: dict[str, Any], edit_id: int,
                    enabled: bool) -> dict[str, Any]:
        """Serve the version a persisted change wrote (flags_version checks it is the served one
        with this flag changed): flip the flag and take its manifest. No load and no swap: the
        memory and masks served are the ones it names."""
        manifest = flags_version(self.layer.manifest, previous_version, manifest_json)
        row = self._row_of(edit_id)
        self.set_enabled(edit_id, enabled)
        self.layer.relabel(manifest)  # the same rows; only the version and edits file are new
        if self.layer.tp_rank == 0:
            logger.info("MEMOIR: now serving %s version %d (row %d's flag persisted), was version %d",
                        self.path, manifest.version, row, previous_version)
        return self.state(with_edits=False)

    def _row_of(self, edit_id: int) -> int:
        row = self.layer.edit_rows.get(edit_id)
        if row is None:
            raise UnknownEditError(f"no edit with id {edit_id} in the served artifact "
                                   f"(version {self.layer.manifest.version})")
        return row

    def set_enabled(self, edit_id: int, enabled: bool) -> dict[str, Any]:
        row = self._row_of(edit_id)
        if enabled and (refusal := self.layer.records.record(row).enable_refusal()):
            raise LiveEditError(refusal)
        self.layer.set_enabled(row, enabled)
        # Same rows, same meaning: running requests keep their route, new ones re-route.
        self._rebase(lambda row: row)
        if self.layer.tp_rank == 0:
            logger.info("MEMOIR: edit %d %s", edit_id, "enabled" if enabled else "disabled")
        return {"edit_id": edit_id, "enabled": enabled}

    @staticmethod
    def _rebase(new_row: Callable[[int], int]) -> None:
        routes = request_routes.active()
        if routes is not None:
            routes.rebase(new_row)
