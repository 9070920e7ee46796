"""QMP commands run in-process through the real dispatcher, for unit tests of command handlers.

No socket: a negotiated session object and ``qblock.monitor.dispatch.dispatch``, so validation,
error classes and replies are exactly what a client would get.
"""
from __future__ import annotations

from typing import Any

from qblock.monitor import commands  # noqa: F401  (registers every command)
from qblock.monitor.context import BlockState
from qblock.monitor.dispatch import dispatch
from qblock.monitor.protocol import QmpConnection, Request


async def execute(state: BlockState, name: str,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reply (``return`` or ``error``) to one command on a negotiated session."""
    session = QmpConnection()
    session.negotiated = True
    request: dict[str, Any] = {"execute": name}
    if args is not None:
        request["arguments"] = args
    return await dispatch(state, session, Request(request))


class Monitor:
    """A BlockState whose events are collected, with helpers to run commands on it."""

    def __init__(self) -> None:
        self.state = BlockState()
        self.events: list[dict[str, Any]] = []
        self.state.events.subscribe(self.events.append)

    async def q(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return await execute(self.state, name, args)

    async def ok(self, name: str, args: dict[str, Any] | None = None) -> Any:
        reply = await self.q(name, args)
        assert "return" in reply, reply
        return reply["return"]
