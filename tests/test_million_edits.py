"""benchmarks/million_edits.py at a small size: the code that measures 1,000,000 edits runs,
reports every number, and its stand-in workers answer EditControl as the real ones do."""

import asyncio
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import million_edits  # noqa: E402

from vllm_memoir.core import load_artifact, packed_width  # noqa: E402


def test_benchmark_reports_every_number_at_a_small_size(tmp_path):
    out = tmp_path / "million_edits.json"
    million_edits.main(["--edits", "1500", "--width", "facts", "--work", str(tmp_path / "work"),
                        "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["edits"] == 1500 and row["width"] == "facts"
    seconds = [key for key in row if key.endswith("_seconds")]
    assert {"save_seconds", "load_seconds", "records_seconds", "validate_seconds", "page_middle_seconds",
            "disable_enable_seconds", "swap_prepare_seconds", "persisted_disable_seconds"} <= set(seconds)
    assert all(row[key] >= 0 for key in seconds)
    # The tensors file holds at least the packed masks and the float32 memory.
    masks_bytes = 1500 * packed_width(1024)
    assert row["file_bytes"]["memoir"] > masks_bytes + 128 * 1024 * 4
    assert row["disk_bytes"] == sum(row["file_bytes"].values())
    assert row["load_peak_rss_bytes"] > 0 and len(row["load_average_1min"]) == 2
    assert {"persisted_enable_seconds", "persisted_disable_write_seconds"} <= set(seconds)
    assert not (tmp_path / "work" / "facts-1500").exists()  # the scratch artifact is removed


def test_stand_in_workers_page_toggle_and_swap_like_a_worker(tmp_path):
    from vllm_memoir.edit_control import EditControl

    directory = tmp_path / "a"
    million_edits.write_artifact(directory, 500, "facts")
    artifact = load_artifact(directory)
    workers = million_edits.StandInWorkers(directory, artifact)
    control = EditControl(workers)

    async def run():
        page = await control.state(250, 100)
        assert [e["edit_id"] for e in page["edits"]] == list(range(250, 350)) and page["num_edits"] == 500
        await control.set_enabled(300, False, persist=False)
        assert not bool(workers.served["router"].enabled[300]) and workers.served["records"][300].enabled is False
        assert (await control.summary())["num_enabled"] == 499
        answer = await control.set_enabled(301, False, persist=True)  # written as version 2, then served
        assert answer["persisted"]["version"] == 2
        on_disk = load_artifact(directory)
        assert [e.edit_id for e in on_disk.edits if not e.enabled] == [300, 301]
        assert (await control.summary())["version"] == 2

    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()  # the stand-in's commit freezes, as the edited layer does


def test_random_masks_have_exactly_top_k_bits_and_none_past_dim():
    from synthetic_artifact import random_masks

    from vllm_memoir.core.tophash import mask_bit_counts, unpack_bits

    masks = random_masks(9000, 1001, 100, seed=3)  # three blocks: the relabelled ones too
    assert torch.equal(mask_bit_counts(masks), torch.full((9000,), 100))
    assert not unpack_bits(masks, packed_width(1001) * 8)[:, 1001:].any()
    assert len(torch.unique(masks, dim=0)) == 9000


@pytest.mark.parametrize("dim", [1000, 1001, 1024])
def test_validation_refuses_a_bit_past_intermediate_size_without_unpacking(dim):
    from vllm_memoir.core.artifact import _bits_beyond

    masks = torch.zeros(4, packed_width(dim), dtype=torch.uint8)
    masks[0, (dim - 1) // 8] = 1 << ((dim - 1) % 8)  # the last allowed bit
    if packed_width(dim) * 8 > dim:
        masks[2, dim // 8] |= 1 << (dim % 8)  # the first bit past dim
    assert _bits_beyond(masks, dim).tolist() == [False, False, packed_width(dim) * 8 > dim, False]
