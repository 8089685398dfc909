#!/usr/bin/env bash
# The GPU check, in one command on a CUDA machine (one GPU is enough), in about 10 minutes:
#
#   bash scripts/gpu_check.sh            # results in runs/gpu-check/ (OUT=... to change)
#
# 1. installs what scripts/setup.sh installs there (vllm 0.32.x, the CUDA build);
# 2. runs the server parity tests that start one server at a time on the GPU, with Model
#    Runner V2, piecewise CUDA graphs (memoir-serve's GPU default), chunked prefill and
#    prefix caching on (vLLM's defaults): tests/test_plugin_speed_features.py and the
#    chat-template routing test; before them, the routing step's decode path captured in a
#    CUDA graph and replayed (tests/test_gpu_decode_graph.py) and the layer tests; JUnit XML in $OUT;
# 3. runs the serving benchmark against plain vLLM with its defaults on a random Llama of
#    ~1B parameters (hidden 2048, intermediate 8192, 16 layers) with 1,000 and 100,000
#    synthetic edits at its last layer; JSON in $OUT.
# Each step has its own time limit and a failed step does not stop the next; the exit status
# is the number of failed steps. Nothing here has run on a GPU yet (no GPU was lent to the
# sessions that wrote it): read $OUT/summary.txt and the logs it names.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
failed=0

step() {  # step NAME SECONDS COMMAND...: run, log, record the outcome
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - started)) s (log $OUT/$name.log)" | tee -a "$summary"
    [[ $status == 0 ]] || failed=$((failed + 1))
}

if ! nvidia-smi -L > "$OUT/gpu.txt" 2>&1; then
    echo "gpu_check: no CUDA GPU visible (nvidia-smi -L failed); nothing to check" | tee -a "$summary"
    exit 2
fi
cat "$OUT/gpu.txt" >> "$summary"

step setup 300 bash scripts/setup.sh
"$PYTHON" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.version.cuda)" \
    >> "$summary" 2>&1

export VLLM_USE_V2_MODEL_RUNNER=1 MEMOIR_TP_TESTS=0 HF_HUB_OFFLINE=1
tests=(tests/test_gpu_decode_graph.py tests/test_plugin_routed_layer.py tests/test_plugin_speed_features.py)
[[ -f tests/test_chat_routing_server.py ]] && tests+=(tests/test_chat_routing_server.py)
step parity 300 "$PYTHON" -m pytest -q -ra "${tests[@]}" --junitxml "$OUT/parity.xml"

# Plain and plugin servers run side by side: each gets 40% of the GPU's memory.
step serving 420 "$PYTHON" benchmarks/serving_overhead.py --models large --large 2048:8192:16 \
    --artifacts 1000,100000 --rounds 2 --engine-defaults --fresh-prompts \
    --serve-arg=--gpu-memory-utilization=0.4 --workdir runs/gpu-bench --label gpu-defaults \
    --json "$OUT/serving_overhead_gpu.json"

echo "failed steps: $failed" | tee -a "$summary"
exit "$failed"
