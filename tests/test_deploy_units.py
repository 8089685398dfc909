"""Deployment pieces without a server: hf-overrides, the artifact pin, the Ray Serve LLM config, deploy scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_memoir.core import ArtifactManifest
from vllm_memoir.engine_requirements import artifact_pin, memoir_architecture, memoir_hf_overrides, routing_flags
from vllm_memoir.plugin import ARCHITECTURES
from vllm_memoir.engine_requirements import V1_TRACKER
from vllm_memoir.validation import MemoirConfigError, artifact_sha256, check_expected_artifact
from vllm_memoir.engine_requirements import ROUTING_FLAGS, routing_flags_for

REPO = Path(__file__).resolve().parents[1]
SHA = "ab" * 32


def manifest(version=3) -> ArtifactManifest:
    return ArtifactManifest("tiny", "f" * 64, "model.layers.1.mlp.down_proj", 1, 16, 64, "float32", 8, 0.5, "mean",
                            num_edits=2, version=version,
                            files={f"memoir-v{version}.safetensors": SHA, f"edits-v{version}.jsonl": "cd" * 32})


def model_dir(tmp_path, architecture: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return tmp_path


# --- the artifact pin --------------------------------------------------------------------------

def test_no_pin_accepts_any_artifact():
    check_expected_artifact(manifest(), SimpleNamespace(), Path("art"))


def test_matching_pin_is_accepted():
    pin = SimpleNamespace(memoir_expected_version=3, memoir_expected_sha256=SHA[:12].upper())
    check_expected_artifact(manifest(), pin, Path("art"))
    assert artifact_sha256(manifest()) == SHA


@pytest.mark.parametrize("pin, message", [
    ({"memoir_expected_version": 2}, "artifact version 3 != the deployment's memoir_expected_version 2"),
    ({"memoir_expected_version": "two"}, "must be an integer"),
    ({"memoir_expected_sha256": "cd" * 32}, "does not match the deployment's memoir_expected_sha256"),
    ({"memoir_expected_sha256": "abab"}, "at least 12 hex digits"),
])
def test_replica_refuses_an_artifact_other_than_the_pinned_one(pin, message):
    with pytest.raises(MemoirConfigError, match=message):
        check_expected_artifact(manifest(), SimpleNamespace(**pin), Path("art"))


# --- hf-overrides ------------------------------------------------------------------------------

@pytest.mark.parametrize("base, memoir", [("LlamaForCausalLM", "MemoirLlamaForCausalLM"),
                                          ("MistralForCausalLM", "MemoirMistralForCausalLM"),
                                          ("Qwen2ForCausalLM", "MemoirQwen2ForCausalLM"),
                                          ("MemoirLlamaForCausalLM", "MemoirLlamaForCausalLM")])
def test_memoir_class_is_picked_from_config_json(tmp_path, base, memoir):
    assert memoir_architecture(model_dir(tmp_path, base)) == memoir
    assert memoir in ARCHITECTURES


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(MemoirConfigError, match="GPT2LMHeadModel.*no MEMOIR class"):
        memoir_architecture(model_dir(tmp_path, "GPT2LMHeadModel"))
    with pytest.raises(MemoirConfigError, match="config.json: missing"):
        memoir_architecture(tmp_path / "absent")


def test_overrides_carry_an_absolute_artifact_path_and_the_pin(tiny_model_dir, words_dataset, tmp_path, monkeypatch):
    from edit_tools.editor import run_edit_job
    from edit_tools.hparams import MemoirHyperParams
    from vllm_memoir.core import read_manifest

    hp = MemoirHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"], top_k=128, n_iter=2).validate()
    run_edit_job(tiny_model_dir, words_dataset, hp, tmp_path / "art", limit=1, progress=False)
    monkeypatch.chdir(tmp_path)
    overrides = memoir_hf_overrides(tiny_model_dir, "art", pin=True)
    expected = read_manifest(tmp_path / "art")
    assert overrides == {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": str(tmp_path / "art"),
                         "memoir_expected_version": expected.version,
                         "memoir_expected_sha256": artifact_sha256(expected)}
    assert artifact_pin(tmp_path / "art")["memoir_expected_version"] == 1
    # and as the launch script calls it
    out = subprocess.run([sys.executable, "-m", "vllm_memoir.hf_overrides", str(tiny_model_dir), "art"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": str(tmp_path / "art")}
    # layer 2 of the tiny model's 4: prefix caching and chunked prefill must be off
    flags = subprocess.run([sys.executable, "-m", "vllm_memoir.hf_overrides", str(tiny_model_dir), "art",
                            "--routing-flags"], capture_output=True, text=True, check=True)
    assert flags.stdout.split() == ROUTING_FLAGS
    assert routing_flags(tiny_model_dir, "art") == ROUTING_FLAGS
    assert routing_flags_for(3, 4) == []  # at the last layer: vLLM's defaults


# --- Ray Serve LLM config ----------------------------------------------------------------------

def test_engine_kwargs_carry_what_routing_needs(tiny_model_dir, tmp_path, monkeypatch):
    from vllm_memoir import ray_app

    monkeypatch.setattr(ray_app, "memoir_hf_overrides", lambda model, artifact, pin: {"memoir_path": str(artifact)})
    monkeypatch.setattr(ray_app, "routing_flags", lambda model, artifact: ROUTING_FLAGS if artifact == "art" else [])
    cpu = ray_app.memoir_engine_kwargs(tiny_model_dir, "art", accelerator="cpu", env_vars={},
                                       engine_kwargs={"max_model_len": 64, "logits_processors": ["a:B"]})
    assert cpu["enable_prefix_caching"] is False and cpu["enable_chunked_prefill"] is False
    last_layer = ray_app.memoir_engine_kwargs(tiny_model_dir, "last-layer-art", accelerator="cpu", env_vars={})
    assert "enable_prefix_caching" not in last_layer and "enable_chunked_prefill" not in last_layer  # vLLM's defaults
    assert cpu["logits_processors"] == [V1_TRACKER, "a:B"] and cpu["max_model_len"] == 64
    gpu = ray_app.memoir_engine_kwargs(tiny_model_dir, "art", accelerator="gpu", env_vars={}, tensor_parallel_size=2)
    assert "logits_processors" not in gpu  # Model Runner V2 gets routes from the model class
    assert gpu["compilation_config"] == {"cudagraph_mode": "PIECEWISE"} and gpu["tensor_parallel_size"] == 2
    v1_gpu = ray_app.memoir_engine_kwargs(tiny_model_dir, "art", accelerator="gpu",
                                          env_vars={"VLLM_USE_V2_MODEL_RUNNER": "0"})
    assert v1_gpu["logits_processors"] == [V1_TRACKER]
    with pytest.raises(MemoirConfigError, match=r"must not set \['enable_prefix_caching'\]"):
        ray_app.memoir_engine_kwargs(tiny_model_dir, "art", accelerator="cpu", env_vars={},
                                     engine_kwargs={"enable_prefix_caching": True})


def test_llm_config_passes_engine_kwargs_to_vllm_unchanged(tmp_path):
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    from edit_tools.tiny_models import build_tiny_llama
    from vllm_memoir.ray_app import memoir_llm_config

    model = build_tiny_llama(tmp_path / "model")
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({**manifest().__dict__, "format_version": 1}))
    config = memoir_llm_config(model, art, model_id="tiny", num_replicas=2, dtype="float32",
                               engine_kwargs={"max_model_len": 128})
    engine = config.get_engine_config().get_initialization_kwargs()
    assert engine["hf_overrides"] == {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": str(art),
                                      "memoir_expected_version": 3, "memoir_expected_sha256": SHA}
    assert engine["distributed_executor_backend"] == "mp"  # Ray Serve LLM's choice on CPU nodes
    assert engine["logits_processors"] == [V1_TRACKER] and engine["model"] == str(model)
    assert config.deployment_config["num_replicas"] == 2
    assert config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]


def test_ray_serve_yaml_names_the_builder_and_its_arguments():
    import yaml

    from vllm_memoir import ray_app

    config = yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "vllm_memoir.ray_app:build_app"
    import inspect

    accepted = set(inspect.signature(ray_app.memoir_llm_config).parameters) | {"model", "artifact"}
    assert set(app["args"]) <= accepted, set(app["args"]) - accepted


def test_admin_yaml_builds_live_edit_replicas_and_refuses_a_pin(tmp_path):
    """admin: true -> replicas of MemoirLLMServer with MEMOIR's worker extension, unpinned."""
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    import yaml

    from edit_tools.tiny_models import build_tiny_llama
    from vllm_memoir.edit_control import EXTENSION
    from vllm_memoir.ray_app import memoir_llm_config
    from vllm_memoir.ray_live_edits import INGRESS_ENDPOINTS, MemoirLLMServer

    (app,) = yaml.safe_load((REPO / "deploy" / "ray-serve-admin.yaml").read_text())["applications"]
    args = dict(app["args"])
    assert args["admin"] is True and "pin_artifact" not in args
    model, artifact = build_tiny_llama(tmp_path / "model"), fake_artifact(tmp_path)
    config = memoir_llm_config(model, artifact, **{k: v for k, v in args.items() if k not in ("model", "artifact")})
    engine = config.get_engine_config().get_initialization_kwargs()
    assert config.server_cls is MemoirLLMServer and engine["worker_extension_cls"] == EXTENSION
    assert "memoir_expected_version" not in engine["hf_overrides"]
    assert {"completions", "chat", "memoir_edits", "memoir_swap", "memoir_disable", "memoir_enable"} <= set(
        INGRESS_ENDPOINTS)
    with pytest.raises(MemoirConfigError, match="admin .*needs pin_artifact: false"):
        memoir_llm_config(model, artifact, admin=True, pin_artifact=True)


