"""Live edits in every Ray Serve replica: the /memoir/... admin routes on Ray Serve LLM's ingress.

Ray Serve LLM answers HTTP in its own ingress deployment, not in vLLM's API server, so
vLLM's endpoint plugins (admin_api) never see a request there. Here the same routes
(GET /memoir/edits, POST /memoir/artifact, POST /memoir/edits/{id}/disable|enable) live on
an OpenAI ingress subclass, and each call is broadcast to every replica of the model:

- a replica is a MemoirLLMServer (Ray Serve LLM's LLMServer plus `memoir_*` methods) that
  drives its own engine's workers with the same EditControl as `vllm serve` does;
- a swap is two-phase across replicas: every replica loads and checks the new version
  beside its served edits (prepare); only when all succeeded does each one drain and switch
  (commit), else every replica drops what it staged and all keep the old version;
- GET reports each replica's version, and sums the routing counts over replicas.

Off unless the builder's `admin: true` (ray_app.build_app); every call then needs
`Authorization: Bearer $MEMOIR_ADMIN_KEY` (the ingress process's environment: set it in the
app's runtime_env or where Ray starts). Uses Ray Serve LLM's replica broadcast, which Ray
marks experimental (ray 2.60 here).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import Counter
from typing import Any

from fastapi import Query, Request
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.llm._internal.serve.core.ingress.mixins.broadcastable import ReplicaBroadcastable
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress

from vllm_memoir.admin_api import (ADMIN_KEY_ENV, AdminRefusal, ArtifactBody, ToggleBody, check_bearer, key_hashes,
                                   read_body, refusal_response, run_admin_call)
from vllm_memoir.edit_control import EditControl, EditControlError, PreparedSwap, artifact_dir, persist_flag

logger = logging.getLogger(__name__)


class _ServerEngine:
    """The engine-client calls EditControl makes, over LLMServer's public control methods."""

    def __init__(self, server: LLMServer):
        self.server = server

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return await self.server.collective_rpc(method, args=tuple(args))

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        await self.server.pause(mode=mode, clear_cache=clear_cache)

    async def resume_generation(self) -> None:
        await self.server.resume()


def _answer(call):
    """A replica method's result as a dict that crosses Ray: {"ok": True, ...} or the refusal."""
    @functools.wraps(call)
    async def wrapped(*args, **kwargs) -> dict[str, Any]:
        try:
            return {"ok": True, **(await call(*args, **kwargs))}
        except EditControlError as exc:
            return {"ok": False, "status": exc.status, "error": str(exc)}
    return wrapped


class MemoirLLMServer(LLMServer):
    """A Ray Serve LLM replica whose served MEMOIR edits can change while it serves."""

    _memoir_control: EditControl | None = None
    _memoir_prepared: PreparedSwap | None = None

    def _control(self) -> EditControl:
        if self._memoir_control is None:
            self._memoir_control = EditControl(_ServerEngine(self))
        return self._memoir_control

    @_answer
    async def memoir_state(self, offset: int = 0, limit: int | None = None, with_edits: bool = True):
        control = self._control()
        return await (control.state(offset, limit) if with_edits else control.summary())

    @_answer
    async def memoir_prepare(self, path: str):
        self._memoir_prepared = None
        self._memoir_prepared = await self._control().prepare_swap(path)
        return {"version": self._memoir_prepared.version, "load_seconds": self._memoir_prepared.load_seconds}

    @_answer
    async def memoir_commit(self, version: int):
        prepared, self._memoir_prepared = self._memoir_prepared, None
        if prepared is None or prepared.version != version:
            raise EditControlError(409, f"this replica has no prepared artifact version {version} to commit")
        return await self._control().commit_swap(prepared)

    @_answer
    async def memoir_abort(self):
        if self._memoir_prepared is not None:
            self._memoir_prepared = None
            await self._control().abort_swap()
        return {}

    @_answer
    async def memoir_set_enabled(self, edit_id: int, enabled: bool):
        return await self._control().set_enabled(edit_id, enabled, persist=False)

    @_answer
    async def memoir_flags(self, edit_id: int):
        return await self._control().served_flags(edit_id)

    @_answer
    async def memoir_adopt_flags(self, previous_version: int, manifest: dict[str, Any], edit_id: int, enabled: bool):
        return await self._control().adopt_flags(previous_version, manifest, edit_id, enabled)


