"""Worker methods for the admin routes, mixed into vLLM's worker with --worker-extension-cls.

    --worker-extension-cls vllm_memoir.worker_extension.MemoirWorkerExtension

(memoir-serve adds it when MEMOIR_ADMIN=1). The API server reaches them by name with
`engine_client.collective_rpc("memoir_...")`, which runs them on every worker between
engine steps. Each answers a plain dict, {"ok": False, "error": ...} for a refused change,
so a bad artifact never raises inside the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_memoir.core import ArtifactError
from vllm_memoir.live_edits import LiveEdits, UnknownEditError
from vllm_memoir.validation import MemoirConfigError

logger = logging.getLogger(__name__)

_REFUSALS = (MemoirConfigError, ArtifactError, ValueError, OSError)


def _answer(call) -> dict[str, Any]:
    try:
        return {"ok": True, **(call() or {})}
    except UnknownEditError as exc:
        return {"ok": False, "error": str(exc), "kind": "unknown_edit"}
    except _REFUSALS as exc:
        return {"ok": False, "error": str(exc), "kind": "refused"}


class MemoirWorkerExtension:
    """Mixed into the worker class: `self` is the worker (self.get_model(), self.vllm_config)."""

    def _memoir_live(self) -> LiveEdits:
        live = getattr(self, "_memoir_live_edits", None)
        if live is None:
            live = self._memoir_live_edits = LiveEdits(self.get_model(), self.vllm_config)
        return live

    def memoir_state(self, with_edits: bool = True, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().state(with_edits, offset, limit))

    def memoir_prepare(self, path: str, expected_version: int) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().prepare(path, expected_version))

    def memoir_prepared(self) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().prepared())

    def memoir_commit(self, expected_version: int) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().commit(expected_version))

    def memoir_abort(self) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().abort())

    def memoir_set_enabled(self, edit_id: int, enabled: bool) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().set_enabled(edit_id, enabled))

    def memoir_flags(self, edit_id: int) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().flags(edit_id))

    def memoir_adopt_flags(self, previous_version: int, manifest: dict[str, Any], edit_id: int,
                           enabled: bool) -> dict[str, Any]:
        return _answer(lambda: self._memoir_live().adopt_flags(previous_version, manifest, edit_id, enabled))
