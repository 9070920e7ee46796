"""Run scenarios round by round, alternating which side goes first, and summarise.

Each round runs both sides once on the same files: even rounds qblock first, odd rounds QEMU
first, so neither side always inherits the other's page-cache or writeback state.  A side's
round is its start-up run (when the scenario has one) followed by the real run.
"""
from __future__ import annotations

import mmap
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bench.scenario import MIB, Context, Scenario

SIDES = ("qblock", "qemu")


@dataclass
class RoundResult:
    """One side's run in one round."""

    round: int
    position: int  # 0 = this side ran first in the round
    seconds: float  # wall time, start-up included
    startup: float | None  # one start-up run (no request) of the same process, this round
    invocations: int
    amount: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SideSummary:
    """Every round of one side of a scenario, and its medians."""

    rounds: list[RoundResult]
    unit: str

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.rounds)

    @property
    def median_startup_s(self) -> float | None:
        ups = [r.startup for r in self.rounds if r.startup is not None]
        return statistics.median(ups) if ups else None

    def net(self, r: RoundResult) -> float:
        """Wall time minus the median start-up times the processes the run took."""
        startup = self.median_startup_s
        return r.seconds if startup is None else r.seconds - r.invocations * startup

    @property
    def median_net_s(self) -> float:
        return statistics.median(self.net(r) for r in self.rounds)

    @property
    def throughput(self) -> float | None:
        """MiB/s or IOPS over the median net time; None when that time is not positive."""
        net = self.median_net_s
        if net <= 0:
            return None
        amount = self.rounds[0].amount
        return amount / MIB / net if self.unit == "MiB/s" else amount / net

    def as_json(self) -> dict[str, Any]:
        return {"rounds": [asdict(r) | {"net": self.net(r)} for r in self.rounds],
                "median_s": self.median_s, "median_startup_s": self.median_startup_s,
                "median_net_s": self.median_net_s, "throughput": self.throughput}


@dataclass
class ScenarioResult:
    """Both sides of one scenario; ``error`` holds the traceback when it failed."""

    scenario: Scenario
    size: int
    settle: float = 0.0
    backed: int = 0
    sides: dict[str, SideSummary] = field(default_factory=dict)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """Speed of qblock relative to QEMU: QEMU net time / qblock net time."""
        if self.error:
            return None
        q, e = self.sides["qblock"].median_net_s, self.sides["qemu"].median_net_s
        return e / q if q > 0 and e > 0 else None

    @property
    def round_ratios(self) -> list[float]:
        """Per round, QEMU net time / qblock net time of that round (rounds where both are
        positive).  The two runs of a round are seconds apart while the rounds span
        minutes, so each pair meets the machine in about the same state (README, "Paired
        ratio")."""
        if self.error:
            return []
        q, e = self.sides["qblock"], self.sides["qemu"]
        pairs = zip(q.rounds, e.rounds)
        return [e.net(b) / q.net(a) for a, b in pairs if q.net(a) > 0 and e.net(b) > 0]

    @property
    def ratio_paired(self) -> float | None:
        """The median of round_ratios."""
        ratios = self.round_ratios
        return statistics.median(ratios) if ratios else None

    @property
    def ratio_wall(self) -> float | None:
        """The same ratio over wall times, process start-up included."""
        if self.error:
            return None
        return self.sides["qemu"].median_s / self.sides["qblock"].median_s

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.scenario.description,
                               "unit": self.scenario.unit, "size": self.size,
                               "ratio": self.ratio, "ratio_wall": self.ratio_wall,
                               "ratio_paired": self.ratio_paired,
                               "round_ratios": self.round_ratios,
                               "settle_s": self.settle, "back_memory_bytes": self.backed}
        out.update({side: summary.as_json() for side, summary in self.sides.items()})
        if self.error:
            out["error"] = self.error
        return out


def warm(path: Path) -> int:
    """Read a file through so its pages are cached; returns the bytes read."""
    done = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while n := f.readinto(buf):
            done += n
    return done


def back_memory(nbytes: int) -> None:
    """Touch every page of ``nbytes`` of fresh anonymous memory, then release it: the kernel
    hands the next allocations pages the host backs already (README, "Backed memory")."""
    with mmap.mmap(-1, nbytes) as mem:
        pages = np.frombuffer(mem, dtype=np.uint8)[::mmap.PAGESIZE]
        pages[:] = 1
        del pages


def _settle(seconds: float, backed: int, ctx: Context) -> None:
    """Start a timed run from a quiet machine (README, "Settling"): nothing dirty to write
    back, memory freed by the previous run given time to go where it goes, the inputs setup
    made cached again (the machine may have dropped some of them meanwhile) and, with
    ``backed``, that much free memory backed by the host."""
    if seconds > 0:
        os.sync()
        time.sleep(seconds)
        for path in ctx.files.values():
            warm(path)
        if backed:
            back_memory(backed)


def _run_side(scenario: Scenario, side: str, ctx: Context, rnd: int, position: int,
              settle: float, backed: int) -> RoundResult:
    startup_fn = scenario.startup_qblock if side == "qblock" else scenario.startup_qemu
    run_fn = scenario.run_qblock if side == "qblock" else scenario.run_qemu
    startup = startup_fn(ctx) if startup_fn is not None else None
    _settle(settle, backed, ctx)
    m = run_fn(ctx)
    return RoundResult(rnd, position, m.seconds, startup, m.invocations, m.amount, m.detail)


def run_scenario(scenario: Scenario, base: Path, size: int, rounds: int, *, keep: bool = False,
                 settle: float | None = None, back: bool = True,
                 log: TextIO = sys.stderr) -> ScenarioResult:
    """Set up, run ``rounds`` alternating rounds, tear down (always, unless ``keep``).

    ``settle`` (default: the scenario's own) is the pause before each timed run; ``back``
    False leaves the memory a scenario would back as it is.  A scenario that settles first
    runs each side once untimed: the first run after setup meets the machine busy writing
    back what setup wrote, whichever side it is.
    """
    ctx = Context(dir=base / scenario.name, size=size)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    result = ScenarioResult(scenario, size, settle=scenario.settle if settle is None else settle)
    if result.settle > 0 and back:
        free = os.sysconf("SC_AVPHYS_PAGES") * mmap.PAGESIZE
        result.backed = min(int(scenario.back_memory * size), free // 2)
    per_side: dict[str, list[RoundResult]] = {side: [] for side in SIDES}
    try:
        scenario.setup(ctx)
        for side in SIDES if result.settle > 0 else ():
            res = _run_side(scenario, side, ctx, -1, 0, result.settle, result.backed)
            print(f"  {scenario.name} warm-up    {side:<6} {res.seconds:8.3f} s wall "
                  "(not counted)", file=log)
        for rnd in range(rounds):
            order = SIDES if rnd % 2 == 0 else SIDES[::-1]
            for position, side in enumerate(order):
                res = _run_side(scenario, side, ctx, rnd, position, result.settle,
                                result.backed)
                per_side[side].append(res)
                startup = "" if res.startup is None else f", start-up {res.startup:.3f} s"
                print(f"  {scenario.name} round {rnd + 1}/{rounds} {side:<6} "
                      f"{res.seconds:8.3f} s wall{startup}", file=log)
    except Exception:  # noqa: BLE001 - reported in the table and the JSON, exit status 1
        result.error = traceback.format_exc(limit=3)
        print(f"  {scenario.name} FAILED:\n{result.error}", file=log)
    finally:
        if not keep:
            scenario.teardown(ctx)
    result.sides = {side: SideSummary(rs, scenario.unit) for side, rs in per_side.items() if rs}
    return result
