"""Edit datasets in the reference formats, read into one record type with precise errors.

Formats (see shared/data/README.md):
- zsre: the MEND-format ZsRE list (src, alt, rephrase, loc, loc_ans, subject; answers/pred/cond unused),
  plus this project's optional loc_neighbour / loc_neighbour_ans (the facts edit sets).
- hallucination: the WISE/EasyEdit list (prompt, target_new, subject, locality_prompt, locality_ground_truth).
- temporal: as hallucination plus ood_rephrase.
- jsonl: one object per line with prompt, target and optional rephrase, loc, loc_ans, subject,
  loc_neighbour, loc_neighbour_ans.

Two locality prompts: `loc` is unrelated to the edit (ZsRE's NQ question; in the facts sets another
relation), `loc_neighbour` asks the edit's own question about another subject: a user asking
that must not get the edit. The second is optional; every tool reads `loc`.

Every error is a DatasetError naming the file, the record (0-based) and the field at fault.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, record and field."""


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # the edit prompt
    target: str  # the new answer to teach
    subject: str | None = None
    rephrase: str | None = None  # paraphrase for generalization (temporal: ood_rephrase)
    loc: str | None = None  # locality prompt
    loc_ans: str | None = None  # its answer
    loc_neighbour: str | None = None  # the edit prompt's question about another subject
    loc_neighbour_ans: str | None = None  # its answer
    kind: str = "zsre"  # which format it came from: zsre | hallucination | temporal | jsonl


@dataclass(frozen=True)
class _Format:
    """How one file format's keys map onto EditRequest fields."""

    fields: dict[str, str]  # record key -> EditRequest field
    prompt_key: str
    target_key: str
    loc_key: str

    @property
    def required(self) -> tuple[str, str]:
        return (self.prompt_key, self.target_key)


_FORMATS = {
    "zsre": _Format(
        {"src": "prompt", "alt": "target", "subject": "subject", "rephrase": "rephrase", "loc": "loc", "loc_ans": "loc_ans",
         "loc_neighbour": "loc_neighbour", "loc_neighbour_ans": "loc_neighbour_ans"},
        prompt_key="src", target_key="alt", loc_key="loc",
    ),
    "hallucination": _Format(
        {"prompt": "prompt", "target_new": "target", "subject": "subject",
         "locality_prompt": "loc", "locality_ground_truth": "loc_ans"},
        prompt_key="prompt", target_key="target_new", loc_key="locality_prompt",
    ),
    "temporal": _Format(
        {"prompt": "prompt", "target_new": "target", "subject": "subject", "ood_rephrase": "rephrase",
         "locality_prompt": "loc", "locality_ground_truth": "loc_ans"},
        prompt_key="prompt", target_key="target_new", loc_key="locality_prompt",
    ),
    "jsonl": _Format(
        {"prompt": "prompt", "target": "target", "subject": "subject", "rephrase": "rephrase", "loc": "loc", "loc_ans": "loc_ans",
         "loc_neighbour": "loc_neighbour", "loc_neighbour_ans": "loc_neighbour_ans"},
        prompt_key="prompt", target_key="target", loc_key="loc",
    ),
}
KINDS = tuple(_FORMATS)

# Keys that identify each format in a record, most specific first (temporal is hallucination + ood_rephrase).
_SIGNATURES = (
    ("zsre", {"src", "alt"}),
    ("temporal", {"prompt", "target_new", "ood_rephrase"}),
    ("hallucination", {"prompt", "target_new"}),
    ("jsonl", {"prompt", "target"}),
)


@dataclass(frozen=True)
class _Record:
    """One raw record and where it sits in its file."""

    value: Any
    index: int  # 0-based among the file's records
    line: int | None  # 1-based line, for JSONL files

    def where(self, path: Path) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{path}: record {self.index}{line}"


# ---------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    return text


def _read_jsonl(path: Path, text: str) -> list[_Record]:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}: line {line_number} (record {len(records)}) is not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        records.append(_Record(value, len(records), line_number))
    return records


