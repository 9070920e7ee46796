"""Trace points at every layer boundary, named like QEMU's (trace-events files).

A module declares its points once (``_t_read = trace.point("bdrv_co_preadv")``) and guards each
call with ``if _t_read.enabled:`` so a disabled point costs one attribute load.  Points are
enabled by glob pattern (``--trace 'bdrv_co_*'``, ``--trace events=FILE``) and written as QEMU's
log lines (``PID@SEC.USEC:name key value ...``) or as JSON lines.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

Sink = Callable[[str, dict[str, Any]], None]


class TracePoint:
    """One named trace point; ``enabled`` is kept in sync with the active patterns."""

    __slots__ = ("name", "enabled")

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = False

    def __call__(self, **fields: Any) -> None:
        if self.enabled:
            for sink in _sinks:
                sink(self.name, fields)


_points: dict[str, TracePoint] = {}
_patterns: list[tuple[str, bool]] = []
_sinks: list[Sink] = []
_files: list[TextIO] = []  # opened by configure(file=...), closed by reset()


def point(name: str) -> TracePoint:
    """Return the trace point called ``name``, registering it on first use."""
    tp = _points.get(name)
    if tp is None:
        tp = _points[name] = TracePoint(name)
        tp.enabled = bool(_sinks) and _is_enabled(name)
    return tp


def known_points() -> list[str]:
    """Names of every registered trace point, sorted."""
    return sorted(_points)


def _is_enabled(name: str) -> bool:
    enabled = False
    for pattern, on in _patterns:  # later patterns win, like QEMU's -trace "-name"
        if fnmatch.fnmatchcase(name, pattern):
            enabled = on
    return enabled


def _refresh() -> None:
    active = bool(_sinks)
    for tp in _points.values():
        tp.enabled = active and _is_enabled(tp.name)


def enable(pattern: str) -> None:
    """Enable every point matching the glob ``pattern`` (a leading '-' disables)."""
    if pattern.startswith("-"):
        _patterns.append((pattern[1:], False))
    else:
        _patterns.append((pattern, True))
    _refresh()


def reset() -> None:
    """Disable every point, drop every sink and close the trace files."""
    _patterns.clear()
    _sinks.clear()
    _refresh()
    while _files:
        _files.pop().close()


def log_sink(stream: TextIO) -> Sink:
    """A sink writing QEMU's log-backend lines: ``PID@SEC.USEC:name key value ...``."""
    pid = os.getpid()

    def write(name: str, fields: dict[str, Any]) -> None:
        now = time.time()
        body = " ".join(f"{k} {v}" for k, v in fields.items())
        stream.write(f"{pid}@{now:.6f}:{name} {body}\n")

    return write


def json_sink(stream: TextIO) -> Sink:
    """A sink writing one JSON object per event: ``{"ts": ..., "event": name, ...fields}``."""

    def write(name: str, fields: dict[str, Any]) -> None:
        record = {"ts": time.time(), "event": name}
        record.update({k: v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
                       for k, v in fields.items()})
        stream.write(json.dumps(record) + "\n")

    return write


def add_sink(sink: Sink) -> None:
    """Send enabled events to ``sink`` as well."""
    _sinks.append(sink)
    _refresh()


def has_sinks() -> bool:
    """Whether any output is configured."""
    return bool(_sinks)


def remove_sink(sink: Sink) -> None:
    _sinks.remove(sink)
    _refresh()


def configure(option: str, *, json_output: bool = False, stream: TextIO | None = None) -> None:
    """Apply one QEMU ``--trace`` argument: ``[enable=]PATTERN``, ``events=FILE``, ``file=FILE``.

    The events file holds one pattern per line; '#' starts a comment (QEMU's trace/control.c).
    qblock adds ``format=log|json`` to choose the output form.
    """
    parts = option.split(",")
    target = stream
    patterns: list[str] = []
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            patterns.append(part)
        elif key == "enable":
            patterns.append(value)
        elif key == "events":
            with open(value, encoding="utf-8") as f:
                for line in f:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        patterns.append(line)
        elif key == "format" and value in ("log", "json"):
            json_output = value == "json"
        elif key == "file":
            target = open(value, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            _files.append(target)
        else:
            raise ValueError(f"Invalid parameter '{key}'")
    if not _sinks:
        out = target or sys.stderr
        add_sink(json_sink(out) if json_output else log_sink(out))
    for p in patterns:
        enable(p)


@contextlib.contextmanager
def capture(*patterns: str) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Record events of the points matching ``patterns`` into a list (for tests and tools)."""
    records: list[tuple[str, dict[str, Any]]] = []

    def sink(name: str, fields: dict[str, Any]) -> None:
        records.append((name, dict(fields)))

    saved = list(_patterns)
    _patterns.clear()
    _patterns.extend((p, True) for p in patterns)
    add_sink(sink)
    try:
        yield records
    finally:
        remove_sink(sink)
        _patterns.clear()
        _patterns.extend(saved)
        _refresh()
