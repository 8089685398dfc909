"""Shared fixtures: small models built on the spot, the shared reference datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from edit_tools.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def words_dataset(tmp_path_factory) -> Path:
    from edit_tools.tiny_models import build_words_dataset

    return build_words_dataset(tmp_path_factory.mktemp("data") / "edits.jsonl", count=12)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a BPE tokenizer fitted to the shared datasets' text (no unknown tokens)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    import json

    from edit_tools.tiny_models import build_bpe_tokenizer, build_tiny_llama

    texts = []
    for record in json.loads((SHARED_DATA / "zsre_mend_eval_head.json").read_text()):
        texts += [record["src"], record["rephrase"], record["alt"], record["loc"], record["loc_ans"]]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-bpe"), tokenizer=build_bpe_tokenizer(texts))
