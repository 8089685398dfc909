#!/usr/bin/env bash
# Serve a model with a MEMOIR artifact on one node: `memoir-serve` (vLLM's own `vllm serve`)
# with the flags MEMOIR routing needs, the artifact pinned to the version seen at launch.
#
#   deploy/serve.sh --artifact runs/facts-T100                      # facts model, port 8000
#   deploy/serve.sh --model /models/llama --artifact /shared/art --tp 2 -- --max-model-len 4096
#   MEMOIR_ARTIFACT=/shared/art MEMOIR_TP=2 deploy/serve.sh          # the same through the environment
#
# Options (environment variable in brackets; flags win):
#   --model DIR        local model directory             [MEMOIR_MODEL, default models/facts-llama]
#   --artifact DIR     MEMOIR artifact directory         [MEMOIR_ARTIFACT, required]
#   --host HOST        listen address                    [MEMOIR_HOST, default 0.0.0.0]
#   --port PORT        listen port                       [MEMOIR_PORT, default 8000]
#   --tp N             --tensor-parallel-size            [MEMOIR_TP, default 1]
#   --executor NAME    --distributed-executor-backend    [MEMOIR_EXECUTOR, default: vLLM's choice
#                      (mp on one node); `ray` for a model that spans nodes, see deploy/README.md]
#   --dtype DTYPE      --dtype                           [MEMOIR_DTYPE, default auto]
#   --no-pin           do not pin the artifact version   [MEMOIR_PIN=0; the default with MEMOIR_ADMIN=1,
#                      whose live swaps change the served version on purpose]
#   --dry-run          print the command instead of running it
#   -- ARGS...         passed to `vllm serve` unchanged (e.g. --max-model-len, --served-model-name)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "deploy/serve.sh: error: $*" >&2; exit 2; }

model="${MEMOIR_MODEL:-models/facts-llama}"
artifact="${MEMOIR_ARTIFACT:-}"
host="${MEMOIR_HOST:-0.0.0.0}"
port="${MEMOIR_PORT:-8000}"
tp="${MEMOIR_TP:-1}"
executor="${MEMOIR_EXECUTOR:-}"
dtype="${MEMOIR_DTYPE:-auto}"
# A pinned server refuses every other artifact version, live swaps (MEMOIR_ADMIN=1) included.
if [[ "${MEMOIR_ADMIN:-0}" == "1" ]]; then pin="${MEMOIR_PIN:-0}"; else pin="${MEMOIR_PIN:-1}"; fi
dry_run=0
python="${PYTHON:-python3}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) model="${2:?--model needs a directory}"; shift 2 ;;
        --artifact) artifact="${2:?--artifact needs a directory}"; shift 2 ;;
        --host) host="${2:?--host needs a value}"; shift 2 ;;
        --port) port="${2:?--port needs a value}"; shift 2 ;;
        --tp) tp="${2:?--tp needs a number}"; shift 2 ;;
        --executor) executor="${2:?--executor needs mp or ray}"; shift 2 ;;
        --dtype) dtype="${2:?--dtype needs a value}"; shift 2 ;;
        --no-pin) pin=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option $1 (vLLM's own flags go after --; see --help)" ;;
    esac
done

[[ -n "$artifact" ]] || die "--artifact (or MEMOIR_ARTIFACT) is required"
[[ -d "$model" ]] || die "--model $model: not a directory (serve a local model directory)"
[[ -f "$artifact/manifest.json" ]] || die "--artifact $artifact: no manifest.json (not a MEMOIR artifact)"
[[ "$tp" =~ ^[1-9][0-9]*$ ]] || die "--tp must be a positive integer, got $tp"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"

# What MEMOIR needs of the engine (vllm_memoir.engine_requirements): the routing flags (none
# for an edit at the last decoder layer, served with vLLM's defaults; prefix caching and
# chunked prefill off below it) and the --hf-overrides: the MEMOIR class for the model's
# architecture and the absolute artifact path, with the pin the artifact's version and
# memory sha256, which the server re-checks when it loads it. memoir-serve adds the rest
# (piecewise CUDA graphs on a GPU, the V1 runner's request tracker, the CPU KV cache size).
pin_flag=()
[[ "$pin" == "1" ]] && pin_flag=(--pin)
memoir_args_text="$("$python" -m vllm_memoir.hf_overrides "$model" "$artifact" --engine-args "${pin_flag[@]}")" || exit 2
mapfile -t memoir_args <<< "$memoir_args_text"

command=("$python" -m vllm_memoir.serve "$model"
    --host "$host" --port "$port" --dtype "$dtype"
    --tensor-parallel-size "$tp"
    "${memoir_args[@]}")
[[ -n "$executor" ]] && command+=(--distributed-executor-backend "$executor")
command+=("$@")

if [[ "$dry_run" == "1" ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
# On CPU, memoir-serve sizes the KV cache from the model unless VLLM_CPU_KVCACHE_SPACE is set.
echo "deploy/serve.sh: $model with $artifact on $host:$port, tensor-parallel size $tp" >&2
exec "${command[@]}"
