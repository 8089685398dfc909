"""A fast slice of the quality benchmark: T=10 sequential edits on the facts model, same code.

The bars are the measured values less a margin, so that a regression fails them: Rel, Gen,
Loc and the routing rates from benchmarks/results/quality.md (T=10 row: Rel 1.0, Gen 0.9,
Loc 1.0, own-mask Rel/Gen 1.0/1.0, prompt/rephrase routed to their own edit 1.0/0.9), the
overlap diagnostics from this slice's own run (the results list them for T=1000 only).
The full run is `python benchmarks/quality.py`. Its speed (edits/min) is a benchmark result,
not a test bar.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import quality
from vllm_memoir.core import load_artifact

DATA = Path(str(quality.DEFAULT_DATA).format(size=10))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quality")


@pytest.fixture(scope="module")
def row(work):
    torch.set_num_threads(2)
    hp = quality.load_hparams(quality.DEFAULT_HPARAMS, [])
    return quality.run_size(quality.DEFAULT_MODEL, DATA, hp, work / "T10", histogram=work / "overlap.png")


def test_t10_edits_hold_and_leave_unrelated_facts_alone(row, work):
    assert row["T"] == 10
    # The job stored all ten edits, in the data's order.
    artifact = load_artifact(work / "T10")
    records = json.loads(DATA.read_text())
    assert artifact.manifest.num_edits == 10
    assert [(e.prompt, e.target) for e in artifact.edits] == [(r["src"], r["alt"]) for r in records]
    # Before editing the model answers its own facts, not the new targets.
    assert row["pre"]["rel"] <= 0.2
    assert row["rel"] >= 0.9
    assert row["loc"] >= 0.99
    # The same question about a subject no edit touched keeps its answer (measured 1.0, none routed).
    assert row["loc_neighbour"] >= 0.9
    assert row["routing"]["loc_neighbour_routed"] <= 0.1
    # Every edit's training ended with its target on top for each of its rows (recorded per edit).
    assert row["took"]["share"] == 1.0
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


def test_t10_overlap_diagnostics_are_consistent(row, work):
    overlap = row["overlap"]
    # An edit prompt always matches its own mask exactly, so its best other-edit overlap is
    # below 1 unless two edits share a mask; paraphrases overlap their own edit more than
    # unrelated prompts do on the median (the routing premise, measured).
    assert overlap["other_edit_best"]["max"] < 1.0
    assert overlap["paraphrase_own"]["median"] > overlap["unrelated_best"]["median"]
    # Measured on this slice: each paraphrase's best match is its own edit (1.0), 9 of 10 clear
    # irr_threshold 0.79 (0.9), no unrelated prompt does (1.0), and one threshold separates
    # the two completely (balanced accuracy 1.0). Bars: one prompt in ten less.
    assert overlap["paraphrase_best_is_own"] >= 0.9
    assert overlap["paraphrase_own_above_threshold"] >= 0.8
    assert overlap["unrelated_below_threshold"] >= 0.9
    assert overlap["best_balanced_accuracy"] >= 0.9
    assert (work / "overlap.png").stat().st_size > 1000  # the histogram the benchmark draws


def test_t10_with_the_default_edit_step(tmp_path):
    # The facts config without its tuned step (edit_lr 10): the adaptive default (issue 13),
    # on the reference's unprojected update (the adaptive step is not meant for a null space).
    torch.set_num_threads(2)
    hp = quality.load_hparams(quality.DEFAULT_HPARAMS, ["update_rule=adaptive", "update_projection=none"])
    assert hp.update_rule == "adaptive"
    row = quality.run_size(quality.DEFAULT_MODEL, DATA, hp, tmp_path / "T10")
    assert row["took"]["share"] == 1.0 and row["took"]["mean_steps"] <= 20
    assert row["rel"] >= 0.9 and row["own_mask"]["rel"] >= 0.9
    assert row["loc"] >= 0.99 and row["loc_neighbour"] >= 0.9


MARGIN = 0.08  # route_margin for the checks below (overlap units)


@pytest.fixture(scope="module")
def margin_sweep(row, work):
    # Threshold 0 routes every prompt to its best edit; the margin alone must then tell them apart.
    return quality.threshold_sweep(quality.DEFAULT_MODEL, work / "T10", DATA, [0.0], [0.0, MARGIN])


def test_t10_route_margin_keeps_unrelated_prompts_off_the_edits(margin_sweep):
    # Measured gaps between the best and second-best edit's overlap on this slice: edit prompts
    # 0.31-0.35, paraphrases 0.06-0.26 (0.125 and up for the nine routed at 0.79), unrelated and
    # neighbour prompts 0.00-0.06. Without a margin every one of them takes an edit.
    no_margin, margin = margin_sweep
    assert no_margin["route_margin"] == 0.0 and margin["route_margin"] == MARGIN
    assert no_margin["routing"]["loc_routed"] == 1.0 and no_margin["routing"]["loc_neighbour_routed"] == 1.0
    assert margin["routing"]["loc_routed"] <= 0.1 and margin["routing"]["loc_neighbour_routed"] <= 0.1
    assert margin["loc"] >= 0.99 and margin["loc_neighbour"] >= 0.9
    # What the margin must not take away: every edit prompt, and the paraphrases that stand out.
    assert margin["routing"]["prompt_routed_to_own_edit"] == 1.0 and margin["rel"] == no_margin["rel"]
    assert margin["routing"]["rephrase_routed_to_own_edit"] >= 0.8 and margin["gen"] >= 0.6


def test_t10_route_margin_set_for_the_job_is_stored_and_served(margin_sweep, tmp_path):
    # The hyperparameter goes into the manifest, and the artifact then routes as the rescoring
    # at that margin did (routing depends on the masks only, the same for both jobs).
    torch.set_num_threads(2)
    hp = quality.load_hparams(quality.DEFAULT_HPARAMS, ["irr_threshold=0.0", f"route_margin={MARGIN}"])
    row = quality.run_size(quality.DEFAULT_MODEL, DATA, hp, tmp_path / "T10")
    assert load_artifact(tmp_path / "T10").manifest.route_margin == MARGIN
    assert row["routing"] == margin_sweep[1]["routing"]


def test_compare_config_runs_the_reference_defaults_beside_the_config(tmp_path):
    # One command gives both settings' rows and their plot (issue 13 part 4): the reference's
    # step with the YAML's routing layout, and the YAML as given.
    import argparse

    torch.set_num_threads(2)
    args = argparse.Namespace(hparams=quality.DEFAULT_HPARAMS, set=[], reference_set=["irr_threshold=0.79"],
                              only=None, sizes="1", model=quality.DEFAULT_MODEL, data=str(quality.DEFAULT_DATA),
                              out=tmp_path, work=tmp_path / "work", threads=2, label="facts-llama", resume=False)
    data_for = lambda size: Path(str(quality.DEFAULT_DATA).format(size=size))  # noqa: E731
    quality.compare_config(args, data_for, lambda size: None)
    rows = {r["setting"]: r for r in json.loads((tmp_path / "quality_compare.json").read_text())["rows"]}
    assert sorted(rows) == ["config", "reference defaults"]
    reference, config = rows["reference defaults"]["memoir"], rows["config"]["memoir"]
    assert rows["reference defaults"]["update_rule"] == "reference" and reference["edit_lr"] == 1.0
    assert reference["irr_threshold"] == 0.79 and reference["route_margin"] == 0.0
    assert reference["update_projection"] == "none" and reference["inner_params"] == config["inner_params"]
    assert config == quality.load_hparams(quality.DEFAULT_HPARAMS, []).to_dict()
    assert all(r["T"] == 1 and r["rel"] == 1.0 for r in rows.values())
    assert (tmp_path / "quality_compare_facts-llama.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="--only 'best'"):
        quality.compare_config(argparse.Namespace(**{**vars(args), "only": "best"}), data_for, lambda size: None)


def test_resume_continues_a_stopped_run_and_times_only_its_own_edits(tmp_path):
    # A long run stopped after 4 of 10 edits (the job checkpoints), then resumed: the row is
    # the same T=10 artifact, and edits/min counts the 6 edits this run made.
    from edit_tools.datasets import load_edit_dataset
    from edit_tools.editor import run_edit_job

    torch.set_num_threads(2)
    hp = quality.load_hparams(quality.DEFAULT_HPARAMS, ["update_rule=adaptive", "update_projection=none",
                                                        "checkpoint_every=1"])
    run_edit_job(quality.DEFAULT_MODEL, load_edit_dataset(DATA), hp, tmp_path / "T10", progress=False, stop_after=4)
    row = quality.run_size(quality.DEFAULT_MODEL, DATA, hp, tmp_path / "T10", resume=True)
    assert row["T"] == 10 and row["resumed_after"] == 4
    # The rate of 6 edits, not 10 (edit_seconds is kept to the ms, so a fast run's rate is exact to ~1%).
    assert row["edits_per_minute"] == pytest.approx(60 * 6 / row["edit_seconds"], rel=0.02)
    assert load_artifact(tmp_path / "T10").manifest.num_edits == 10
    # Resuming a finished run edits nothing: no rate to report. Without --resume it starts afresh.
    again = quality.run_size(quality.DEFAULT_MODEL, DATA, hp, tmp_path / "T10", resume=True)
    assert again["resumed_after"] == 10 and again["edits_per_minute"] is None
    fresh = quality.run_size(quality.DEFAULT_MODEL, DATA, hp, tmp_path / "T10")
    assert "resumed_after" not in fresh and fresh["edits_per_minute"] > 0