def _read_json_list(path: Path, text: str) -> list[_Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; for one object per line, name the file .jsonl" if exc.msg == "Extra data" else ""
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){hint}") from None
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a JSON list of records, found a {type(value).__name__}")
    return [_Record(item, index, None) for index, item in enumerate(value)]


def _read_records(path: Path) -> list[_Record]:
    text = _read_text(path)
    records = _read_jsonl(path, text) if path.suffix == ".jsonl" else _read_json_list(path, text)
    if not records:
        raise DatasetError(f"{path}: the file holds no records")
    return records


# ---------------------------------------------------------------- formats


def _require_object(record: _Record, path: Path) -> dict[str, Any]:
    if not isinstance(record.value, dict):
        raise DatasetError(f"{record.where(path)} is a {type(record.value).__name__}, expected a JSON object")
    return record.value


def _detect(path: Path, first: _Record) -> str:
    keys = set(_require_object(first, path))
    for kind, signature in _SIGNATURES:
        if signature <= keys:
            return kind
    known = "; ".join(f"{kind} ({', '.join(sorted(signature))})" for kind, signature in _SIGNATURES)
    raise DatasetError(f"{path}: cannot tell the format from record 0's keys {sorted(keys)}; known formats: {known}")


def _check_kind(path: Path, kind: str) -> None:
    if kind != "auto" and kind not in _FORMATS:
        raise DatasetError(f"{path}: unknown dataset kind {kind!r}; known: auto, {', '.join(KINDS)}")


def detect_kind(path: str | Path) -> str:
    """The format of a dataset file (zsre | hallucination | temporal | jsonl), from its first record's keys."""
    path = Path(path)
    return _detect(path, _read_records(path)[0])


def _text(record: dict[str, Any], key: str, where: str, required: bool) -> str | None:
    """record[key] as a stripped string; None for an absent, null or blank optional field."""
    if key not in record or record[key] is None:
        if required:
            state = "missing" if key not in record else "null"
            raise DatasetError(f"{where} field {key!r} is {state}")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where} field {key!r} must be a string, found {type(value).__name__} {value!r:.60}")
    value = value.strip()
    if required and not value:
        raise DatasetError(f"{where} field {key!r} is empty")
    return value or None


def _to_request(record: _Record, path: Path, kind: str) -> EditRequest:
    fmt = _FORMATS[kind]
    fields = _require_object(record, path)
    where = record.where(path)
    values = {name: _text(fields, key, where, key in fmt.required) for key, name in fmt.fields.items()}
    return EditRequest(kind=kind, **values)


def _log_unused_keys(path: Path, first: _Record, kind: str) -> None:
    """Say which keys are ignored, so a near-miss format (e.g. rephrase_prompt) does not pass silently."""
    if isinstance(first.value, dict):
        unused = sorted(set(first.value) - set(_FORMATS[kind].fields))
        if unused:
            logger.info("%s: reading as %s; ignoring fields %s", path, kind, unused)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def _take(records: list, limit: int | None) -> list:
    _check_limit(limit)
    return records if limit is None else records[:limit]


def _check_explicit_kind(path: Path, first: _Record, kind: str) -> None:
    """A --data_type that does not fit the file is named once, not as one skipped record after another."""
    fields = _require_object(first, path)
    missing = [key for key in _FORMATS[kind].required if key not in fields]
    if missing:
        try:
            looks = f"; the file looks like {_detect(path, first)}, not {kind}"
        except DatasetError:
            looks = ""
        raise DatasetError(f"{first.where(path)} field {missing[0]!r} is missing{looks} (check the dataset kind / --data_type)")


# ---------------------------------------------------------------- public loaders