def test_replicated_swap_is_two_phase():
    """One replica refuses the new version: every replica drops what it loaded, none commits."""
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    import asyncio

    from vllm_memoir.edit_control import EditControlError
    from vllm_memoir.ray_live_edits import ReplicatedEditControl

    calls: list[str] = []

    def broadcast_with(prepare_answers):
        async def broadcast(method, kwargs):
            calls.append(method)
            if method == "memoir_prepare":
                return prepare_answers
            if method == "memoir_state":
                return [{"ok": True, "version": 1}] * 2
            if method == "memoir_commit":
                return [{"ok": True, "path": "/a", "version": 2, "num_edits": 5, "load_seconds": 0.1,
                         "drain_seconds": 0.0, "commit_seconds": 0.0, "paused_seconds": 0.0}] * 2
            return [{"ok": True}] * 2
        return broadcast

    refused = [{"ok": True, "version": 2}, {"ok": False, "status": 422, "error": "checksum mismatch in x"}]
    with pytest.raises(EditControlError, match="replica 1 of 2: checksum mismatch") as err:
        asyncio.run(ReplicatedEditControl(broadcast_with(refused)).swap("/a"))
    assert err.value.status == 422
    assert calls == ["memoir_state", "memoir_prepare", "memoir_abort"]

    calls.clear()
    answer = asyncio.run(ReplicatedEditControl(broadcast_with([{"ok": True, "version": 2}] * 2)).swap("/a"))
    assert calls == ["memoir_state", "memoir_prepare", "memoir_commit"]
    assert answer["version"] == 2 and answer["previous_versions"] == [1, 1] and len(answer["replicas"]) == 2

    calls.clear()
    mixed = [{"ok": True, "version": 2}, {"ok": True, "version": 3}]  # the artifact moved on between loads
    with pytest.raises(EditControlError, match="different versions"):
        asyncio.run(ReplicatedEditControl(broadcast_with(mixed)).swap("/a"))
    assert calls[-1] == "memoir_abort" and "memoir_commit" not in calls


