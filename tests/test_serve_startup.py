"""memoir-serve start-up: the CPU KV-cache default, the pre-flight refusals, the plugin allowlist.

The refusals run the real `python -m vllm_memoir.serve` and must end, without starting the
engine, with one `memoir-serve: error: ...` line; 15 s bounds "did not start the engine"
(an engine start takes 40 s or more here). One real start runs the README's serve command
with no VLLM_CPU_KVCACHE_SPACE in the environment.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edit_tools.editor import run_edit_job
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama
from vllm_memoir import cpu_kv_cache, serve
from vllm_memoir.cpu_kv_cache import GIB, choose_kv_cache, default_kv_cache, kv_bytes_per_token
from vllm_memoir.preflight import Preflight, check_serve_command
from vllm_memoir.serve_args import human_int, parse_serve_args
from vllm_memoir.server_process import VllmServer

REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
README_FLAGS = ["--dtype", "float32", "--no-enable-prefix-caching", "--no-enable-chunked-prefill"]
REFUSAL_SECONDS = 15.0


def overrides(artifact, architecture="MemoirLlamaForCausalLM", **extra) -> list[str]:
    return ["--hf-overrides", json.dumps({"architectures": [architecture], "memoir_path": str(artifact), **extra})]


def edit(model_dir: Path, data: Path, out: Path, layer: int, limit: int = 2) -> Path:
    hp = MemoirHyperParams(inner_params=[f"model.layers[{layer}].mlp.down_proj.weight"], top_k=64, edit_lr=20.0,
                           n_iter=3, irr_threshold=0.6).validate()
    run_edit_job(model_dir, data, hp, out, limit=limit, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, words_dataset, tmp_path_factory) -> Path:
    """Made on the 4-layer tiny Llama (hidden 128, intermediate 512) at layer 1, below the last."""
    return edit(tiny_model_dir, words_dataset, tmp_path_factory.mktemp("tiny-artifact"), layer=1)


# --- the KV-cache size --------------------------------------------------------------------------

def test_kv_bytes_per_token_counts_layers_kv_heads_head_dim_and_dtype():
    facts = json.loads((FACTS_MODEL / "config.json").read_text())  # 6 layers, 4 KV heads of 32
    assert kv_bytes_per_token(facts, dtype_bytes=4) == 6 * 4 * 32 * 2 * 4
    llama_8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    assert kv_bytes_per_token(llama_8b, dtype_bytes=2) == 32 * 8 * 128 * 2 * 2  # head_dim from hidden/heads
    assert kv_bytes_per_token(llama_8b, dtype_bytes=2, tp_size=2) == 32 * 4 * 128 * 2 * 2
    assert kv_bytes_per_token({"text_config": llama_8b}, dtype_bytes=2) == 32 * 8 * 128 * 2 * 2


def test_choose_kv_cache_sizes_from_the_model_with_a_floor_and_a_cap():
    tiny = choose_kv_cache(bytes_per_token=6144, max_model_len=64, sequences=4, free_bytes=20 * GIB)
    assert tiny.gib == 1 and not tiny.capped  # vLLM's unit is a whole GiB
    big = choose_kv_cache(bytes_per_token=128 << 10, max_model_len=8192, sequences=10, free_bytes=100 * GIB)
    assert big.gib == 10 and not big.capped  # 10 x 8192 x 128 KiB = 10 GiB exactly
    capped = choose_kv_cache(bytes_per_token=128 << 10, max_model_len=8192, sequences=100, free_bytes=40 * GIB)
    assert capped.gib == 20 and capped.capped and "capped" in capped.describe()  # half of 40 GiB
    assert choose_kv_cache(128 << 10, 8192, 100, free_bytes=40 * GIB, workers=2).gib == 10  # per worker
    assert choose_kv_cache(128 << 10, 8192, 100, free_bytes=-5 * GIB).gib == 1  # never below vLLM's minimum
    line = tiny.describe()
    assert "VLLM_CPU_KVCACHE_SPACE=1" in line and "--kv-cache-memory-bytes" in line and "\n" not in line


def test_default_kv_cache_follows_the_flags(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}))
    free = 1000 * GIB

    def gib(*flags: str) -> int:
        return default_kv_cache(parse_serve_args([str(tmp_path), *flags]), tmp_path, free_bytes=free).gib

    assert gib("--max-model-len", "4096", "--max-num-seqs", "2") == 1  # 128 KiB x 4096 x 2 = 1 GiB
    assert gib("--max-model-len", "8192", "--max-num-seqs", "2") == 2
    assert gib("--max_model_len=8K", "--max-num-seqs", "2", "--dtype", "float32") == 4
    assert gib("--max-model-len", "8192", "--max-num-seqs", "2", "--kv-cache-dtype", "fp8") == 1
    assert gib("--max-model-len", "8192") == cpu_kv_cache.DEFAULT_SEQUENCES  # 1 GiB per full-length sequence
    assert gib() == 16 * cpu_kv_cache.DEFAULT_SEQUENCES  # the model's own 131072 tokens: 16 GiB a sequence
    assert default_kv_cache(parse_serve_args(["org/hub-model"]), None, free_bytes=free).gib == cpu_kv_cache.FALLBACK_GIB


def test_an_explicit_kv_cache_setting_wins():
    plain = parse_serve_args(["m"])
    assert cpu_kv_cache.explicit_kv_cache_setting(plain, {}) is None
    assert cpu_kv_cache.explicit_kv_cache_setting(plain, {"VLLM_CPU_KVCACHE_SPACE": ""}) is None
    assert cpu_kv_cache.explicit_kv_cache_setting(plain, {"VLLM_CPU_KVCACHE_SPACE": "3"}) == "VLLM_CPU_KVCACHE_SPACE=3"
    assert cpu_kv_cache.explicit_kv_cache_setting(parse_serve_args(["m", "--kv-cache-memory-bytes", "2G"]), {})
    assert cpu_kv_cache.explicit_kv_cache_setting(parse_serve_args(["m", "--gpu-memory-utilization=0.5"]), {})


def test_memoir_serve_sets_and_logs_the_kv_cache_unless_set(monkeypatch, caplog):
    checked = Preflight(parse_serve_args([str(FACTS_MODEL), *README_FLAGS]), FACTS_MODEL, None, None)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with caplog.at_level(logging.INFO, logger=serve.__name__):
        serve.size_cpu_kv_cache(checked)
    assert serve.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    [record] = [r for r in caplog.records if r.name == serve.__name__]
    assert "VLLM_CPU_KVCACHE_SPACE=1" in record.getMessage()
    caplog.clear()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with caplog.at_level(logging.INFO, logger=serve.__name__):
        serve.size_cpu_kv_cache(checked)
    assert serve.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


# --- the command line memoir-serve reads ---------------------------------------------------------

def test_serve_args_reads_vllms_spellings():
    args = parse_serve_args(["--port", "8000", "--model=models/x", "-tp", "2", "--max_model_len", "4k",
                             "--no-enable-prefix-caching", "--enable-chunked-prefill", "--served-model-name", "y"])
    assert (args.model, args.tensor_parallel_size, human_int(args.max_model_len)) == ("models/x", "2", 4000)
    assert (args.enable_prefix_caching, args.enable_chunked_prefill, args.enable_prompt_embeds) == (False, True, None)
    assert parse_serve_args(["models/y", "--model", "models/x"]).model == "models/y"  # vLLM: the positional wins
    assert parse_serve_args(["m", "--help"]).wants_help
    assert not parse_serve_args(["m", "--dtype"]).complete  # left to vLLM's parser to refuse
    assert human_int("2K") == 2048 and human_int("auto") is None and human_int("-1") is None


def test_preflight_accepts_a_good_start(tiny_model_dir, tiny_artifact):
    checked = check_serve_command([str(tiny_model_dir), *README_FLAGS, *overrides(tiny_artifact)], on_cpu=True)
    assert (checked.model_dir, checked.memoir_class, checked.artifact) == (
        tiny_model_dir, "MemoirLlamaForCausalLM", tiny_artifact)
    plain = check_serve_command(["org/hub-model", "--dtype", "float32"], on_cpu=True)  # no MEMOIR: no checks
    assert plain.model_dir is None and plain.memoir_class is None


# --- refusals before the engine starts ------------------------------------------------------------

def run_refused(tmp_path: Path, model, args: list[str], env: dict | None = None) -> str:
    """Run memoir-serve to its exit; asserts exit 2 within REFUSAL_SECONDS; returns the last line."""
    server = VllmServer(model, args, tmp_path / "serve.log", env={"VLLM_CPU_KVCACHE_SPACE": None, **(env or {})})
    started = time.monotonic()
    code = server.wait_for_exit(timeout=120)
    elapsed = time.monotonic() - started
    lines = server.log_text().strip().splitlines()
    assert code == 2, server.log_tail()
    assert elapsed < REFUSAL_SECONDS, f"refusal took {elapsed:.1f} s:\n{server.log_tail()}"
    assert "Traceback" not in server.log_text()
    assert lines[-1].startswith("memoir-serve: error: "), server.log_tail()
    return lines[-1]


@pytest.fixture(scope="module")
def other_base_model(tmp_path_factory) -> Path:
    """The tiny Llama's shape with other weights."""
    return build_tiny_llama(tmp_path_factory.mktemp("other-llama"), seed=1)


