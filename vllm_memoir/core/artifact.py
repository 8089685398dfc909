"""The portable MEMOIR artifact: one directory, a JSON manifest, safetensors, JSONL.

Layout of a directory at version N:
    manifest.json              ArtifactManifest; names the files of version N and their sha256
    memoir-vN.safetensors      memory [H, D], masks [E, W] uint8 bitsets, permutation [D],
                               background_mean [D] (when computed)
                               background_basis [r, D] (when background_components r > 0)
    edits-vN.jsonl             one EditRecord per stored mask, in mask order

Saving writes the version-N files first and replaces manifest.json last (os.replace), so a
crash at any point leaves either the old or the new artifact whole. Only safetensors and
JSON are read: nothing here unpickles, and only regular files are opened (a FIFO or a
device named like an artifact file is refused, not waited on).

Versions count published states, not saves: an edit job checkpoints every few edits, and
all checkpoints of one job share the version the job started (a fresh artifact is version 1
however many checkpoints its job wrote). The job records its progress in the manifest's
`job` field = {data_sha256, first_row, done, total} (manifests written before that field
kept it in hparams["job"]; they read the same); while done < total the files are
named memoir-vN.partD.safetensors / edits-vN.partD.jsonl (D edits done), so a checkpoint
never overwrites a file the manifest on disk names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import secrets
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .edit_records import EditRecord, EditRecords, edit_lines, edit_records_from_jsonl  # EditRecord: re-exported
from .errors import ArtifactError  # re-exported: callers import it from here
from .route_span import RouteSpan, RouteSpanError
from .tophash import AGGREGATIONS, mask_bit_counts, packed_width

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A manifest is a few kB; anything this large is not one (and would be read whole into memory).
MAX_MANIFEST_BYTES = 64 << 20
# Paths in messages are cut here: a path comes from users (an HTTP body) and lands in logs.
SHOWN_PATH_CHARS = 200
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ArtifactManifest:
    base_model: str
    base_fingerprint: str
    module_path: str
    layer_index: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    top_k: int
    irr_threshold: float
    aggregation: str
    num_edits: int = 0
    version: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Which prompt tokens the route feature averages (core/route_span.py); absent in older
    # manifests, which read as "prompt" (every prompt token, the reference's rule).
    routing_span: str = "prompt"
    routing_span_markers: dict[str, list[int]] = field(default_factory=dict)
    # The progress of the edit job that wrote this version, {data_sha256, first_row, done,
    # total} (see unfinished_job); empty when no edit job wrote it.
    job: dict[str, Any] = field(default_factory=dict)
    # How far the best edit's overlap must beat the second best's to route (core/tophash.py
    # match_routes); absent in older manifests, which read as 0.0 (no such check, the reference).
    route_margin: float = 0.0
    # How many of the background's principal directions the routing key removes from a prompt's
    # feature before TopHash (core/tophash.py remove_background_components; the rows of the
    # background_basis tensor); absent in older manifests, which read as 0 (the reference's key).
    background_components: int = 0

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "ArtifactManifest":
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: unknown format_version {version!r} (this build reads {FORMAT_VERSION})")
        obj = _job_out_of_hparams(obj)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in obj and n not in ("hparams", "files", "num_edits", "version",
                                                                           "routing_span", "routing_span_markers", "job",
                                                                           "route_margin", "background_components"))
        if missing:
            raise ArtifactError(f"{where}: missing fields {missing}")
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ArtifactError(f"{where}: unknown fields {unknown}")
        _check_field_types(obj, where)
        manifest = cls(**obj)
        if manifest.dtype not in _DTYPES:
            raise ArtifactError(f"{where}: dtype {manifest.dtype!r} is not one of {sorted(_DTYPES)}")
        if manifest.aggregation not in AGGREGATIONS:
            raise ArtifactError(f"{where}: aggregation {manifest.aggregation!r} is not one of {AGGREGATIONS}")
        if not 0 < manifest.top_k <= manifest.intermediate_size:
            raise ArtifactError(f"{where}: top_k {manifest.top_k} outside 1..{manifest.intermediate_size}")
        if not 0 <= manifest.route_margin <= 1:
            raise ArtifactError(f"{where}: route_margin {manifest.route_margin} outside 0..1")
        manifest.route_span(where)  # a bad routing_span is refused here, naming the field
        return manifest

    def route_span(self, where: str = MANIFEST_NAME) -> RouteSpan:
        try:
            return RouteSpan.from_manifest(self.routing_span, self.routing_span_markers, self.aggregation, where)
        except RouteSpanError as exc:
            raise ArtifactError(str(exc)) from None


# JSON type of each manifest field: a hand-edited or foreign manifest must fail here, naming
# the field, not later as a TypeError deep in the loader or the server's start-up.
_FIELD_TYPES = {
    "base_model": str, "base_fingerprint": str, "module_path": str, "dtype": str, "aggregation": str,
    "layer_index": int, "hidden_size": int, "intermediate_size": int, "top_k": int, "num_edits": int,
    "version": int, "format_version": int, "irr_threshold": float, "hparams": dict, "files": dict,
    "routing_span": str, "routing_span_markers": dict, "job": dict, "route_margin": float,
    "background_components": int,
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object"}
_REQUIRED_TENSORS = ("memory", "masks", "permutation")


def _job_out_of_hparams(obj: dict[str, Any]) -> dict[str, Any]:
    """A manifest's JSON with the edit job's progress in its own field: manifests written before
    the field existed kept it in hparams["job"]."""
    hparams = obj.get("hparams")
    if "job" in obj or not isinstance(hparams, dict) or "job" not in hparams:
        return obj
    return {**obj, "hparams": {k: v for k, v in hparams.items() if k != "job"}, "job": hparams["job"]}


def _check_field_types(obj: dict[str, Any], where: str) -> None:
    for name, kind in _FIELD_TYPES.items():
        if name not in obj:
            continue
        value = obj[name]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ArtifactError(f"{where}: field {name!r} must be {_TYPE_NAMES[kind]}, found {type(value).__name__} {value!r:.40}")
        if kind is int and name != "format_version" and value < 0:
            raise ArtifactError(f"{where}: field {name!r} must not be negative, found {value}")
    for name, digest in obj.get("files", {}).items():
        # Only plain names inside the artifact directory: a manifest must not point the loader elsewhere.
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ArtifactError(f"{where}: files: {name!r} is not a file name in the artifact directory")
        if not isinstance(digest, str):
            raise ArtifactError(f"{where}: files: the sha256 of {name!r} must be a string")


@dataclass
class MemoirArtifact:
    """Everything needed to serve or extend an edited layer."""

    manifest: ArtifactManifest
    memory: torch.Tensor  # [H, D]
    masks: torch.Tensor  # [E, packed_width(D)] uint8
    permutation: torch.Tensor  # [D] int64
    background_mean: torch.Tensor | None  # [D] float32
    edits: EditRecords | list[EditRecord]  # load_artifact gives an EditRecords
    background_basis: torch.Tensor | None = None  # [background_components, D] float32, orthonormal rows

    @property
    def enabled(self) -> torch.Tensor:
        if isinstance(self.edits, EditRecords):
            return torch.from_numpy(self.edits.enabled.copy())
        return torch.tensor([e.enabled for e in self.edits], dtype=torch.bool)


def base_fingerprint(down_proj_weight: torch.Tensor, config: dict[str, Any]) -> str:
    """Identity of the base model as far as the artifact cares: the edited weight and shapes.

    Computed on float32 so a bf16 checkpoint and its float32 copy agree.
    """
    digest = hashlib.sha256()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    digest.update(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    digest.update(down_proj_weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def shown_path(path: str | os.PathLike) -> str:
    """`path` for a message: whole when short, else its first SHOWN_PATH_CHARS characters."""
    text = os.fspath(path)
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    return f"{text[:SHOWN_PATH_CHARS]}... ({len(text)} characters)"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> IO[bytes]:
    """Open `path` for reading only if it is a regular file (of at most `max_bytes`).

    Raises ArtifactError naming the path (cut to SHOWN_PATH_CHARS) and the reason; a missing
    file raises FileNotFoundError, for callers that word that case themselves. The type is
    checked before the open (a device is never opened) and again on the open file, which is
    opened non-blocking, so a FIFO put in its place meanwhile cannot block the reader.
    """
    shown = shown_path(path)
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileNotFoundError(exc.errno, exc.strerror, shown) from None
    except OSError as exc:  # too long a name, no permission, a symlink loop, ...
        raise ArtifactError(f"{shown}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    except ValueError:  # os.stat refuses a path with a NUL character
        raise ArtifactError(f"{shown}: not a usable path (it contains a NUL character)") from None
    if kind is not None:
        raise ArtifactError(f"{shown}: is {kind}, not a regular file")
    try:
        info = os.fstat(fd)
        kind = _not_regular(info.st_mode)
        if kind is not None:
            raise ArtifactError(f"{shown}: is {kind}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ArtifactError(f"{shown}: {info.st_size} bytes, more than the {max_bytes} this file may have")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (open_regular_file's checks), at most `max_bytes` of them."""
    with open_regular_file(path, max_bytes) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the size check
        raise ArtifactError(f"{shown_path(path)}: more than the {max_bytes} bytes this file may have")
    return data


