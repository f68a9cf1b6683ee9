#!/usr/bin/env bash
# The 16-stream chat level three times per server, alternating enduro and llama-server, so
# the ratio is not one run's luck (the servers' run-to-run spread is ±15 % on this VM).
# Writes benchmarks/baselines/results/chat-c16-repeats/. Needs `make bench-deps`.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/baselines/results/chat-c16-repeats
PORT=${PORT:-18612}
GGUF=$(.venv/bin/python -c "from enduro.loading.loader import resolve_model_path as r; print(r(None))")
mkdir -p "$OUT"
for round in 1 2 3; do
  for server in enduro llama-server; do
    if [ "$server" = enduro ]; then
      .venv/bin/enduro serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
    else
      .bench/llama.cpp/build/bin/llama-server -m "$GGUF" --alias "$(basename "$GGUF" .gguf)" \
        --host 127.0.0.1 --port "$PORT" --threads 2 --parallel 16 -c 16384 >"$OUT/server.log" 2>&1 &
    fi
    pid=$!
    .venv/bin/enduro bench serve --url "http://127.0.0.1:$PORT" --label "$server-$round" \
      --workload chat --concurrency 16 --num-requests 32 --warmup 2 --out "$OUT" >/dev/null
    kill "$pid"; wait "$pid" || true
    echo "$server round $round: $(tail -1 "$OUT/$server-$round.md")"
  done
done
rm -f "$OUT/server.log"
