"""QMP events: one bus that timestamps an event and hands it to every negotiated session."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Listener = Callable[[dict[str, Any]], None]


class EventBus:
    """Fan-out of events (monitor/monitor.c monitor_qapi_event_emit)."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send ``{"timestamp": ..., "event": name, "data": data}`` (data left out when None)."""
        now = time.time()
        event: dict[str, Any] = {"timestamp": {"seconds": int(now),
                                               "microseconds": int(now * 1e6) % 1_000_000},
                                 "event": name}
        if data is not None:
            event["data"] = data
        for listener in list(self.listeners):
            listener(event)
