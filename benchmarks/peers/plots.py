"""Plots of a `python -m benchmarks` JSON: time, peak memory and throughput per tool.

Runs in the benchmark's peers virtualenv, so matplotlib is no dependency of carsync:

    python plots.py results/benchmark.json
    # writes results/benchmark-time.png, -memory.png and -throughput.png
    python plots.py --pss samples.json curve.png
    # the PSS curve of the chaos soak (benchmarks/chaos.py): {"title", "samples": [[s, MB]...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib  # type: ignore[import-not-found]

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # type: ignore[import-not-found]

KINDS = {"full_sync": "full load", "unchanged_resync": "unchanged re-sync"}


def tools(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{tool: {run kind: run}}: carsync's runs are at the top level, the peers' under "peers"."""
    return {"carsync": {kind: results[kind] for kind in KINDS}, **results.get("peers", {})}


def bars(runs: dict[str, dict[str, Any]], key: str, ylabel: str, title: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(KINDS)
    for offset, (kind, label) in enumerate(KINDS.items()):
        values = [tool[kind][key] for tool in runs.values()]
        xs = [n + (offset - (len(KINDS) - 1) / 2) * width for n in range(len(runs))]
        drawn = axes.bar(xs, values, width, label=label)
        axes.bar_label(drawn, fmt="%.1f", fontsize=8)
    axes.set_xticks(range(len(runs)), list(runs))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def throughput(runs: dict[str, dict[str, Any]], path: Path) -> None:
    figure, panels = plt.subplots(1, len(KINDS), figsize=(11, 4), sharey=True)
    for axes, (kind, label) in zip(panels, KINDS.items(), strict=True):
        for tool, tool_runs in runs.items():
            series = tool_runs[kind]["pages_per_second"]
            axes.plot(range(len(series)), series, label=tool)
        axes.set_title(label)
        axes.set_xlabel("seconds since the run started")
    panels[0].set_ylabel("requests admitted by the API per second")
    panels[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pss_curve(source: Path, path: Path) -> None:
    data = json.loads(source.read_text())
    seconds, megabytes = zip(*data["samples"], strict=True)
    figure, axes = plt.subplots(figsize=(9, 4))
    axes.plot(seconds, megabytes, linewidth=1)
    middle = seconds[len(seconds) // 2]
    axes.axvline(middle, color="grey", linestyle=":", label="first half | second half")
    axes.set_xlabel("seconds since the sync started")
    axes.set_ylabel("PSS of carsync's processes, MB")
    axes.set_ylim(bottom=0)
    axes.set_title(data["title"])
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    if sys.argv[1] == "--pss":
        pss_curve(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    source = Path(sys.argv[1])
    results = json.loads(source.read_text())
    runs = tools(results)
    cars = f"{results['cars']:,} cars"
    stem = source.with_suffix("")
    written = [Path(f"{stem}-{name}.png") for name in ("time", "memory", "throughput")]
    bars(
        runs,
        "seconds",
        "seconds (the tool's own timer)",
        f"Time per tool, {cars} (lower is better)",
        written[0],
    )
    bars(runs, "peak_pss_mb", "peak PSS, MB", f"Peak memory (PSS) per tool, {cars}", written[1])
    throughput(runs, written[2])
    print(json.dumps({"plots": [str(path) for path in written]}))


if __name__ == "__main__":
    main()
