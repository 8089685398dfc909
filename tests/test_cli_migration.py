"""Coming from the MEMOIR reference: its command lines and YAML run through `memoir`, and every
mistake is refused in one line before any slow step (docs/migrating.md)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edit_tools import cli
from edit_tools.datasets import load_edit_dataset, warn_if_mostly_unknown
from edit_tools.hparams import HParamsError, MemoirHyperParams, parse_device
from edit_tools.preflight import job_device

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO / "models" / "facts-llama"  # 6 layers, down_proj input 1024: only its config.json is read here
REFERENCE_YAML = REPO / "tests" / "data" / "reference-memoir-llama3-8b.yaml"
LAYER3 = "inner_params=model.layers[3].mlp.down_proj.weight"


@pytest.fixture(scope="module")
def real_text_model(tmp_path_factory) -> Path:
    """Built by the documented command, as a user would."""
    out = tmp_path_factory.mktemp("models") / "tiny-real"
    assert cli.main(["tiny-model", "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_slow_steps(monkeypatch):
    """Fail the test if a refusal came only after the weights or the data set were read."""
    import edit_tools.datasets as datasets
    import edit_tools.hf_model as hf_model

    monkeypatch.setattr(hf_model.MemoirHFModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(datasets, "_read_records", lambda *a, **k: pytest.fail("the data set was read"))


def refusal(capsys, argv: list[str]) -> str:
    """Run `memoir ARGV`, expect exit status 2 and return the one line it printed."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors[-1] == err[-1], err
    return errors[0]


def edit_args(tmp_path: Path, model: Path = FACTS, *extra: str) -> list[str]:
    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps({"prompt": "a b", "target": "c", "loc": "d", "loc_ans": "e"}) + "\n")
    return ["edit", "--model", str(model), "--data", str(data), "--hparams_dir", str(REFERENCE_YAML),
            "--out", str(tmp_path / "out"), *extra]


# ---------------------------------------------------------------------- refusals, fast and in one line


def test_missing_model_dir_is_refused_before_torch_loads_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    argv = ["edit", "--model", "models/nope", "--data", "x.json", "--hparams", "h.yaml", "--out", str(out)]
    code = f"import sys; from edit_tools import cli; rc = cli.main({argv!r}); print(rc, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    assert done.stderr.strip() == ("memoir edit: error: --model models/nope: not a directory (does not exist; give a "
                                   "local Hugging Face model directory, this tool does not download models)")
    assert not out.exists()


def test_reference_yaml_on_a_small_model_names_key_value_and_range(tmp_path, capsys, no_slow_steps):
    line = refusal(capsys, edit_args(tmp_path))
    assert line == (f"memoir edit: error: inner_params: layer 27 is outside {FACTS}'s 6 layers (allowed: 0-5); "
                    f"set in {REFERENCE_YAML}")
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", "inner_params=model.layers[5].mlp.down_proj.weight"))
    assert line.startswith(f"memoir edit: error: top_k: 4096 is more than the 1024 inputs of {FACTS}'s down_proj "
                           "(allowed: 1-1024)"), line
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", LAYER3, "--top-k", "0"))
    assert line == "memoir edit: error: top_k: 0 is below 1 (allowed: an integer >= 1); set by --top-k"
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", LAYER3, "--irr_threshold", "1.5"))
    assert line == "memoir edit: error: irr_threshold: 1.5 is out of range (allowed: 0 to 1); set by --irr_threshold"
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", LAYER3, "--set", "device=gpu"))
    assert "device: 'gpu' is not a device (allowed: a GPU index like 0, cpu, cuda, cuda:N); set by --set device" in line
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", LAYER3, "--edit_lr=0"))
    assert "edit_lr: 0 is out of range (allowed: > 0); set by --edit_lr" in line
    assert not (tmp_path / "out").exists()


def test_pt_background_file_is_refused_with_the_convert_command(tmp_path, capsys, no_slow_steps):
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", LAYER3, "--top_k", "256", "--set", "device=cpu"))
    pt = "./background_features/llama3_background_features.pt"
    twin = "./background_features/llama3_background_features.safetensors"
    assert f"run `memoir convert {pt} {twin}` and set dir_background_features: {twin}" in line, line
    assert not (tmp_path / "out").exists()