def _read_existing(path: Path) -> bytes:
    """read_regular_file, with a missing file an ArtifactError too."""
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        raise ArtifactError(f"{shown_path(path)}: missing") from None
    except OSError as exc:  # a read error after the open (EIO, ...)
        raise ArtifactError(f"{shown_path(path)}: cannot be read ({exc.strerror or exc})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open_regular_file(path) as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except FileNotFoundError:
        raise ArtifactError(f"{shown_path(path)}: missing") from None
    return digest.hexdigest()


def _create_temporary(path: Path) -> Path:
    """A new empty file beside `path`, with the mode a plain open() would give it (0666 less the
    umask), unlike tempfile.mkstemp's 0600: artifacts are read by servers running as other users."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, write) -> None:
    """Write via a temporary file in the same directory, fsync, then rename into place."""
    tmp = _create_temporary(path)
    mode = tmp.stat().st_mode
    try:
        write(tmp)
        tmp.chmod(mode)  # a writer that makes its own file (safetensors' save_file does) gets 0600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def unfinished_job(job: Any) -> dict[str, Any] | None:
    """A manifest's `job`, when it has edits still to do (a checkpoint of a job that is
    running, or was stopped and can be resumed)."""
    if isinstance(job, dict) and isinstance(job.get("done"), int) and job["done"] < job.get("total", 0):
        return job
    return None


def _next_version(manifest: ArtifactManifest, previous: dict[str, Any] | None) -> int:
    """The version a save publishes: the one on disk when the save continues the unfinished job
    saved there (same data, same first row), else one past the newest known."""
    on_disk = previous.get("version", 0) if previous else 0
    running = unfinished_job(_job_out_of_hparams(previous).get("job")) if previous else None
    job = manifest.job
    if running is not None and isinstance(job, dict) and isinstance(on_disk, int) and manifest.version <= on_disk \
            and all(job.get(key) == running.get(key) for key in ("data_sha256", "first_row")):
        return on_disk
    return max(manifest.version, on_disk if isinstance(on_disk, int) else 0) + 1


def _file_names(manifest: ArtifactManifest, version: int, taken: set[str]) -> tuple[str, str]:
    """This save's tensors and edits file names, none of them one the manifest on disk names."""
    job = unfinished_job(manifest.job)
    stem = f"v{version}" if job is None else f"v{version}.part{job['done']}"
    candidates = (stem, *(f"{stem}.{n}" for n in range(1, len(taken) + 2)))
    stem = next(c for c in candidates if f"memoir-{c}.safetensors" not in taken and f"edits-{c}.jsonl" not in taken)
    return f"memoir-{stem}.safetensors", f"edits-{stem}.jsonl"