class ReplicatedEditControl:
    """EditControl's three calls (state, swap, set_enabled) over every replica of one model."""

    def __init__(self, broadcast):
        self._broadcast = broadcast  # async (method, kwargs) -> [answer per replica]
        self._lock = asyncio.Lock()

    async def _on_replicas(self, method: str, **kwargs: Any) -> list[dict[str, Any]]:
        answers = await self._broadcast(method, kwargs)
        if not answers:
            raise EditControlError(503, "the model has no running replica")
        refused = [(i, a) for i, a in enumerate(answers) if not a.get("ok")]
        if refused:
            replica, answer = refused[0]
            raise EditControlError(answer.get("status", 500), f"replica {replica} of {len(answers)}: "
                                                              f"{answer.get('error', 'failed')}")
        return answers

    async def state(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        answers = await self._on_replicas("memoir_state", offset=offset, limit=limit)
        state = dict(answers[0])
        state.pop("ok")
        state["replicas"] = [{"version": a["version"], "num_edits": a["num_edits"], "num_enabled": a["num_enabled"],
                              "path": a["path"]} for a in answers]
        state["consistent"] = len({(a["path"], a["version"], a.get("artifact_sha256"), a["num_enabled"])
                                   for a in answers}) == 1
        # Routing counts are per replica (each counts the requests it served): report the sums.
        state["unrouted_requests"] = sum(a.get("unrouted_requests", 0) for a in answers)
        routed = Counter()
        for answer in answers:
            routed.update({e["edit_id"]: e["routed_requests"] for e in answer.get("edits", ())})
        for edit in state.get("edits", ()):
            edit["routed_requests"] = routed[edit["edit_id"]]
        return state

    async def swap(self, path: str | os.PathLike) -> dict[str, Any]:
        path = str(artifact_dir(path))
        async with self._lock:
            return await self._swap(path)

    async def _swap(self, path: str) -> dict[str, Any]:
        previous = await self._on_replicas("memoir_state", with_edits=False)
        try:
            prepared = await self._on_replicas("memoir_prepare", path=path)
        except BaseException:
            await self._broadcast("memoir_abort", {})  # every replica drops what it staged
            raise
        versions = {a["version"] for a in prepared}
        if len(versions) != 1:  # the artifact changed on disk between two replicas' loads
            await self._broadcast("memoir_abort", {})
            raise EditControlError(409, f"replicas loaded different versions {sorted(versions)} of {path}; retry")
        committed = await self._on_replicas("memoir_commit", version=versions.pop())
        answer = {key: committed[0][key] for key in ("path", "version", "num_edits")}
        answer["previous_versions"] = [a["version"] for a in previous]
        answer["replicas"] = [{key: a[key] for key in ("load_seconds", "drain_seconds", "commit_seconds",
                                                        "paused_seconds")} for a in committed]
        logger.info("MEMOIR: %d replicas now serve %s version %d", len(committed), path, answer["version"])
        return answer

    async def set_enabled(self, edit_id: int, enabled: bool, persist: bool) -> dict[str, Any]:
        """As EditControl.set_enabled, on every replica: a persisted change is written first (once,
        refused unless every replica serves the same version and flags), then every replica
        flips the flag and takes the new version (no swap, no reload)."""
        async with self._lock:
            answer: dict[str, Any] = {"edit_id": edit_id, "enabled": enabled}
            if not persist:
                await self._on_replicas("memoir_set_enabled", edit_id=edit_id, enabled=enabled)
                return answer
            served = await self._on_replicas("memoir_flags", edit_id=edit_id)
            seen = {(a["path"], a["version"], tuple(a["disabled_rows"])) for a in served}
            if len(seen) != 1:
                raise EditControlError(409, "replicas serve different edits (versions "
                                            f"{sorted({a['version'] for a in served})}, or other enabled flags); "
                                            "POST the artifact to bring them together first")

            async def adopt(previous_version: int, manifest: dict[str, Any], edit_id: int, enabled: bool):
                adopted = await self._on_replicas("memoir_adopt_flags", previous_version=previous_version,
                                                  manifest=manifest, edit_id=edit_id, enabled=enabled)
                return adopted[0]

            answer["persisted"] = await persist_flag(served[0], edit_id, enabled, adopt)
            return answer


class MemoirIngress(OpenAiIngress, ReplicaBroadcastable):
    """Ray Serve LLM's OpenAI ingress plus the MEMOIR admin routes, broadcast to all replicas."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        key = os.environ.get(ADMIN_KEY_ENV)
        self._memoir_key_hashes = key_hashes([key] if key else [])
        if not key:
            logger.error("MEMOIR: admin routes are on but %s is unset in the ingress; every admin call will be "
                         "refused", ADMIN_KEY_ENV)
        self._memoir_controls: dict[str, ReplicatedEditControl] = {}

    async def _memoir(self, request: Request, model: str | None, call) -> Any:
        try:
            check_bearer(self._memoir_key_hashes, request.headers.get("Authorization", ""))
            model_id = await self._get_model_id(model)
            control = self._memoir_controls.get(model_id)
            if control is None:
                async def broadcast(method: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
                    return await self._broadcast_to_replicas(model_id, method, kwargs=kwargs)
                control = self._memoir_controls[model_id] = ReplicatedEditControl(broadcast)
            return await run_admin_call(call(control))
        except AdminRefusal as exc:
            return refusal_response(exc)

    async def memoir_edits(self, request: Request, offset: int = Query(0, ge=0),
                           limit: int | None = Query(None, ge=0), model: str | None = None):
        return await self._memoir(request, model, lambda control: control.state(offset, limit))

    # The bodies are read after the key check (in the call), so a caller without the key learns
    # nothing from a malformed body: 401 first, as on `vllm serve` (admin_api).
    async def memoir_swap(self, request: Request, model: str | None = None):
        async def call(control: ReplicatedEditControl):
            return await control.swap((await read_body(request, ArtifactBody)).path)
        return await self._memoir(request, model, call)

    async def memoir_disable(self, request: Request, edit_id: int, model: str | None = None):
        return await self._memoir(request, model, lambda control: self._toggle(request, control, edit_id, False))

    async def memoir_enable(self, request: Request, edit_id: int, model: str | None = None):
        return await self._memoir(request, model, lambda control: self._toggle(request, control, edit_id, True))

    @staticmethod
    async def _toggle(request: Request, control: ReplicatedEditControl, edit_id: int, enabled: bool):
        body = await read_body(request, ToggleBody, optional=True)
        return await control.set_enabled(edit_id, enabled, body.persist)


MEMOIR_ENDPOINTS = {
    "memoir_edits": lambda app: app.get("/memoir/edits", tags=["memoir"]),
    "memoir_swap": lambda app: app.post("/memoir/artifact", tags=["memoir"]),
    "memoir_disable": lambda app: app.post("/memoir/edits/{edit_id}/disable", tags=["memoir"]),
    "memoir_enable": lambda app: app.post("/memoir/edits/{edit_id}/enable", tags=["memoir"]),
}
INGRESS_ENDPOINTS = {**DEFAULT_ENDPOINTS, **MEMOIR_ENDPOINTS}


def build_admin_app(llm_config) -> Any:
    """The Ray Serve application of one MEMOIR model with the admin routes on its ingress.

    What ray.serve.llm.build_openai_app builds for one model, with MemoirIngress in place of
    the plain OpenAI ingress (replicas are MemoirLLMServer through llm_config.server_cls).
    """
    from ray import serve
    from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from vllm_memoir.validation import MemoirConfigError

    if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
        raise MemoirConfigError("MEMOIR admin routes need Ray Serve LLM's ingress deployment; unset "
                                "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING (direct streaming has none)")
    model_id = llm_config.model_id
    ingress = make_fastapi_ingress(MemoirIngress, endpoint_map=INGRESS_ENDPOINTS)
    options = MemoirIngress.get_deployment_options([llm_config])
    return serve.deployment(ingress, **options).bind(
        llm_deployments={model_id: build_llm_deployment(llm_config)},
        model_cards={model_id: to_model_metadata(model_id, llm_config)},
    )
