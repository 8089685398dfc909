"""Everything but the matching at 1,000,000 stored edits: artifact, records, admin calls.

For each width (the facts model's, intermediate 1024 / top_k 384 / hidden 128, and
Llama-3-8B's, 14336 / 4096 / 4096) it writes a synthetic artifact of N edits (random masks
with exactly top_k bits, random memory: the costs depend on the shapes, not on what the
edits say; benchmarks/synthetic_artifact.py) and measures:

  save      save_artifact: time and the files' size on disk;
  load      load_artifact in a fresh process (checksums, tensors, edit records, validation),
            each part timed, and the process's peak RSS above its RSS before the load;
  records   the edit records' memory (RSS growth while reading them) and what the garbage
            collector pays for them: a full collection with them alive, and gc.freeze();
  admin     EditControl (the API server's side of the admin routes) against an in-process
            stand-in of the workers that serves the artifact the way a worker does (the columnar
            records, edit ids by row, the id -> row lookup, an EditRouter, the worker's listing
            function): `GET /memoir/edits` pages and the whole list (asked in chunks, as the
            server does), disable/enable (in memory and persisted), and a live swap's prepare
            (load and stage on a loader thread) and commit. No vLLM engine: its pause is a no-op.

Matching cost at 1,000,000 edits is benchmarks/routing_cost.py's.

    python benchmarks/million_edits.py [--edits 1000000] [--width facts --width llama]
        [--work /tmp/million-edits] [--json benchmarks/results/million_edits.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, when run as a script
from report_paths import command_line  # noqa: E402
from synthetic_artifact import random_masks  # noqa: E402

from vllm_memoir.core import ArtifactManifest, EditRecord, MemoirArtifact, load_artifact, save_artifact  # noqa: E402
from vllm_memoir.core import artifact as artifact_module  # noqa: E402
from vllm_memoir.core.edit_records import EditRecords  # noqa: E402
from vllm_memoir.core.routing import EditRouter  # noqa: E402

# name: (hidden_size, intermediate_size, top_k)
WIDTHS = {"facts": (128, 1024, 384), "llama": (4096, 14336, 4096)}
PAGE = 100


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_records(count: int) -> list[EditRecord]:
    """Records shaped like the facts data's (a ~45-character prompt, a short target, a rephrase)."""
    return [EditRecord(edit_id=i, prompt=f"synthetic subject {i:07d} calls which city home ?",
                       target=f"city {i % 977}", rephrase=f"synthetic subject {i:07d} is a resident of",
                       subject=f"synthetic subject {i:07d}") for i in range(count)]


def write_artifact(directory: Path, count: int, width: str, seed: int = 0) -> dict:
    """A synthetic artifact of `count` edits; returns the save's time and size on disk."""
    hidden, dim, top_k = WIDTHS[width]
    generator = torch.Generator().manual_seed(seed)
    manifest = ArtifactManifest(
        base_model="synthetic", base_fingerprint="0" * 64, module_path="model.layers.5.mlp.down_proj",
        layer_index=5, hidden_size=hidden, intermediate_size=dim, dtype="float32", top_k=top_k,
        irr_threshold=0.79, aggregation="mean_decentered", hparams={"synthetic_edits": count},
    )
    started = time.perf_counter()
    artifact = MemoirArtifact(manifest=manifest, memory=torch.randn(hidden, dim, generator=generator) * 1e-3,
                              masks=random_masks(count, dim, top_k, seed),
                              permutation=torch.randperm(dim, generator=generator),
                              background_mean=torch.randn(dim, generator=generator), edits=synthetic_records(count))
    built = time.perf_counter() - started
    started = time.perf_counter()
    save_artifact(artifact, directory)
    saved = time.perf_counter() - started
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    return {"build_seconds": built, "save_seconds": saved, "disk_bytes": sum(files.values()),
            "file_bytes": {name.split("-")[0] if "-" in name else name: size for name, size in files.items()}}


# --- the fresh process that loads and serves the artifact ---------------------------------------