def test_deploy_scripts_parse():
    for script in ("serve.sh", "healthcheck.sh"):
        subprocess.run(["bash", "-n", str(REPO / "deploy" / script)], check=True)


def fake_artifact(tmp_path, version=3) -> Path:
    """An artifact directory with only its manifest: enough for hf_overrides and the pin."""
    art = tmp_path / f"art-v{version}"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({**manifest(version).__dict__, "format_version": 1}))
    return art


def test_config_pin_must_name_the_artifact_the_builder_sees(tmp_path):
    from vllm_memoir.ray_app import confirm_pin

    art = tmp_path / "art"
    pinned = {"memoir_expected_version": 3, "memoir_expected_sha256": SHA}
    confirm_pin(pinned, art, None, None)
    confirm_pin(pinned, art, 3, SHA[:12].upper())
    with pytest.raises(MemoirConfigError, match=r"artifact_version 2 != version 3 of the artifact at .*art"):
        confirm_pin(pinned, art, 2, None)
    with pytest.raises(MemoirConfigError, match="artifact_sha256 cdcdcdcdcdcdcd .*does not match"):
        confirm_pin(pinned, art, None, "cd" * 7)
    with pytest.raises(MemoirConfigError, match="at least 12 hex digits"):
        confirm_pin(pinned, art, None, "abab")
    with pytest.raises(MemoirConfigError, match="need pin_artifact: true"):
        confirm_pin({}, art, 3, None)


