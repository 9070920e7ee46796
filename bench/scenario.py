"""What a benchmark scenario is, and the registry that holds them.

A scenario is declarative: a name, a description, the unit its throughput is given in, and
callables that create its files, run the qblock side, run the QEMU side and clean up.  The
runner owns rounds, ordering, timing statistics and reporting; a scenario only does one run.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20


@dataclass
class Measurement:
    """One timed run of one side.

    ``seconds`` is the wall time of everything the run did, start-up of every process
    included; ``invocations`` is how many processes that took (the runner subtracts that many
    measured start-ups); ``amount`` is bytes moved (unit MiB/s) or operations done (IOPS).
    """

    seconds: float
    amount: int
    invocations: int = 1
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Where a scenario works: its own directory, the requested size, and what setup made."""

    dir: Path
    size: int
    files: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[Context], Measurement]
StartupRunner = Callable[[Context], float]


def _remove_dir(ctx: Context) -> None:
    shutil.rmtree(ctx.dir, ignore_errors=True)


@dataclass(frozen=True)
class Scenario:
    """A side-by-side benchmark of qblock against a QEMU tool doing the same work.

    ``startup_qblock``/``startup_qemu`` time a run of the same processes doing no work (open
    and close only); when given, the runner reports times net of start-up and says so.
    """

    name: str
    description: str
    unit: str  # "MiB/s" (amount = bytes) or "IOPS" (amount = operations)
    setup: Callable[[Context], None]
    run_qblock: Runner
    run_qemu: Runner
    startup_qblock: StartupRunner | None = None
    startup_qemu: StartupRunner | None = None
    teardown: Callable[[Context], None] = _remove_dir
    # Before each timed run: os.sync(), a pause of this many seconds, the inputs read through
    # again (bench/README.md, "Settling"); ``--settle`` overrides it.
    settle: float = 0.0
    # After settling: touch and release this many times ``--size`` of anonymous memory (at
    # most half of what is free), so that the run's page cache grows in memory the host
    # backs, as on bare metal (README, "Backed memory").
    back_memory: float = 0.0

    def __post_init__(self) -> None:
        if self.unit not in ("MiB/s", "IOPS"):
            raise ValueError(f"scenario {self.name}: unit must be 'MiB/s' or 'IOPS'")


def command_scenario(name: str, description: str, *, setup: Callable[[Context], None],
                     run: Callable[[str, Context], float],
                     startup: Callable[[str, Context], float]) -> Scenario:
    """A MiB/s scenario whose two sides run the same command line over the guest size.

    ``run(side, ctx)`` and ``startup(side, ctx)`` (side "qblock" or "qemu") return the wall
    seconds of the real work and of the same command doing none.
    """
    def runner(side: str) -> Runner:
        return lambda ctx: Measurement(run(side, ctx), ctx.size, detail={"bytes": ctx.size})

    def starter(side: str) -> StartupRunner:
        return lambda ctx: startup(side, ctx)

    return Scenario(name=name, description=description, unit="MiB/s", setup=setup,
                    run_qblock=runner("qblock"), run_qemu=runner("qemu"),
                    startup_qblock=starter("qblock"), startup_qemu=starter("qemu"))


REGISTRY: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    """Add a scenario to the registry (names are unique)."""
    if scenario.name in REGISTRY:
        raise ValueError(f"scenario '{scenario.name}' is registered twice")
    REGISTRY[scenario.name] = scenario
    return scenario
