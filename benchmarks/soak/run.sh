#!/usr/bin/env bash
# The recorded soaks of benchmarks/README.md ("Soak"), one after the other, on the default
# model with `enduro serve`'s defaults (guard heal). Usage: benchmarks/soak/run.sh [RUN...]
# where RUN is agent (or agent-NAME), leak (observe and heal side by side), leak-observe, leak-heal,
# alloc-glibc, alloc-arena2, alloc-jemalloc. LEAK_DURATION (20m) and ALLOC_DURATION (10m) set
# the length of those runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/soak
# 8 MiB per finished request (LEAK_BYTES): the agent workload finishes only a few requests a
# minute per server, and at 1 MiB the leak stayed inside the engine's memory noise for the
# guard's 5-minute windows (benchmarks/README.md). tests/guard/test_guard_live.py proves the
# 256 KiB case at a higher request rate.
leak="{\"leak_bytes_per_request\": ${LEAK_BYTES:-8388608}}"

soak() { .venv/bin/enduro soak "$@" || true; }  # a FAIL verdict is a result, not an error

run() {
  case "$1" in
    # agent-NAME: the same run into benchmarks/soak/agent-NAME (a later run beside the first).
    agent|agent-*) soak --duration 30m --concurrency 8 --workload agent --report "$out/$1" \
             --max-drift 0.05 ;;
    # Both at once, so they share the machine alike: a fair side by side. One torch thread
    # each: two engines of two OpenMP threads on 2 cores spin against each other (TPOT p99
    # 2.2 s instead of ≈0.4 s in the first such pair).
    leak) (export OMP_NUM_THREADS=1; run leak-observe) & (export OMP_NUM_THREADS=1; run leak-heal) & wait ;;
    leak-observe|leak-heal)
      soak --duration "${LEAK_DURATION:-20m}" --concurrency 8 --workload agent --report "$out/$1" \
        --faults "$leak" --faults-at 150s --no-fail-on-alert \
        --serve-arg=--enable-fault-injection --serve-arg="--guard=${1#leak-}" ;;
    # The allocator of the engine process, with the guard only watching (its trims and
    # collects would hide what each allocator keeps).
    alloc-glibc|alloc-arena2|alloc-jemalloc)
      if [ "$1" = alloc-arena2 ]; then export MALLOC_ARENA_MAX=2; else unset MALLOC_ARENA_MAX; fi
      soak --duration "${ALLOC_DURATION:-10m}" --concurrency 8 --workload agent --report "$out/$1" \
        --no-fail-on-alert --serve-arg=--guard=observe \
        --serve-arg="--engine-allocator=$( [ "$1" = alloc-jemalloc ] && echo jemalloc || echo glibc)" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(agent leak alloc-glibc alloc-arena2 alloc-jemalloc)
fi
for one in "${runs[@]}"; do run "$one"; done
