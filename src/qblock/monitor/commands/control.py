"""Control commands (qapi/control.json): qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit.

qblock reports QEMU version 7.2.0, the QMP dialect it speaks (the replies are checked against
qemu-storage-daemon 7.2), with package "qblock <version>" so clients can tell it apart.
"""
from __future__ import annotations

from typing import Any

from qblock import __version__
from qblock.monitor import registry
from qblock.monitor.context import CommandContext
from qblock.monitor.dispatch import CommandNotFound
from qblock.monitor.protocol import Version
from qblock.monitor.registry import command
from qblock.monitor.schema import Enum, ListOf, opt

VERSION = Version(7, 2, 0, f"qblock {__version__}")

QMP_CAPABILITY = Enum("QMPCapability", ["oob"])


@command("qmp_capabilities", {"enable": opt(ListOf(QMP_CAPABILITY))})
async def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Leave capabilities-negotiation mode, enabling the listed capabilities."""
    if ctx.session.negotiated:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    ctx.session.accept_capabilities(args.get("enable", []))


@command("query-version")
async def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"qemu": {"major": VERSION.major, "minor": VERSION.minor, "micro": VERSION.micro},
            "package": VERSION.package}


@command("query-commands")
async def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    # QEMU lists the most recently registered command first (qmp_query_commands prepends).
    return [{"name": name} for name in reversed(registry.COMMANDS)]


@command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return registry.schema_infos()


@command("quit")
async def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Ask the daemon to shut down cleanly once this reply is sent."""
    ctx.state.quit_requested = True