def test_ray_serve_yaml_builds_a_valid_llm_config(tmp_path):
    """The shipped YAML's args, with its paths pointed at a tiny model and artifact, make an LLMConfig."""
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    import yaml

    from edit_tools.tiny_models import build_tiny_llama
    from vllm_memoir.ray_app import memoir_llm_config

    (app,) = yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text())["applications"]
    args = dict(app["args"])
    assert args["pin_artifact"] is True and Path(args["model"]).is_absolute() and Path(args["artifact"]).is_absolute()
    args["model"] = build_tiny_llama(tmp_path / "model")
    args["artifact"] = fake_artifact(tmp_path, version=args["artifact_version"])
    config = memoir_llm_config(args.pop("model"), args.pop("artifact"), **args)
    engine = config.get_engine_config().get_initialization_kwargs()
    assert engine["hf_overrides"]["memoir_expected_version"] == app["args"]["artifact_version"]
    assert engine["enable_prefix_caching"] is False and engine["enable_chunked_prefill"] is False
    assert engine["max_model_len"] == app["args"]["engine_kwargs"]["max_model_len"]
    assert config.deployment_config["num_replicas"] == app["args"]["num_replicas"]
    assert config.model_id == app["args"]["model_id"]
    # The same YAML against an artifact of another version fails the deploy, before any replica.
    with pytest.raises(MemoirConfigError, match="artifact_version"):
        memoir_llm_config(tmp_path / "model", fake_artifact(tmp_path, version=args["artifact_version"] + 1), **args)


def run_script(*argv, env=None):
    import os

    return subprocess.run(["bash", *map(str, argv)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_serve_sh_passes_the_routing_flags_tp_and_the_pin(tiny_model_dir, tmp_path):
    import shlex

    art = fake_artifact(tmp_path)
    out = run_script(REPO / "deploy" / "serve.sh", "--model", tiny_model_dir, "--artifact", art, "--port", "8123",
                     "--executor", "ray", "--dry-run", "--", "--max-model-len", "64", env={"MEMOIR_TP": "2"})
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout)
    assert command[1:4] == ["-m", "vllm_memoir.serve", str(tiny_model_dir)]

    def value(flag):
        return command[command.index(flag) + 1]

    assert {"--no-enable-prefix-caching", "--no-enable-chunked-prefill"} <= set(command)
    assert "--compilation-config" not in command  # memoir-serve asks for piecewise graphs on a GPU
    assert value("--tensor-parallel-size") == "2" and value("--distributed-executor-backend") == "ray"
    assert value("--port") == "8123" and command[-2:] == ["--max-model-len", "64"]
    assert json.loads(value("--hf-overrides")) == {"architectures": ["MemoirLlamaForCausalLM"], "memoir_path": str(art),
                                                   "memoir_expected_version": 3, "memoir_expected_sha256": SHA}
    unpinned = run_script(REPO / "deploy" / "serve.sh", "--model", tiny_model_dir, "--artifact", art, "--no-pin",
                          "--dry-run")
    assert "memoir_expected_version" not in unpinned.stdout and "--distributed-executor-backend" not in unpinned.stdout
    # Live swaps change the served version on purpose: with MEMOIR_ADMIN=1 no pin unless asked for.
    admin = run_script(REPO / "deploy" / "serve.sh", "--model", tiny_model_dir, "--artifact", art, "--dry-run",
                       env={"MEMOIR_ADMIN": "1"})
    assert admin.returncode == 0 and "memoir_expected_version" not in admin.stdout, admin.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "--artifact (or MEMOIR_ARTIFACT) is required"),
    (["--artifact", "/nonexistent"], "no manifest.json"),
    (["--tp", "two"], "--tp must be a positive integer"),
    (["--max-model-len", "64"], "unknown option --max-model-len (vLLM's own flags go after --"),
])
def test_serve_sh_refuses_bad_arguments_by_name(tiny_model_dir, tmp_path, argv, message):
    if argv and argv[0] == "--tp":
        argv = ["--artifact", fake_artifact(tmp_path), *argv]
    out = run_script(REPO / "deploy" / "serve.sh", "--model", tiny_model_dir, *argv, "--dry-run")
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_healthcheck_reports_an_unreachable_server():
    from vllm_memoir.server_process import free_port

    out = run_script(REPO / "deploy" / "healthcheck.sh", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert out.returncode == 1 and out.stderr.startswith("UNHEALTHY http://127.0.0.1:"), out.stderr


def test_gpu_replicas_with_tp_run_vllms_ray_executor(tmp_path):
    """What deploy/README.md says about GPU replicas: Ray Serve LLM picks vLLM's Ray executor, one GPU per rank."""
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    from edit_tools.tiny_models import build_tiny_llama
    from vllm_memoir.ray_app import memoir_llm_config

    config = memoir_llm_config(build_tiny_llama(tmp_path / "model"), fake_artifact(tmp_path), accelerator="gpu",
                               tensor_parallel_size=2, artifact_version=3)
    engine_config = config.get_engine_config()
    engine = engine_config.get_initialization_kwargs()
    assert engine["distributed_executor_backend"] == "ray" and engine["tensor_parallel_size"] == 2
    assert engine["compilation_config"] == {"cudagraph_mode": "PIECEWISE"} and "logits_processors" not in engine
    assert engine_config.placement_bundles == [{"GPU": 1}, {"GPU": 1}]