def test_unknown_keys_and_flags_get_close_matches(tmp_path, capsys, no_slow_steps):
    line = refusal(capsys, edit_args(tmp_path, FACTS, "--set", "edit_rate=3"))
    assert line == "memoir edit: error: --set edit_rate: unknown hyperparameter 'edit_rate'; did you mean edit_lr?"
    with pytest.raises(SystemExit) as info:
        cli.main(edit_args(tmp_path, FACTS, "--tpo_k=3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "unrecognized argument: --tpo_k=3 (did you mean --top_k?)" in err[0]
    for bad, message in [("--editing_method=WISE", "'WISE': this tool runs MEMOIR only (allowed: MEMOIR)"),
                         ("--data_type=counterfact", "'counterfact' is not supported (allowed: ZsRE, hallucination, temporal)")]:
        with pytest.raises(SystemExit):
            cli.main(edit_args(tmp_path, FACTS, bad))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_device_values_map_to_torch_devices_and_fall_back_to_cpu(monkeypatch, caplog):
    assert [parse_device(v) for v in (0, 3, "0", "cpu", "cuda", "cuda:1", "CUDA:2")] == [
        "cuda:0", "cuda:3", "cuda:0", "cpu", "cuda", "cuda:1", "cuda:2"]
    for bad in ("gpu", -1, True, 1.5, "cuda:x"):
        with pytest.raises(HParamsError, match=r"^device: .* \(allowed: a GPU index like 0, cpu, cuda, cuda:N\)$"):
            parse_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hp = MemoirHyperParams.from_yaml(REFERENCE_YAML)
    with caplog.at_level(logging.WARNING):
        assert job_device(hp) == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "device: 0 asks for CUDA" in warnings[0] and "running on the CPU" in warnings[0]


# ---------------------------------------------------------------------- data sets


def test_skip_invalid_limit_counts_the_records_kept(tmp_path, shared_data):
    rows = [{"prompt": f"p{i}", "target": "" if i in (1, 2, 4) else f"t{i}"} for i in range(8)]
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r.prompt for r in load_edit_dataset(path, limit=3, skip_invalid=True)] == ["p0", "p3", "p5"]
    # The shared ZsRE file's record 54 has an empty target: 100 asked, 100 given.
    requests = load_edit_dataset(shared_data / "zsre_mend_eval_head.json", limit=100, skip_invalid=True)
    assert len(requests) == 100 and requests[-1].prompt == json.loads(
        (shared_data / "zsre_mend_eval_head.json").read_text())[100]["src"]


def test_mostly_unknown_prompts_warn_once(real_text_model, caplog):
    from transformers import AutoTokenizer

    prompts = ["What university did Watts Humphrey attend?"]
    with caplog.at_level(logging.WARNING):
        share = warn_if_mostly_unknown(AutoTokenizer.from_pretrained(FACTS), prompts, "zsre.json", "models/facts-llama")
        real = warn_if_mostly_unknown(AutoTokenizer.from_pretrained(real_text_model), prompts, "zsre.json", "tiny-real")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert share > 0.5 and real == 0.0
    assert len(warnings) == 1, warnings
    assert f"zsre.json: {100 * share:.0f}% of the prompt tokens are unknown" in warnings[0]
    assert "models/facts-llama" in warnings[0] and "memoir tiny-model --out runs/tiny-real" in warnings[0]


def test_tiny_model_command_builds_a_real_text_model(real_text_model, tmp_path, capsys):
    config = json.loads((real_text_model / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["intermediate_size"] == 512
    (tmp_path / "notes.txt").write_text("mine")
    line = refusal(capsys, ["tiny-model", "--out", str(tmp_path)])
    assert "exists and holds other files" in line and (tmp_path / "notes.txt").read_text() == "mine"


def test_data_dir_and_data_type_find_the_reference_file(tmp_path):
    (tmp_path / "hallucination").mkdir()
    target = tmp_path / "hallucination" / "hallucination-edit.json"
    target.write_text("[]")
    assert cli._resolve_data(str(tmp_path), "hallucination") == target
    with pytest.raises(cli.UsageError, match=r"has no zsre_mend_edit\.json \(looked for .*ZsRE/zsre_mend_edit\.json"):
        cli._resolve_data(str(tmp_path), "zsre")


def test_a_failed_job_removes_only_the_output_directory_it_made(tmp_path, monkeypatch, tiny_model_dir, words_dataset):
    import edit_tools.editor as editor

    def broken(*_a, **_k):
        raise OSError("weights unreadable")

    monkeypatch.setattr(editor.MemoirHFModel, "from_pretrained", broken)
    hp = MemoirHyperParams(inner_params=["model.layers[1].mlp.down_proj.weight"], top_k=64)
    with pytest.raises(OSError):
        editor.run_edit_job(tiny_model_dir, words_dataset, hp, tmp_path / "new", limit=1, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(OSError):
        editor.run_edit_job(tiny_model_dir, words_dataset, hp, tmp_path / "mine", limit=1, progress=False)
    assert (tmp_path / "mine").is_dir()


# ---------------------------------------------------------------------- the reference's three commands


def reference_command(model: Path, data: Path, data_type: str, *extra: str) -> list[str]:
    """The reference's flags as its README spells them, plus what fits them to the small model."""
    return ["edit", "--editing_method=MEMOIR", f"--hparams_dir={REFERENCE_YAML}", "--model", str(model),
            f"--data_dir={data}", f"--data_type={data_type}", "--sequential_edit", "--set", LAYER3, *extra]


def test_reference_commands_run(real_text_model, shared_data, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from vllm_memoir.core import load_artifact

    zsre = shared_data / "zsre_mend_eval_head.json"
    # 3. --RUN_SAVE_BACKGROUND_FEATURES=True: the background job, saved as safetensors beside the .pt name; no edit.
    pt_name = tmp_path / "bg" / "features.pt"
    assert cli.main(reference_command(real_text_model, zsre, "ZsRE", "--ds_size=20", "--RUN_SAVE_BACKGROUND_FEATURES=True",
                                      f"--set=dir_to_save_background_features={pt_name}")) == 0
    saved = pt_name.with_suffix(".safetensors")
    assert load_file(str(saved))["background_mean"].shape == (512,) and not pt_name.exists()
    assert "no edits were made" in capsys.readouterr().out

    # 1. ZsRE, --top_k / --irr_threshold on the command line, a real (short) edit.
    out = tmp_path / "zsre"
    assert cli.main(reference_command(real_text_model, zsre, "ZsRE", "--ds_size=2", "--top_k=128", "--irr_threshold=0.4",
                                      "--n_iter=3", "--set", f"dir_background_features={saved}", "--out", str(out),
                                      "--no-progress")) == 0
    manifest = load_artifact(out).manifest
    assert manifest.num_edits == 2 and manifest.top_k == 128 and manifest.irr_threshold == 0.4
    assert manifest.hparams["memoir"]["device"] == 0 and manifest.hparams["memoir"]["n_iter"] == 3

    # 2. hallucination, --irr_threshold=0.9: everything up to the edit loop.
    import edit_tools.editor as editor

    seen = {}

    def fake_job(model, requests, hp, out_dir, **kwargs):
        seen.update(requests=requests, hp=hp, device=kwargs["device"])
        return SimpleNamespace(manifest=SimpleNamespace(num_edits=len(requests), version=1))

    monkeypatch.setattr(editor, "run_edit_job", fake_job)
    assert cli.main(reference_command(real_text_model, shared_data / "hallucination-edit.json", "hallucination",
                                      "--ds_size=3", "--top_k=128", "--irr_threshold=0.9", "--set",
                                      f"dir_background_features={saved}", "--out", str(tmp_path / "h"))) == 0
    assert seen["hp"].irr_threshold == 0.9 and seen["hp"].top_k == 128 and seen["device"] in ("cpu", "cuda:0")
    assert [r.kind for r in seen["requests"]] == ["hallucination"] * 3


def test_run_save_in_the_yaml_is_honoured(real_text_model, shared_data, tmp_path, monkeypatch, capsys):
    import edit_tools.background as background

    calls = []
    monkeypatch.setattr(background, "save_background_features", lambda *a, **k: calls.append((a, k)))
    yaml_path = tmp_path / "hp.yaml"
    yaml_path.write_text(REFERENCE_YAML.read_text().replace("RUN_SAVE_BACKGROUND_FEATURES: False",
                                                            "RUN_SAVE_BACKGROUND_FEATURES: True"))
    argv = ["edit", "--model", str(real_text_model), "--data", str(shared_data / "hallucination-train.json"),
            "--hparams", str(yaml_path), "--set", LAYER3, "--ds_size", "7"]  # no --out: nothing is edited
    assert cli.main(argv) == 0
    (model, module_path, texts, out), _ = calls[0]
    assert module_path == "model.layers.3.mlp.down_proj" and len(texts) == 7
    assert out == Path("./background_features/llama3_background_features_new.safetensors")
    first = json.loads((shared_data / "hallucination-train.json").read_text())[0]
    assert texts[0] == f"{first['locality_prompt'].strip()} {first['locality_ground_truth'].strip()}"
    # Without the mode, --out is required, and refused before anything is read.
    line = refusal(capsys, argv[:5] + ["--hparams", str(REFERENCE_YAML), "--set", LAYER3])
    assert "--out is required" in line


def test_convert_averages_the_rows_the_reference_uses(tmp_path, capsys):
    from safetensors.torch import load_file

    features = torch.randn(150, 8)
    torch.save(features, tmp_path / "features.pt")
    assert cli.main(["convert", str(tmp_path / "features.pt"), str(tmp_path / "features.safetensors")]) == 0
    mean = load_file(str(tmp_path / "features.safetensors"))["background_mean"]
    assert torch.allclose(mean, features[:100].mean(0)) and not torch.allclose(mean, features.mean(0))
