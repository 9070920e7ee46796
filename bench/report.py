"""The results table (stdout) and the JSON record of every round."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from bench.runner import ScenarioResult

EXPLANATION = """\
Medians over {rounds} round(s). Each round runs both sides once on the same files, alternating
which goes first; both sides are fresh processes timed from outside (wall clock).
start-up = the same process opening and closing the same image with no request (qemu-io with
  zero commands; the qblock worker with an empty request list), measured every round.
net = wall - median start-up x processes the run took. Throughput is over the net time.
ratio = QEMU time / qblock time = qblock's speed relative to QEMU (1.00 = as fast, >1 = faster);
  "ratio" uses net times, "ratio (wall)" wall times with start-up included.
paired = the median over rounds of each round's own net-time ratio, (lowest-highest) of them.
Nothing is dropped from the page cache: reads run on a file just written in full."""


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _paired(res: ScenarioResult) -> str:
    ratios = res.round_ratios
    if not ratios:
        return "n/a"
    return f"{_fmt(res.ratio_paired, '.2f')} ({min(ratios):.2f}-{max(ratios):.2f})"


def print_table(results: Sequence[ScenarioResult], rounds: int, out: TextIO = sys.stdout) -> None:
    print(EXPLANATION.format(rounds=rounds), file=out)
    header = ("scenario", "size", "qblock net s", "QEMU net s", "qblock thru", "QEMU thru",
              "ratio", "start-up qblock/QEMU s", "ratio (wall)", "paired (range)")
    rows = []
    for res in results:
        size = f"{res.size / (1 << 20):g}M"
        if res.error:
            rows.append((res.scenario.name, size, "FAILED", "", "", "", "", "", "", ""))
            continue
        q, e = res.sides["qblock"], res.sides["qemu"]
        unit = res.scenario.unit
        rows.append((
            res.scenario.name, size, f"{q.median_net_s:.3f}", f"{e.median_net_s:.3f}",
            f"{_fmt(q.throughput, '.0f')} {unit}", f"{_fmt(e.throughput, '.0f')} {unit}",
            _fmt(res.ratio, ".2f"),
            f"{_fmt(q.median_startup_s, '.3f')}/{_fmt(e.median_startup_s, '.3f')}",
            _fmt(res.ratio_wall, ".2f"),
            _paired(res),
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-io", "--version"], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def write_json(results: Sequence[ScenarioResult], path: Path, *, rounds: int,
               workdir: Path) -> None:
    """Write every round's times and the summaries to ``path`` (parents created)."""
    doc: dict[str, Any] = {
        "harness": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rounds": rounds,
            "workdir": str(workdir),
            "ratio": "QEMU time / qblock time (speed of qblock relative to QEMU, >1 = faster)",
            "timing": EXPLANATION.format(rounds=rounds).replace("\n", " "),
            "qemu": _qemu_version(),
            "python": sys.version.split()[0],
            "machine": {"system": platform.platform(), "cpus": os.cpu_count()},
        },
        "scenarios": {res.scenario.name: res.as_json() for res in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