def test_refuses_a_missing_artifact(tmp_path, tiny_model_dir):
    line = run_refused(tmp_path, tiny_model_dir, [*README_FLAGS, *overrides(tmp_path / "no-artifact")])
    assert "no-artifact" in line and "no such artifact directory" in line


def test_refuses_a_directory_without_a_manifest(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    line = run_refused(tmp_path, tiny_model_dir, [*README_FLAGS, *overrides(tmp_path / "empty")])
    assert "manifest.json: missing" in line


def test_refuses_an_artifact_of_another_shape(tmp_path, tiny_artifact):
    line = run_refused(tmp_path, FACTS_MODEL, [*README_FLAGS, *overrides(tiny_artifact)])
    assert "intermediate_size 512 != the served model's 1024" in line


def test_refuses_an_artifact_of_another_base_model(tmp_path, other_base_model, tiny_artifact):
    line = run_refused(tmp_path, other_base_model, [*README_FLAGS, *overrides(tiny_artifact)])
    assert "made for a different base model" in line


def test_refuses_routing_flags_for_an_edit_below_the_last_layer(tmp_path, tiny_model_dir, tiny_artifact):
    line = run_refused(tmp_path, tiny_model_dir, ["--dtype", "float32", *overrides(tiny_artifact)])
    assert "--no-enable-prefix-caching" in line


def test_refuses_an_artifact_other_than_the_pinned_one(tmp_path, tiny_model_dir, tiny_artifact):
    line = run_refused(tmp_path, tiny_model_dir,
                       [*README_FLAGS, *overrides(tiny_artifact, memoir_expected_version=99)])
    assert "memoir_expected_version 99" in line


def test_refuses_malformed_overrides(tmp_path, tiny_model_dir):
    line = run_refused(tmp_path, tiny_model_dir,
                       [*README_FLAGS, "--hf-overrides", '{"architectures": ["MemoirLlamaForCausalLM"],}'])
    assert "--hf-overrides is not valid JSON" in line


def test_refuses_an_unknown_memoir_architecture(tmp_path, tiny_model_dir, tiny_artifact):
    line = run_refused(tmp_path, tiny_model_dir, [*README_FLAGS, *overrides(tiny_artifact, "MemoirGPT2ForCausalLM")])
    assert "'MemoirGPT2ForCausalLM' is not a MEMOIR model class" in line and "MemoirLlamaForCausalLM" in line


def test_refuses_a_missing_model_directory(tmp_path, tiny_artifact):
    line = run_refused(tmp_path, tmp_path / "no-model", [*README_FLAGS, *overrides(tiny_artifact)])
    assert "no-model: no such directory" in line


def test_refuses_a_kv_cache_size_vllm_cannot_read(tmp_path, tiny_model_dir, tiny_artifact):
    line = run_refused(tmp_path, tiny_model_dir, [*README_FLAGS, *overrides(tiny_artifact)],
                       env={"VLLM_CPU_KVCACHE_SPACE": "1.5"})
    assert "VLLM_CPU_KVCACHE_SPACE='1.5'" in line


# --- VLLM_PLUGINS ---------------------------------------------------------------------------------

def test_plugin_allowlist_when_unset_names_what_vllm_would_load(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    serve.allowlist_plugins(admin=False)
    names = set(serve.os.environ["VLLM_PLUGINS"].split(","))
    assert "memoir" in names  # the model classes' plugin still loads
    assert serve.ADMIN_PLUGIN not in names and "lora_hf_hub_resolver" not in names
    monkeypatch.setenv("VLLM_PLUGINS", "memoir,custom")
    serve.allowlist_plugins(admin=False)
    assert serve.os.environ["VLLM_PLUGINS"] == "memoir,custom"  # the user's list is left alone
    monkeypatch.delenv("VLLM_PLUGINS")
    serve.allowlist_plugins(admin=True)
    assert {"memoir", serve.ADMIN_PLUGIN} <= set(serve.os.environ["VLLM_PLUGINS"].split(","))


def test_server_env_none_removes_a_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert VllmServer("m", [], tmp_path / "log").env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # DEFAULT_ENV
    assert "VLLM_CPU_KVCACHE_SPACE" not in VllmServer("m", [], tmp_path / "log",
                                                      env={"VLLM_CPU_KVCACHE_SPACE": None}).env


# --- the README's command, as written ---------------------------------------------------------------

@pytest.mark.server
@pytest.mark.slow
def test_readme_serve_command_starts_without_a_kv_cache_setting(tmp_path):
    data = REPO / "data" / "facts" / "zsre-facts-T10.json"
    artifact = edit(FACTS_MODEL, data, tmp_path / "facts-artifact", layer=5)
    server = VllmServer(FACTS_MODEL, [*README_FLAGS, *overrides(artifact)], tmp_path / "serve.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": None, "VLLM_PLUGINS": None, "MEMOIR_ADMIN": None})
    with server:
        answer = server.client().completions.create(model=str(FACTS_MODEL), prompt="gail suthein levun has which employer ?",
                                                    max_tokens=2, temperature=0)
        assert answer.choices[0].text.strip()
        with pytest.raises(urllib.error.HTTPError) as missing:  # no admin routes without MEMOIR_ADMIN=1
            urllib.request.urlopen(f"{server.url}/memoir/edits", timeout=10)
        assert missing.value.code == 404
    log = server.log_text()
    assert "[memoir-serve] CPU KV cache 1 GiB per worker (VLLM_CPU_KVCACHE_SPACE=1" in log
    assert "VLLM_PLUGINS is not set" not in log
