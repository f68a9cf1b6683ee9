"""Plot CSVs of benchmarks/engine_memory.py side by side: the engine's memory outside the KV
pool over time, one line per run, plus where a final gc + malloc_trim brought it.

  .venv/bin/python benchmarks/engine_memory_plot.py --out benchmarks/allocators/non_kv.png \\
      glibc=benchmarks/allocators/glibc.csv jemalloc=benchmarks/allocators/jemalloc.csv
"""

import argparse
import csv
import sys
from pathlib import Path

from matplotlib.figure import Figure


def read(path: Path) -> tuple[list[float], list[float], float | None]:
    seconds, non_kv, trimmed = [], [], None
    with path.open() as file:
        for row in csv.DictReader(file):
            if row["seconds"] == "trimmed":
                trimmed = float(row["non_kv_mib"])
            else:
                seconds.append(float(row["seconds"]))
                non_kv.append(float(row["non_kv_mib"]))
    return seconds, non_kv, trimmed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="label=path.csv")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Engine memory outside the KV pool, agent traffic")
    args = parser.parse_args()
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    for run in args.runs:
        label, _, path = run.rpartition("=")
        seconds, non_kv, trimmed = read(Path(path))
        (line,) = axes.plot(seconds, non_kv, label=label)
        if trimmed is not None:
            axes.scatter([seconds[-1]], [trimmed], color=line.get_color(), marker="v")
    axes.set_xlabel("seconds of traffic")
    axes.set_ylabel("RssAnon + VmSwap − KV segments (MiB)")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend(title="▼ after gc + malloc_trim")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
