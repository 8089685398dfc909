"""Edit datasets in the reference formats, read into one record type with precise errors.

Formats: ZsRE (MEND), hallucination, temporal (as in the MEMOIR/WISE benchmarks) and a
plain JSONL (`prompt`, `target`, optional `rephrase`, `loc`, `loc_ans`, `subject`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file that cannot be used; names the file, record and field."""


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    target: str
    subject: str | None = None
    rephrase: str | None = None  # paraphrase for generalization (temporal: the OOD rephrase)
    loc: str | None = None  # locality prompt
    loc_ans: str | None = None
    kind: str = "jsonl"


# Per format: record field -> EditRequest field, and which fields must be present.
_FIELDS = {
    "zsre": ({"src": "prompt", "alt": "target", "subject": "subject", "rephrase": "rephrase", "loc": "loc", "loc_ans": "loc_ans"}, ("src", "alt")),
    "hallucination": (
        {"prompt": "prompt", "target_new": "target", "subject": "subject", "locality_prompt": "loc", "locality_ground_truth": "loc_ans"},
        ("prompt", "target_new"),
    ),
    "temporal": (
        {"prompt": "prompt", "target_new": "target", "subject": "subject", "ood_rephrase": "rephrase",
         "locality_prompt": "loc", "locality_ground_truth": "loc_ans"},
        ("prompt", "target_new"),
    ),
    "jsonl": (
        {"prompt": "prompt", "target": "target", "subject": "subject", "rephrase": "rephrase", "loc": "loc", "loc_ans": "loc_ans"},
        ("prompt", "target"),
    ),
}
KINDS = tuple(_FIELDS)


def _read_records(path: Path) -> list[Any]:
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    text = path.read_text()
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    if not records:
        raise DatasetError(f"{path}: the list of records is empty")
    return records


def _detect(path: Path, records: list[Any]) -> str:
    first = records[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: record 0 is a {type(first).__name__}, expected an object")
    keys = set(first)
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new", "ood_rephrase"} <= keys:
        return "temporal"
    if {"prompt", "target_new"} <= keys:
        return "hallucination"
    if {"prompt", "target"} <= keys:
        return "jsonl"
    raise DatasetError(f"{path}: cannot tell the format from record 0's keys {sorted(keys)}; known formats: {KINDS}")


def detect_kind(path: str | Path) -> str:
    path = Path(path)
    return _detect(path, _read_records(path))


def _text(value: Any, path: Path, index: int, name: str, required: bool) -> str | None:
    if value is None:
        if required:
            raise DatasetError(f"{path}: record {index} is missing field {name!r}")
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # some ZsRE dumps hold answers as one-element lists
    if not isinstance(value, str):
        raise DatasetError(f"{path}: record {index} field {name!r} must be a string, found {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise DatasetError(f"{path}: record {index} field {name!r} is empty")
    return value or None


def load_edit_dataset(
    path: str | Path, kind: str = "auto", limit: int | None = None, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read an edit dataset; raises DatasetError naming the path, record index and field.

    skip_invalid: leave out (with a warning naming each) records that cannot be edited, e.g.
    the empty targets present in the public ZsRE file, instead of failing.
    """
    path = Path(path)
    records = _read_records(path)
    if kind == "auto":
        kind = _detect(path, records)
    if kind not in _FIELDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; known: {KINDS}")
    mapping, required = _FIELDS[kind]
    if limit is not None:
        records = records[:limit]
    requests = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
        try:
            values = {field: _text(record.get(key), path, index, key, key in required) for key, field in mapping.items()}
        except DatasetError as exc:
            if not skip_invalid:
                raise DatasetError(f"{exc} (pass --skip-invalid to leave such records out)") from None
            logger.warning("skipping: %s", exc)
            continue
        requests.append(EditRequest(kind=kind, **values))
    return requests


def load_text_pool(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts for background features: a .txt (one per line) or the prompts and locality prompts of a dataset."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise DatasetError(f"{path}: text file not found")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = []
        for request in load_edit_dataset(path):
            texts += [t for t in (request.loc, request.prompt) if t]
    if not texts:
        raise DatasetError(f"{path}: no texts found")
    return texts[:limit] if limit is not None else texts
