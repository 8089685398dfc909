#!/usr/bin/env bash
# Health check of a MEMOIR server: the liveness route, then one real greedy completion.
#
#   deploy/healthcheck.sh                                  # http://127.0.0.1:8000
#   deploy/healthcheck.sh --url http://10.0.0.5:8000 --prompt "gail suthein levun has which employer ?" \
#       --expect "<the edited answer>"                     # also checks that the edit is served
#
# Works against deploy/serve.sh (`vllm serve`: GET /health) and Ray Serve (which has no
# /health: GET /-/healthz of Ray Serve's proxy instead). Exit 0 healthy, 1 not.
# Options (environment variable in brackets):
#   --url URL          server base URL                   [MEMOIR_URL, default http://127.0.0.1:8000]
#   --model ID         model id to ask                   [MEMOIR_MODEL_ID, default: the first of /v1/models]
#   --prompt TEXT      completion prompt                 [MEMOIR_HEALTH_PROMPT, default a facts-model question]
#   --expect TEXT      the completion must start with it [MEMOIR_HEALTH_EXPECT]
#   --timeout S        seconds per request               [MEMOIR_HEALTH_TIMEOUT, default 30]
set -euo pipefail

url="${MEMOIR_URL:-http://127.0.0.1:8000}"
model_id="${MEMOIR_MODEL_ID:-}"
prompt="${MEMOIR_HEALTH_PROMPT:-gail suthein levun has which employer ?}"
expect="${MEMOIR_HEALTH_EXPECT:-}"
timeout="${MEMOIR_HEALTH_TIMEOUT:-30}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --url) url="${2:?--url needs a value}"; shift 2 ;;
        --model) model_id="${2:?--model needs a value}"; shift 2 ;;
        --prompt) prompt="${2:?--prompt needs a value}"; shift 2 ;;
        --expect) expect="${2:?--expect needs a value}"; shift 2 ;;
        --timeout) timeout="${2:?--timeout needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deploy/healthcheck.sh: error: unknown option $1" >&2; exit 2 ;;
    esac
done

# Python's standard library only (no curl in slim images): the project needs Python anyway.
exec "${PYTHON:-python3}" - "$url" "$model_id" "$prompt" "$expect" "$timeout" <<'EOF'
import json
import sys
import time
import urllib.error
import urllib.request

url, model_id, prompt, expect, timeout = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])


def fail(message):
    print(f"UNHEALTHY {url}: {message}", file=sys.stderr)
    sys.exit(1)


def request(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, response.read()


try:
    try:
        status, _ = request("/health")
        liveness = "/health"
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        status, _ = request("/-/healthz")  # Ray Serve's proxy
        liveness = "/-/healthz"
    if status != 200:
        fail(f"{liveness} answered {status}")
    if not model_id:
        models = json.loads(request("/v1/models")[1])["data"]
        if not models:
            fail("/v1/models lists no model")
        model_id = models[0]["id"]
    started = time.monotonic()
    _, body = request("/v1/completions", {"model": model_id, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    seconds = time.monotonic() - started
    text = json.loads(body)["choices"][0]["text"]
except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
    fail(f"{type(exc).__name__}: {exc}")
if expect and not text.strip().startswith(expect):
    fail(f"completion {text!r} of {prompt!r} does not start with the expected {expect!r}")
print(f"OK {url}: {liveness} 200, {model_id} completed {prompt!r} -> {text!r} in {seconds:.2f} s")
EOF