def load_edit_dataset(
    path: str | Path, kind: str = "auto", limit: int | None = None, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read an edit dataset's first `limit` editable records as EditRequests.

    kind: "auto" (from the first record's keys) or one of KINDS.
    skip_invalid: leave out, with a warning naming each, records that cannot be edited (the
    public ZsRE file has a few empty targets) instead of raising DatasetError; the records
    left out do not count towards `limit`.
    """
    path = Path(path)
    _check_kind(path, kind)
    _check_limit(limit)
    records = _read_records(path)
    if kind == "auto":
        kind = _detect(path, records[0])
    else:
        _check_explicit_kind(path, records[0], kind)
    _log_unused_keys(path, records[0], kind)
    requests, skipped = [], 0
    for record in records:
        if limit is not None and len(requests) >= limit:
            break  # the limit counts the records kept: --skip-invalid --limit 100 gives 100 edits
        try:
            requests.append(_to_request(record, path, kind))
        except DatasetError as exc:
            if not skip_invalid:
                raise DatasetError(f"{exc} (skip_invalid / --skip-invalid leaves such records out)") from None
            logger.warning("skipping %s", exc)
            skipped += 1
    if skipped and not requests:
        raise DatasetError(f"{path}: all {skipped} records were invalid")
    logger.info("%s: %d %s edit requests%s", path, len(requests), kind, f" ({skipped} invalid skipped)" if skipped else "")
    return requests


def _pool_texts(record: _Record, path: Path, kind: str) -> list[str]:
    """A record's locality prompt and edit prompt; its target is not needed and not checked."""
    fmt = _FORMATS[kind]
    fields = _require_object(record, path)
    where = record.where(path)
    texts = [_text(fields, fmt.loc_key, where, required=False), _text(fields, fmt.prompt_key, where, required=True)]
    return [t for t in texts if t]


def load_text_pool(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts for background features: the lines of a .txt file, or each record's locality and edit prompt.

    Locality prompts come first in each pair: they are the unrelated texts that background
    statistics are meant to describe.
    """
    path = Path(path)
    if path.suffix == ".txt":
        texts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    else:
        records = _read_records(path)
        kind = _detect(path, records[0])
        texts = [text for record in records for text in _pool_texts(record, path, kind)]
    if not texts:
        raise DatasetError(f"{path}: no texts found")
    texts = _take(texts, limit)
    logger.info("%s: %d texts for the background pool", path, len(texts))
    return texts


def load_locality_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The reference's irrelevant samples for background features: each record's locality prompt
    followed by its answer ("loc loc_ans"), or the lines of a .txt file."""
    path = Path(path)
    _check_limit(limit)
    if path.suffix == ".txt":
        texts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    else:
        records = _read_records(path)
        kind = _detect(path, records[0])
        fmt = _FORMATS[kind]
        answer_key = next(key for key, name in fmt.fields.items() if name == "loc_ans")
        texts = []
        for record in records:
            fields, where = _require_object(record, path), record.where(path)
            loc = _text(fields, fmt.loc_key, where, required=False)
            if loc:
                texts.append(" ".join(t for t in (loc, _text(fields, answer_key, where, required=False)) if t))
    if not texts:
        raise DatasetError(f"{path}: no locality prompts found (the background features are computed on them)")
    return _take(texts, limit)


# ---------------------------------------------------------------- tokenizer fit

UNKNOWN_SHARE_WARNING = 0.3  # above this share of <unk> prompt tokens, metrics on the data mean little


def unknown_token_share(tokenizer, texts: list[str]) -> float:
    """Share of the texts' tokens (special tokens excluded) that the tokenizer maps to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0
    total = unknown = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        total += len(ids)
        unknown += sum(1 for i in ids if i == unk)
    return unknown / total if total else 0.0


def warn_if_mostly_unknown(tokenizer, texts: list[str], data_name: str, model_name: str, sample: int = 200) -> float:
    """One warning when a data set's prompts are mostly unknown tokens for this model (e.g. real English
    through the facts model's word-level vocabulary): edits and metrics would still come out, meaning little."""
    share = unknown_token_share(tokenizer, texts[:sample])
    if share > UNKNOWN_SHARE_WARNING:
        logger.warning(
            "%s: %.0f%% of the prompt tokens are unknown (<unk>) to %s's tokenizer, so edits and metrics on this data "
            "mean little; for pipeline checks on real text build the small real-text model: "
            "memoir tiny-model --out runs/tiny-real", data_name, 100 * share, model_name,
        )
    return share