def save_artifact(artifact: MemoirArtifact, directory: str | os.PathLike) -> Path:
    """Write the artifact as the next version in `directory`; returns the manifest path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest = artifact.manifest
    previous = _read_manifest_json(out) if (out / MANIFEST_NAME).exists() else None
    version = _next_version(manifest, previous)
    tensors_name, edits_name = _file_names(manifest, version, set(previous.get("files", {})) if previous else set())

    tensors = {
        "memory": artifact.memory.detach().to("cpu", _DTYPES[manifest.dtype]).contiguous(),
        "masks": artifact.masks.detach().to("cpu", torch.uint8).contiguous(),
        "permutation": artifact.permutation.detach().to("cpu", torch.int64).contiguous(),
    }
    if artifact.background_mean is not None:
        tensors["background_mean"] = artifact.background_mean.detach().to("cpu", torch.float32).contiguous()
    if artifact.background_basis is not None:
        tensors["background_basis"] = artifact.background_basis.detach().to("cpu", torch.float32).contiguous()
    saved = (manifest.version, manifest.num_edits, manifest.files)
    try:
        write_atomic(out / tensors_name, lambda p: save_file(tensors, str(p)))
        lines = edit_lines(artifact.edits)
        write_atomic(out / edits_name, lambda p: p.write_bytes(lines))

        manifest.version = version
        manifest.num_edits = len(artifact.edits)
        manifest.files = {tensors_name: _sha256(out / tensors_name), edits_name: _sha256(out / edits_name)}
        text = json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True)
        write_atomic(out / MANIFEST_NAME, lambda p: p.write_text(text))
    except BaseException:
        # The old manifest still names the old files: drop this version's (they would only
        # fill a disk that is likely full already) and leave the in-memory manifest as it was.
        manifest.version, manifest.num_edits, manifest.files = saved
        if not previous or tensors_name not in previous.get("files", {}):
            (out / tensors_name).unlink(missing_ok=True)
        if not previous or edits_name not in previous.get("files", {}):
            (out / edits_name).unlink(missing_ok=True)
        raise
    _remove_stale(out, {tensors_name, edits_name})
    return out / MANIFEST_NAME


def save_edit_records(directory: str | os.PathLike, manifest: ArtifactManifest,
                      edits: EditRecords | list[EditRecord]) -> ArtifactManifest:
    """Publish `edits` as the next version of the artifact in `directory`, whose manifest on disk
    is `manifest`, keeping its tensors: for a change that leaves every mask and the memory as
    they are (enabled flags). Only a new edits file and the manifest are written: the new
    manifest names the current tensors file, under its name and sha256, so nothing of the
    tensors is rewritten or hashed again (a load still checks them). Same guarantees as
    save_artifact: files written atomically, the manifest last, a higher version, and a failed
    save leaves the previous version whole. Refused (ArtifactError) when the manifest on disk is
    no longer `manifest`, or when `edits` are not one record per mask. Returns the new manifest
    (`manifest` itself is left as it was)."""
    out = Path(directory)
    where = shown_path(out / MANIFEST_NAME)
    previous = _read_manifest_json(out)
    on_disk = ArtifactManifest.from_json(previous, where)
    if on_disk != manifest:
        raise ArtifactError(f"{where}: version {on_disk.version} on disk is not the version {manifest.version} the "
                            "records were read from (it changed meanwhile)")
    if unfinished_job(manifest.job) is not None:
        raise ArtifactError(f"{where}: a checkpoint of an unfinished edit job; its records are the job's to write")
    if len(edits) != manifest.num_edits:
        raise ArtifactError(f"{where}: {len(edits)} edit records for {manifest.num_edits} masks")
    tensors_name = next((n for n in manifest.files if n.endswith(".safetensors")), None)
    if tensors_name is None:
        raise ArtifactError(f"{where}: 'files' names no .safetensors file")
    version = _next_version(manifest, previous)
    _, edits_name = _file_names(manifest, version, set(manifest.files))
    lines = edit_lines(edits)
    published = dataclasses.replace(manifest, version=version, files={
        tensors_name: manifest.files[tensors_name],
        edits_name: hashlib.sha256(lines).hexdigest(),  # of the bytes written: no second read
    })
    try:
        write_atomic(out / edits_name, lambda p: p.write_bytes(lines))
        text = json.dumps(dataclasses.asdict(published), indent=2, sort_keys=True)
        write_atomic(out / MANIFEST_NAME, lambda p: p.write_text(text))
    except BaseException:
        (out / edits_name).unlink(missing_ok=True)  # no manifest names it (_file_names)
        raise
    _remove_stale(out, {tensors_name, edits_name})
    return published


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Old versions' files; garbage only once the new manifest is in place."""
    for stale in (*out.glob("memoir-v*.safetensors"), *out.glob("edits-v*.jsonl")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def load_edit_records(directory: str | os.PathLike, manifest: ArtifactManifest) -> EditRecords:
    """The edit records of the artifact version `manifest` describes, read from `directory`,
    their file checked against the manifest's sha256 (hashed from the bytes read) and their
    count against its num_edits; the tensors file is neither read nor hashed."""
    directory = Path(directory)
    edits_name = next((n for n in manifest.files if n.endswith(".jsonl")), None)
    if edits_name is None:
        raise ArtifactError(f"{shown_path(directory / MANIFEST_NAME)}: 'files' names no .jsonl file")
    path = directory / edits_name
    data = _read_existing(path)
    if hashlib.sha256(data).hexdigest() != manifest.files[edits_name]:
        raise ArtifactError(f"{shown_path(path)}: checksum mismatch (truncated or modified after the manifest was "
                            "written)")
    edits = _edits_from_bytes(data, path)
    if len(edits) != manifest.num_edits:
        raise ArtifactError(f"{shown_path(path)}: {len(edits)} edit records for {manifest.num_edits} masks")
    return edits


def _read_manifest_json(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        data = read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ArtifactError(f"{shown_path(path)}: missing (is {shown_path(directory)} a MEMOIR artifact "
                            "directory?)") from None
    except OSError as exc:
        raise ArtifactError(f"{shown_path(path)}: cannot be read ({exc.strerror or exc})") from None
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{shown_path(path)}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{shown_path(path)}: expected a JSON object")
    return obj


def read_manifest(directory: str | os.PathLike) -> ArtifactManifest:
    directory = Path(directory)
    return ArtifactManifest.from_json(_read_manifest_json(directory), shown_path(directory / MANIFEST_NAME))


def load_artifact(directory: str | os.PathLike, expected_fingerprint: str | None = None) -> MemoirArtifact:
    """Load and validate an artifact; raises ArtifactError naming the file and problem.

    Every file's sha256 is checked against the manifest before the artifact is returned. The
    tensors file (2 GB at Llama-3-8B width and 1,000,000 edits) is hashed on its own thread
    while the records are read and the tensors checked (hashlib releases the GIL), and the
    edits file is hashed from the bytes that are parsed (read once). When anything fails, a
    file whose checksum does not match is the error reported, as if it had been checked first.
    """
    from .compatibility import check_fingerprint  # it imports this module

    directory = Path(directory)
    manifest = read_manifest(directory)
    if expected_fingerprint is not None:
        check_fingerprint(manifest, expected_fingerprint, shown_path(directory / MANIFEST_NAME))
    tensors_name = next((n for n in manifest.files if n.endswith(".safetensors")), None)
    edits_name = next((n for n in manifest.files if n.endswith(".jsonl")), None)
    if tensors_name is None or edits_name is None:
        raise ArtifactError(f"{shown_path(directory / MANIFEST_NAME)}: 'files' must name a .safetensors and a .jsonl "
                            "file")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memoir-sha256") as hasher:
        digests = {name: hasher.submit(_sha256, directory / name) for name in manifest.files if name != edits_name}
        try:
            data = _read_existing(directory / edits_name)
            digests[edits_name] = _finished(hashlib.sha256(data).hexdigest())
            tensors = _read_tensors(directory / tensors_name)
            artifact = MemoirArtifact(
                manifest=manifest,
                memory=tensors["memory"],
                masks=tensors["masks"],
                permutation=tensors["permutation"],
                background_mean=tensors.get("background_mean"),
                edits=_edits_from_bytes(data, directory / edits_name),
                background_basis=tensors.get("background_basis"),
            )
            validate_artifact(artifact, shown_path(directory / tensors_name))
        except Exception:
            _check_checksums(directory, manifest, digests)  # a damaged file is the cause to report
            raise
        _check_checksums(directory, manifest, digests)
    return artifact


def _finished(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _check_checksums(directory: Path, manifest: ArtifactManifest, digests: dict[str, Future]) -> None:
    """Each file's sha256 against the manifest's, in the manifest's order; a file that could not be
    hashed raises its own error. Stops silently at a file that was never hashed (its read failed:
    the caller re-raises that error)."""
    for name, expected in manifest.files.items():
        digest = digests.get(name)
        if digest is None:
            return
        if digest.result() != expected:
            raise ArtifactError(f"{shown_path(directory / name)}: checksum mismatch (truncated or modified after the "
                                "manifest was written)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:  # safetensors opens the path itself: refuse a FIFO (or a device) before it can block
        open_regular_file(path).close()
    except FileNotFoundError:
        raise ArtifactError(f"{shown_path(path)}: missing") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{shown_path(path)}: not a readable safetensors file ({exc})") from exc
    missing = [name for name in _REQUIRED_TENSORS if name not in tensors]
    if missing:
        raise ArtifactError(f"{shown_path(path)}: no tensor {missing[0]!r} (holds {sorted(tensors)})")
    return tensors


def _read_edits(path: Path) -> EditRecords:
    """The records of an edits-vN.jsonl file, in one pass when they are as this build writes
    them, else line by line (which names a bad line)."""
    return _edits_from_bytes(_read_existing(path), path)


def _edits_from_bytes(data: bytes, path: Path) -> EditRecords:
    shown = shown_path(path)
    records = edit_records_from_jsonl(data, shown)
    return records if records is not None else EditRecords.from_records(_read_edits_by_line(data, path), shown)


def _read_edits_by_line(data: bytes, path: Path) -> list[EditRecord]:
    edits = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{shown_path(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    shown = shown_path(path)  # once, not per line
    with _collector_held():
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{shown}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict):
                raise ArtifactError(f"{where}: bad edit record (a {type(obj).__name__}, expected a JSON object)")
            edits.append(EditRecord.from_json(obj, where))
    return edits


@contextlib.contextmanager
def _collector_held():
    """Hold Python's cyclic garbage collector while records are built: every few thousand new
    objects it would rescan the whole heap (a server's is millions of objects), ~30% of reading
    1,000,000 records. The records hold no reference cycles, so nothing is left for it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def validate_artifact(artifact: MemoirArtifact, where: str) -> None:
    """Shapes, dtypes, finiteness and mask integrity, against the manifest."""
    m = artifact.manifest
    hidden, inter = m.hidden_size, m.intermediate_size
    expect = {
        "memory": (hidden, inter),
        "masks": (m.num_edits, packed_width(inter)),
        "permutation": (inter,),
    }
    actual = {"memory": artifact.memory, "masks": artifact.masks, "permutation": artifact.permutation}
    for name, shape in expect.items():
        if tuple(actual[name].shape) != shape:
            raise ArtifactError(f"{where}: tensor {name!r} has shape {tuple(actual[name].shape)}, manifest implies {shape}")
    if artifact.memory.dtype != _DTYPES[m.dtype]:
        raise ArtifactError(f"{where}: memory dtype {artifact.memory.dtype} differs from manifest dtype {m.dtype}")
    if artifact.masks.dtype != torch.uint8:
        raise ArtifactError(f"{where}: masks must be uint8 bitsets, got {artifact.masks.dtype}")
    if not _all_finite(artifact.memory):
        raise ArtifactError(f"{where}: memory contains NaN or Inf")
    perm = artifact.permutation
    if perm.dtype != torch.int64 or not torch.equal(torch.sort(perm).values, torch.arange(inter)):
        raise ArtifactError(f"{where}: permutation is not a permutation of 0..{inter - 1}")
    bg = artifact.background_mean
    if bg is not None:
        if tuple(bg.shape) != (inter,):
            raise ArtifactError(f"{where}: background_mean has shape {tuple(bg.shape)}, expected ({inter},)")
        if not _all_finite(bg):
            raise ArtifactError(f"{where}: background_mean contains NaN or Inf")
    elif m.aggregation == "mean_decentered":
        raise ArtifactError(f"{where}: aggregation 'mean_decentered' needs background_mean, which is absent")
    _validate_basis(artifact.background_basis, m, where)
    if len(artifact.edits) != m.num_edits:
        raise ArtifactError(f"{where}: {len(artifact.edits)} edit records for {m.num_edits} masks")
    twice = EditRecords.of(artifact.edits).duplicate_id()
    if twice is not None:
        raise ArtifactError(f"{where}: duplicate edit ids ({twice} is listed twice)")
    if m.num_edits:
        counts = mask_bit_counts(artifact.masks)
        bad = (counts != m.top_k).nonzero().flatten()
        if len(bad):
            raise ArtifactError(f"{where}: mask of edit row {int(bad[0])} has {int(counts[bad[0]])} bits set, expected top_k={m.top_k}")
        outside = _bits_beyond(artifact.masks, inter).nonzero().flatten()
        if len(outside):
            raise ArtifactError(f"{where}: mask of edit row {int(outside[0])} sets bits beyond intermediate_size={inter}")


def _bits_beyond(masks: torch.Tensor, dim: int) -> torch.Tensor:
    """[E] bool: which packed masks set a bit at or past `dim`. Reads only the tail bytes: the
    masks unpacked to one byte per bit would be 14 GB at 1,000,000 edits of Llama-3-8B width."""
    tail = masks[:, dim // 8:]
    if dim % 8:  # the byte holding bit `dim` may keep its bits below it
        high = (0xFF << (dim % 8)) & 0xFF
        return ((tail[:, 0] & high) != 0) | (tail[:, 1:] != 0).any(dim=1)
    return (tail != 0).any(dim=1)


# Exponent bits of each float dtype's bit pattern: all of them set means Inf or NaN.
_EXPONENT_BITS = {torch.float32: (np.uint32, 0x7F800000), torch.bfloat16: (np.uint16, 0x7F80),
                  torch.float16: (np.uint16, 0x7C00)}
_FINITE_BLOCK = 1 << 22  # values per block: the temporaries stay a few MB


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`. A CPU float tensor is read as its bit patterns with numpy, in
    blocks (torch.isfinite on one thread took 0.4 s for Llama-3-8B's 4096 x 14336 memory,
    this ~0.05 s); anything else by torch."""
    layout = _EXPONENT_BITS.get(tensor.dtype)
    if layout is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    kind, exponent = layout
    bits = tensor.detach().contiguous().view(torch.int32 if kind is np.uint32 else torch.int16).numpy().view(kind)
    bits = bits.reshape(-1)
    return all(not np.any((bits[at:at + _FINITE_BLOCK] & kind(exponent)) == kind(exponent))
               for at in range(0, len(bits), _FINITE_BLOCK))


def _validate_basis(basis: torch.Tensor | None, m: ArtifactManifest, where: str) -> None:
    """background_basis is there exactly when background_components > 0, with that many rows."""
    rows = m.background_components
    if rows == 0:
        if basis is not None:
            raise ArtifactError(f"{where}: tensor 'background_basis' is present but background_components is 0")
        return
    if basis is None:
        raise ArtifactError(f"{where}: background_components {rows} needs tensor 'background_basis', which is absent")
    if m.aggregation != "mean_decentered":
        raise ArtifactError(f"{where}: background_components needs aggregation 'mean_decentered', found {m.aggregation!r}")
    if tuple(basis.shape) != (rows, m.intermediate_size):
        raise ArtifactError(f"{where}: background_basis has shape {tuple(basis.shape)}, expected "
                            f"({rows}, {m.intermediate_size})")
    if basis.dtype != torch.float32 or not _all_finite(basis):
        raise ArtifactError(f"{where}: background_basis must be finite float32")
