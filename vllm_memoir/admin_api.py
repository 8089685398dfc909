"""HTTP admin routes for live edits: a `vllm.endpoint_plugins` entry point (memoir-admin).

    GET  /memoir/edits[?offset=0&limit=100] served version, edits, routing counts
    POST /memoir/artifact     {"path": P}   validate P and swap it in (no restart)
    POST /memoir/edits/{id}/disable  [{"persist": true}]
    POST /memoir/edits/{id}/enable   [{"persist": true}]

Off unless MEMOIR_ADMIN=1 (the routes are then not attached: 404), and vLLM loads endpoint
plugins only when VLLM_PLUGINS names them (memoir-serve arranges both). Every call needs
`Authorization: Bearer KEY`, KEY being MEMOIR_ADMIN_KEY when set, else the server's API key
(--api-key / VLLM_API_KEY); with neither set every call is refused. vLLM's own API-key
middleware guards only /v1-like paths, hence the check here. The key is checked before the
body is read: FastAPI would parse a declared body (and answer 400 for bad JSON) before any
dependency runs, so the routes read their bodies themselves (read_body).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from vllm_memoir.edit_control import EditControl, EditControlError

logger = logging.getLogger(__name__)

ADMIN_ENV = "MEMOIR_ADMIN"
ADMIN_KEY_ENV = "MEMOIR_ADMIN_KEY"
PLUGIN_NAME = "memoir-admin"
# Refusal messages go to the client and the log; one line, and no longer than this.
MAX_MESSAGE_CHARS = 2000


def admin_enabled() -> bool:
    return os.environ.get(ADMIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def admin_keys(args: Namespace) -> list[str]:
    """The accepted bearer tokens: the admin key alone when set, else the server's API keys."""
    if os.environ.get(ADMIN_KEY_ENV):
        return [os.environ[ADMIN_KEY_ENV]]
    keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
    return [key for key in keys if key]


class ArtifactBody(BaseModel):
    path: str


class ToggleBody(BaseModel):
    persist: bool = False


class AdminRefusal(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, one_line(message)


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` as a single line of at most `limit` characters (it may quote a client's input)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


async def read_body(request: Request, model: type[BaseModel], optional: bool = False) -> Any:
    """The request's JSON body as `model`; a malformed one is refused (400) in one line.

    optional: an empty body (or JSON null) means the model's defaults.
    """
    raw = await request.body()
    if not raw.strip():
        if optional:
            return model()
        raise AdminRefusal(400, f"the request body is empty; expected a JSON object with {sorted(model.model_fields)}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdminRefusal(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
                                f"{exc.colno})") from None
    except UnicodeDecodeError:
        raise AdminRefusal(400, "the request body is not valid JSON (not UTF-8 text)") from None
    if data is None and optional:
        return model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise AdminRefusal(400, f"bad request body ({problems})") from None


def key_hashes(keys: list[str]) -> list[bytes]:
    """What check_bearer compares against: the keys' sha256 digests (the keys are not kept)."""
    return [hashlib.sha256(key.encode()).digest() for key in keys]


def check_bearer(key_hashes: list[bytes], authorization: str) -> None:
    """Refuse (401) unless `authorization` is `Bearer KEY` for a KEY whose sha256 is listed.

    Digests are compared in constant time. Shared with the Ray Serve ingress (ray_live_edits).
    """
    if not key_hashes:
        raise AdminRefusal(401, f"admin routes need a key: set {ADMIN_KEY_ENV} (or --api-key) on the server")
    scheme, _, token = authorization.partition(" ")
    digest = hashlib.sha256(token.encode()).digest()
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, h) for h in key_hashes):
        raise AdminRefusal(401, "missing or wrong admin key (Authorization: Bearer KEY)")


class MemoirAdminPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        if not admin_enabled():
            logger.info("MEMOIR: admin routes are off (set %s=1 to serve /memoir/...)", ADMIN_ENV)
            return
        app.add_exception_handler(AdminRefusal, _refusal_handler)
        app.include_router(_router())
        logger.warning("MEMOIR: admin routes /memoir/... are on: they change what the model answers")

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if not admin_enabled():
            return
        keys = admin_keys(args)
        if not keys:
            logger.error("MEMOIR: admin routes are on but no key is set (%s, --api-key or VLLM_API_KEY); "
                         "every admin call will be refused", ADMIN_KEY_ENV)
        state.memoir_admin_key_hashes = key_hashes(keys)
        state.memoir_edit_control = None if engine_client is None else EditControl(engine_client)


def refusal_response(exc: AdminRefusal) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message})


def _refusal_handler(_request: Request, exc: AdminRefusal) -> JSONResponse:
    return refusal_response(exc)


def _authorized(request: Request) -> EditControl:
    check_bearer(getattr(request.app.state, "memoir_admin_key_hashes", []), request.headers.get("Authorization", ""))
    control = getattr(request.app.state, "memoir_edit_control", None)
    if control is None:
        raise AdminRefusal(503, "this server has no engine to edit")
    return control


async def run_admin_call(call) -> dict[str, Any]:
    """Await an EditControl call; its refusal becomes an AdminRefusal with the same status."""
    try:
        return await call
    except EditControlError as exc:
        refusal = AdminRefusal(exc.status, str(exc))
        logger.warning("MEMOIR: admin change refused (%d): %s", refusal.status, refusal.message)
        raise refusal from exc


def _router() -> APIRouter:
    router = APIRouter(prefix="/memoir", tags=["memoir"])

    @router.get("/edits")
    async def served_edits(offset: int = Query(0, ge=0), limit: int | None = Query(None, ge=0),
                           control: EditControl = Depends(_authorized)):
        return await run_admin_call(control.state(offset, limit))

    # Bodies are read in the handlers, after _authorized (see the module docstring).
    @router.post("/artifact")
    async def swap_artifact(request: Request, control: EditControl = Depends(_authorized)):
        body = await read_body(request, ArtifactBody)
        return await run_admin_call(control.swap(body.path))

    @router.post("/edits/{edit_id}/disable")
    async def disable_edit(edit_id: int, request: Request, control: EditControl = Depends(_authorized)):
        body = await read_body(request, ToggleBody, optional=True)
        return await run_admin_call(control.set_enabled(edit_id, False, body.persist))

    @router.post("/edits/{edit_id}/enable")
    async def enable_edit(edit_id: int, request: Request, control: EditControl = Depends(_authorized)):
        body = await read_body(request, ToggleBody, optional=True)
        return await run_admin_call(control.set_enabled(edit_id, True, body.persist))

    return router
