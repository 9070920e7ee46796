"""``qblock ctl jobs``: the jobs of a running daemon as a table, or watched until they end.

The table joins query-jobs (id, type, status, progress) with query-block-jobs (speed, by
``device``, which is the job id).  ``--watch`` subscribes to the monitor's events and polls
query-jobs every ``--interval`` seconds for progress; it prints each state change
(JOB_STATUS_CHANGE) and each BLOCK_JOB_READY / COMPLETED / CANCELLED / ERROR event as it
arrives, and exits once every watched job has reached ``null`` or stays ``concluded``.  On a
terminal each job gets a rich progress bar; otherwise one plain line per state change or
progress step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

from qemu.qmp import QMPClient, QMPError

TIMEOUT = 30.0
FINAL = ("concluded", "null")
BLOCK_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                "BLOCK_JOB_ERROR")
HEADER = ("ID", "TYPE", "STATUS", "PROGRESS", "SPEED")


class JobsError(Exception):
    """A connection or QMP failure, reported by ``qblock ctl`` with exit status 1."""


@dataclasses.dataclass
class JobRow:
    """One job as query-jobs and query-block-jobs describe it."""

    id: str
    type: str
    status: str
    current: int
    total: int
    speed: int | None

    def progress(self) -> str:
        pct = f" ({100.0 * self.current / self.total:.1f}%)" if self.total else ""
        return f"{self.current}/{self.total}{pct}"


def rows(jobs: list[dict[str, Any]], block_jobs: list[dict[str, Any]]) -> list[JobRow]:
    """Join the two query replies by job id (a block job's ``device`` is its job id)."""
    speeds = {b["device"]: b.get("speed") for b in block_jobs}
    return [JobRow(j["id"], j["type"], j["status"], j.get("current-progress", 0),
                   j.get("total-progress", 0), speeds.get(j["id"])) for j in jobs]


def format_table(table: list[JobRow]) -> list[str]:
    """Aligned columns; ``-`` for the speed of a job that is not a block job."""
    cells = [HEADER] + [(r.id, r.type, r.status, r.progress(),
                         "-" if r.speed is None else str(r.speed)) for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


async def _connect(address: str | tuple[str, int]) -> QMPClient:
    client = QMPClient("qblock-ctl-jobs")
    try:
        await asyncio.wait_for(client.connect(address), TIMEOUT)
    except (QMPError, OSError, asyncio.TimeoutError) as e:
        raise JobsError(f"cannot connect to {address}: {e}") from e
    return client


async def _query(client: QMPClient) -> list[JobRow]:
    jobs = await asyncio.wait_for(client.execute("query-jobs"), TIMEOUT)
    block_jobs = await asyncio.wait_for(client.execute("query-block-jobs"), TIMEOUT)
    return rows(jobs, block_jobs)


def _describe(event: dict[str, Any]) -> tuple[str | None, str]:
    """The job an event is about and a one-line account of it."""
    data = event.get("data", {})
    if event["event"] == "JOB_STATUS_CHANGE":
        return data.get("id"), f"status {data.get('status')}"
    job = data.get("device")
    extra = [f"{k}={data[k]}" for k in ("len", "offset", "speed", "operation", "action", "error")
             if k in data]
    return job, " ".join([event["event"], *extra])


class PlainView:
    """One line per state change or progress step, for pipes and logs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.flush()

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def event(self, job: str, text: str) -> None:
        self._line(f"{job}: {text}")

    def progress(self, row: JobRow) -> None:
        step = (row.current, row.total)
        if self.shown.get(row.id) != step:
            self.shown[row.id] = step
            speed = "" if row.speed is None else f" speed {row.speed}"
            self._line(f"{row.id}: progress {row.progress()}{speed}")


class RichView:
    """A rich progress bar per job; events are printed above the bars."""

    def __init__(self) -> None:
        # imported here: only a terminal needs rich, and pipes keep working without it
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                                   TransferSpeedColumn)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             TaskProgressColumn(), TransferSpeedColumn(),
                             TextColumn("{task.fields[status]}"))
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichView:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def event(self, job: str, text: str) -> None:
        self.bars.console.print(f"{job}: {text}")
        if job in self.tasks and text.startswith("status "):
            self.bars.update(self.tasks[job], status=text[len("status "):])

    def progress(self, row: JobRow) -> None:
        if row.id not in self.tasks:
            self.tasks[row.id] = self.bars.add_task(f"{row.id} ({row.type})",
                                                    total=row.total or None, status=row.status)
        self.bars.update(self.tasks[row.id], completed=row.current, total=row.total or None)


async def watch(client: QMPClient, interval: float, view: PlainView | RichView) -> None:
    """Follow every job present now until each one is gone (null) or stays concluded.

    A job that concludes with auto-dismiss goes on to null at once; one without it stays
    concluded, which the next poll of query-jobs confirms.
    """
    listener = client.events
    listener.clear()  # what happened before the first query is in its reply
    watched: dict[str, str] = {}
    last: dict[str, JobRow] = {}
    for row in await _query(client):
        watched[row.id] = row.status
        last[row.id] = row
        view.event(row.id, f"{row.type} status {row.status}")
        view.progress(row)
    if not watched:
        view.event("-", "no jobs")
        return
    ended: set[str] = {job for job, status in watched.items() if status in FINAL}

    def on_event(event: dict[str, Any]) -> None:
        job, text = _describe(event)
        if job not in watched or not (event["event"] == "JOB_STATUS_CHANGE"
                                      or event["event"] in BLOCK_EVENTS):
            return
        data = event.get("data", {})
        if event["event"] == "BLOCK_JOB_COMPLETED" and "len" in data:
            last[job] = dataclasses.replace(last[job], current=data["offset"], total=data["len"])
            view.progress(last[job])
        view.event(job, text)
        if event["event"] == "JOB_STATUS_CHANGE":
            watched[job] = data["status"]
            if watched[job] == "null":
                ended.add(job)

    loop = asyncio.get_running_loop()
    next_poll = loop.time() + interval
    while len(ended) < len(watched):
        try:
            event = await asyncio.wait_for(listener.get(), max(0.0, next_poll - loop.time()))
        except asyncio.TimeoutError:
            event = None
        if event is not None:
            on_event(event)
            continue
        next_poll = loop.time() + interval
        current = {r.id: r for r in await _query(client)}
        # the events sent before the reply are queued by now: shown first, in their order,
        # so that a poll never reports a job ended before the events that ended it
        while not listener.empty():
            on_event(await listener.get())
        for job in set(watched) - ended:
            if job not in current:
                view.event(job, "gone")
                ended.add(job)
                continue
            last[job] = current[job]
            view.progress(current[job])
            if current[job].status == "concluded":
                ended.add(job)


async def _run(address: str | tuple[str, int], follow: bool, interval: float,
               make_view: Callable[[], PlainView | RichView]) -> list[str]:
    client = await _connect(address)
    try:
        if not follow:
            return format_table(await _query(client))
        with make_view() as view:
            await watch(client, interval, view)
        return []
    except (QMPError, asyncio.TimeoutError) as e:
        raise JobsError(f"{address}: {e}") from e
    finally:
        await client.disconnect()


def run(address: str | tuple[str, int], follow: bool, interval: float) -> int:
    """List the jobs (print the table), or watch them until they end; the exit status."""
    def make_view() -> PlainView | RichView:
        return RichView() if sys.stdout.isatty() else PlainView(sys.stdout)

    try:
        lines = asyncio.run(_run(address, follow, interval, make_view))
    except KeyboardInterrupt:
        return 130
    if lines:
        print("\n".join(lines))
    return 0
