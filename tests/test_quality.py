"""A fast slice of the quality benchmark: T=10 sequential edits on the facts model, same code.

The bars are the measured values with margin (benchmarks/results/quality.md); the full run is
`python benchmarks/quality.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    torch.set_num_threads(2)
    hp = quality.load_hparams(quality.DEFAULT_HPARAMS, [])
    work = tmp_path_factory.mktemp("quality")
    return quality.run_size(quality.DEFAULT_MODEL, Path(str(quality.DEFAULT_DATA).format(size=10)), hp,
                            work / "T10", histogram=work / "overlap.png")


def test_t10_edits_hold_and_leave_unrelated_facts_alone(row):
    assert row["T"] == 10
    # Before editing the model answers its own facts, not the new targets.
    assert row["pre"]["rel"] <= 0.2
    assert row["rel"] >= 0.9
    assert row["loc"] >= 0.99
    assert row["routing"]["prompt_routed_to_own_edit"] >= 0.9
    # With its own mask forced, the memory answers the edit prompt: the edits are stored.
    assert row["own_mask"]["rel"] >= 0.9


def test_t10_paraphrases_reach_their_edit(row):
    # Measured: Gen 0.9 routed, 1.0 with the own mask forced, rephrases routed to their own
    # edit 0.9; a paraphrase that is not routed keeps the old answer.
    assert row["pre"]["gen"] <= 0.2
    assert row["gen"] >= 0.6
    assert row["own_mask"]["gen"] >= 0.8
    assert row["routing"]["rephrase_routed_to_own_edit"] >= 0.6


def test_t10_overlap_diagnostics_are_consistent(row, tmp_path_factory):
    overlap = row["overlap"]
    # An edit prompt always matches its own mask exactly, so its best other-edit overlap is
    # below 1 unless two edits share a mask; paraphrases overlap their own edit more than
    # unrelated prompts do on the median (the routing premise, measured).
    assert overlap["other_edit_best"]["max"] < 1.0
    assert overlap["paraphrase_own"]["median"] > overlap["unrelated_best"]["median"]
    assert 0.5 <= overlap["best_balanced_accuracy"] <= 1.0
    assert row["edits_per_minute"] > 0
