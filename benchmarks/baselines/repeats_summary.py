"""Medians of the alternating rounds of `compare.sh c16-repeats`, one line per server.

  .venv/bin/python benchmarks/baselines/repeats_summary.py [DIR] [--baseline llama-server]
      [--first-round N]

DIR holds `<server>-<round>.json` from `enduro bench serve` (default:
results/chat-c16-repeats). Rounds alternate the servers, so the ratio of each round's
figures cancels most of the machine's drift; the table gives every round's output tokens/s,
the median, and the median of the per-round ratios against the baseline.
"""

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

RESULT = re.compile(r"^(?P<server>.+)-(?P<round>\d+)\.json$")


def read_rounds(directory: Path) -> dict[str, dict[int, dict[str, float]]]:
    """server → round → figures of its (single) concurrency level."""
    servers: dict[str, dict[int, dict[str, float]]] = {}
    for path in sorted(directory.glob("*.json")):
        match = RESULT.match(path.name)
        if match is None:
            continue
        (level,) = json.loads(path.read_text())["levels"]
        figures = {
            "tok/s": level["output_tokens_per_s"],
            # a one-token reply (the prefill workload) has no time per output token
            "tpot_p50_ms": math.nan if level["tpot_p50"] is None else 1000 * level["tpot_p50"],
            "ttft_p50_ms": 1000 * level["ttft_p50"],
        }
        servers.setdefault(match["server"], {})[int(match["round"])] = figures
    return servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).parent
    parser.add_argument(
        "directory", nargs="?", type=Path, default=here / "results/chat-c16-repeats"
    )
    parser.add_argument("--baseline", default="llama-server")
    parser.add_argument(
        "--first-round", type=int, default=1, help="leave out earlier rounds (older code)"
    )
    args = parser.parse_args()
    servers = {
        server: {r: figures for r, figures in rounds.items() if r >= args.first_round}
        for server, rounds in read_rounds(args.directory).items()
    }
    servers = {server: rounds for server, rounds in servers.items() if rounds}
    baseline = servers.get(args.baseline, {})
    print(
        "| server | tok/s per round | median tok/s | median TPOT p50 | median TTFT p50 "
        f"| median ratio vs {args.baseline} | median TTFT speed-up vs {args.baseline} |"
    )
    print("|---|---|---|---|---|---|---|")
    for server, rounds in sorted(servers.items()):
        shared = sorted(set(rounds) & set(baseline))
        ratios = [rounds[r]["tok/s"] / baseline[r]["tok/s"] for r in shared]
        ratio = f"{statistics.median(ratios):.2f}× ({len(ratios)} rounds)" if ratios else "–"
        speedups = [baseline[r]["ttft_p50_ms"] / rounds[r]["ttft_p50_ms"] for r in shared]
        speedup = f"{statistics.median(speedups):.2f}×" if speedups else "–"
        per_round = ", ".join(f"{rounds[r]['tok/s']:.1f}" for r in sorted(rounds))
        tpot = statistics.median(f["tpot_p50_ms"] for f in rounds.values())
        print(
            f"| {server} | {per_round} "
            f"| {statistics.median(f['tok/s'] for f in rounds.values()):.1f} "
            f"| {'–' if math.isnan(tpot) else f'{tpot:.0f} ms'} "
            f"| {statistics.median(f['ttft_p50_ms'] for f in rounds.values()):.0f} ms "
            f"| {ratio} | {speedup} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