def timed(call, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - started, result


def load_parts(directory: Path) -> dict:
    """load_artifact's parts, each timed alone (the private steps load_artifact runs; it hashes
    the tensors file on a thread while it does the rest, so its time is less than their sum)."""
    manifest = artifact_module.read_manifest(directory)
    tensors_name = next(n for n in manifest.files if n.endswith(".safetensors"))
    edits_name = next(n for n in manifest.files if n.endswith(".jsonl"))
    out = {}
    out["checksum_seconds"], _ = timed(lambda: [artifact_module._sha256(directory / n) for n in manifest.files])
    out["tensors_seconds"], tensors = timed(artifact_module._read_tensors, directory / tensors_name)
    rss = rss_bytes()
    out["records_seconds"], edits = timed(artifact_module._read_edits, directory / edits_name)
    out["records_rss_bytes"] = rss_bytes() - rss
    artifact = MemoirArtifact(manifest=manifest, memory=tensors["memory"], masks=tensors["masks"],
                              permutation=tensors["permutation"], background_mean=tensors.get("background_mean"),
                              edits=edits)
    out["validate_seconds"], _ = timed(artifact_module.validate_artifact, artifact, "bench")
    return out


class StandInWorkers:
    """The engine client EditControl drives, with one rank serving an artifact the way a worker's
    LiveEdits and edited layer do (the same answers), minus the model: records, edit ids by row,
    {edit_id: row}, an EditRouter; loads run on a loader thread."""

    def __init__(self, path: Path, artifact: MemoirArtifact):
        # Imported here, after the load and collector measurements: it imports vLLM (~0.4 GB).
        from vllm_memoir import live_edits

        self.live_edits = live_edits
        self.path, self.served, self.staged = path, self.stage(artifact), None
        self.loading: asyncio.Future | None = None

    @staticmethod
    def stage(artifact: MemoirArtifact) -> dict:
        # As MemoirDownProj.stage: the columnar records, ids by row and the id -> row lookup.
        records = EditRecords.of(artifact.edits)
        return {"manifest": artifact.manifest, "records": records, "edit_ids": records.ids_by_row(),
                "rows": records.rows_by_id(), "router": EditRouter(artifact)}

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[dict]:
        try:
            return [{"ok": True, **(getattr(self, method)(*args) or {})}]
        except KeyError as exc:
            return [{"ok": False, "kind": "unknown_edit", "error": f"no edit with id {exc.args[0]}"}]
        except ValueError as exc:  # LiveEditError, ArtifactError: as the worker extension answers them
            return [{"ok": False, "kind": "refused", "error": str(exc)}]

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        return None

    async def resume_generation(self) -> None:
        return None

    def memoir_state(self, with_edits: bool = True, offset: int = 0, limit: int | None = None) -> dict:
        served = self.served
        manifest, records = served["manifest"], served["records"]
        state = {"path": str(self.path), "version": manifest.version, "num_edits": len(records),
                 "num_enabled": records.num_enabled, "tp_rank": 0}
        if with_edits:
            end = len(records) if limit is None else offset + limit
            state["offset"] = offset
            state["edits"] = self.live_edits.listed_edits(records, offset, end, {})  # what a worker lists
        return state

    def memoir_prepare(self, path: str, version: int) -> dict:
        self.loading = asyncio.get_running_loop().run_in_executor(None, lambda: self.stage(load_artifact(path)))
        return {"loading": True}

    def memoir_prepared(self) -> dict:
        if not self.loading.done():
            return {"ready": False}
        self.staged, self.loading = self.loading.result(), None
        return {"ready": True, "version": self.staged["manifest"].version}

    def memoir_commit(self, version: int) -> dict:
        self.served, self.staged = self.staged, None
        gc.freeze()  # as the edited layer does on every swap
        return self.memoir_state(with_edits=False)

    def memoir_abort(self) -> dict:
        self.staged = None
        return {}

    def memoir_set_enabled(self, edit_id: int, enabled: bool) -> dict:
        row = self.served["rows"][edit_id]
        self.served["router"].enabled[row] = enabled
        self.served["records"].set_enabled(row, enabled)
        return {"edit_id": edit_id, "enabled": enabled}

    def memoir_flags(self, edit_id: int) -> dict:
        self.served["rows"][edit_id]  # KeyError: not served
        return self.live_edits.served_flags(self.path, self.served["manifest"], self.served["records"])

    def memoir_adopt_flags(self, previous_version: int, manifest: dict, edit_id: int, enabled: bool) -> dict:
        written = self.live_edits.flags_version(self.served["manifest"], previous_version, manifest)
        self.memoir_set_enabled(edit_id, enabled)
        self.served["manifest"] = written
        return self.memoir_state(with_edits=False)


async def admin_costs(directory: Path, artifact: MemoirArtifact, repeats: int, persist: bool) -> dict:
    from vllm_memoir.edit_control import EditControl

    workers = StandInWorkers(directory, artifact)
    control = EditControl(workers)
    count = artifact.manifest.num_edits

    async def seconds(make_call, times: int = repeats) -> float:
        runs = []
        for _ in range(times):
            started = time.perf_counter()
            await make_call()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    out = {"page_size": PAGE}
    for name, offset in (("first", 0), ("middle", count // 2), ("last", max(count - PAGE, 0))):
        out[f"page_{name}_seconds"] = await seconds(lambda: control.state(offset, PAGE))
    out["page_all_seconds"] = await seconds(lambda: control.state(0, None), 1)
    out["summary_seconds"] = await seconds(control.summary)
    middle = count // 2

    async def toggle():
        await control.set_enabled(middle, False, persist=False)
        await control.set_enabled(middle, True, persist=False)
    out["disable_enable_seconds"] = await seconds(toggle) / 2
    prepared = None

    async def prepare():
        nonlocal prepared
        prepared = await control.prepare_swap(directory)
    out["swap_prepare_seconds"] = await seconds(prepare, 1)
    commit = await control.commit_swap(prepared)
    out["swap_commit_seconds"] = commit["commit_seconds"]
    if persist:  # a new version with the same tensors file: the records written, the flag flipped
        for action, enabled in (("disable", False), ("enable", True)):
            answers = []

            async def persisted():
                answers.append(await control.set_enabled(middle, enabled, persist=True))
            out[f"persisted_{action}_seconds"] = await seconds(persisted, 1)
            out[f"persisted_{action}_write_seconds"] = answers[0]["persisted"]["write_seconds"]
    return out


def child(directory: Path, repeats: int, persist: bool) -> dict:
    """Runs in a fresh process: load, records, garbage collector, admin calls."""
    gc.collect()
    base_rss = rss_bytes()
    out = {"rss_before_load_bytes": base_rss}
    out["load_seconds"], artifact = timed(load_artifact, directory)
    out["load_peak_rss_bytes"] = peak_rss_bytes() - base_rss
    out["loaded_rss_bytes"] = rss_bytes() - base_rss
    out["gc_full_collection_seconds"], _ = timed(gc.collect)
    out["gc_freeze_seconds"], _ = timed(gc.freeze)
    gc.unfreeze()
    out.update(asyncio.run(admin_costs(directory, artifact, repeats, persist)))
    del artifact
    gc.collect()
    out.update(load_parts(directory))
    return out


def measure(count: int, width: str, work: Path, repeats: int, persist: bool) -> dict:
    directory = work / f"{width}-{count}"
    shutil.rmtree(directory, ignore_errors=True)
    hidden, dim, top_k = WIDTHS[width]
    row = {"width": width, "edits": count, "hidden": hidden, "intermediate": dim, "top_k": top_k}
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how to read the times
    row.update(write_artifact(directory, count, width))
    gc.collect()
    command = [sys.executable, __file__, "--child", str(directory), "--repeats", str(repeats)]
    if persist:
        command.append("--persist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    row["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # at start, at end
    shutil.rmtree(directory, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=1_000_000)
    parser.add_argument("--width", action="append", choices=sorted(WIDTHS), help="repeatable (default: both)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/million-edits"), help="scratch artifact directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-persist", action="store_true", help="skip the persisted disable and enable")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--persist", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child is not None:
        print(json.dumps(child(args.child, args.repeats, args.persist)))
        return
    rows = []
    for width in args.width or ["facts", "llama"]:
        row = measure(args.edits, width, args.work, args.repeats, not args.no_persist)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.json:
        report = {"command": command_line("benchmarks/million_edits.py", sys.argv[1:] if argv is None else argv),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other sessions",
                  "torch_threads": 1, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
