#!/usr/bin/env bash
# The agent workload (8 sessions, 64 requests, contexts to 4,096 tokens) on enduro with and
# without prefix caching and on llama-server (8 slots of 4,096, its own prompt cache), one
# after the other on an otherwise idle machine, into results/agent-c8-native, then the
# comparison against llama-server. Needs `make bench-deps`. benchmarks/README.md, "Packed
# decoder projections and native kernels".
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/baselines/results/agent-c8-native
mkdir -p "$OUT"
PORT=${PORT:-18612}
URL=http://127.0.0.1:$PORT
GGUF=$(.venv/bin/python -c "from enduro.loading.loader import resolve_model_path as r; print(r(None))")
run() {
  local label=$1
  shift
  echo "== $label $(date -u +%H:%M:%S)"
  "$@" >"$OUT/server-$label.log" 2>&1 &
  local pid=$!
  .venv/bin/enduro bench serve --url "$URL" --label "$label" --workload agent --concurrency 8 \
    --num-requests 64 --warmup 2 --max-model-len 4096 --out "$OUT"
  kill "$pid"
  wait "$pid" 2>/dev/null
  rm -f "$OUT/server-$label.log"
}
run enduro .venv/bin/enduro serve --host 127.0.0.1 --port "$PORT" --log-format text
run enduro-nocache .venv/bin/enduro serve --host 127.0.0.1 --port "$PORT" --log-format text \
  --prefix-cache off
run llama-server .bench/llama.cpp/build/bin/llama-server -m "$GGUF" \
  --alias "$(basename "$GGUF" .gguf)" --host 127.0.0.1 --port "$PORT" --threads 2 --parallel 8 \
  -c 32768
.venv/bin/enduro bench compare "$OUT"/*.json --baseline llama-server --out "$OUT"
