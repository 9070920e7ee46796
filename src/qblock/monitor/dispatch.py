"""Turn one parsed QMP request into its reply (qapi/qmp-dispatch.c, monitor/qmp.c).

Checks the request object with QEMU's messages, looks the command up in the one registry,
validates the arguments against its schema, runs the handler and maps errors to
``{"error": {"class", "desc"}}``.  ``id`` is echoed verbatim whenever the request was an object.
"""
from __future__ import annotations

import logging
from typing import Any

from qblock.errors import QBlockError
from qblock.monitor import registry
from qblock.monitor.context import BlockState, CommandContext
from qblock.monitor.protocol import QmpConnection, Request
from qblock.qobject import qdict_order

log = logging.getLogger(__name__)

_MISSING = object()


class CommandNotFound(QBlockError):
    """QMP CommandNotFound: unknown command, or one not available in this mode."""

    qmp_class = "CommandNotFound"


def error_reply(exc: QBlockError) -> dict[str, Any]:
    """monitor/qmp.c qmp_error_response()."""
    return {"error": {"class": exc.qmp_class, "desc": str(exc)}}


def check_request(request: dict[str, Any], allow_oob: bool) -> tuple[str, bool]:
    """qmp-dispatch.c qmp_dispatch_check_obj(): returns (command name, is exec-oob).

    Members are checked in QDict order, as QEMU walks them, so the same member is blamed.
    """
    exec_key = None
    for key in qdict_order(list(request)):
        value = request[key]
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise QBlockError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise QBlockError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QBlockError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QBlockError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise QBlockError("QMP input lacks member 'execute'")
    return request[exec_key], exec_key == "exec-oob"


async def _execute(state: BlockState, session: QmpConnection, request: dict[str, Any]) -> Any:
    name, oob = check_request(request, session.oob_enabled)
    cmd = registry.lookup(name)
    if cmd is None or (not session.negotiated and name != "qmp_capabilities"):
        raise CommandNotFound(f"The command {name} has not been found")
    if oob and not cmd.allow_oob:
        raise QBlockError(f"The command {name} does not support OOB")
    args = cmd.args.visit(request.get("arguments", {}), "")
    result = await cmd.handler(CommandContext(state, session), args)
    return {} if result is None else result


async def dispatch(state: BlockState, session: QmpConnection, req: Request) -> dict[str, Any]:
    """The reply to one request: ``{"return": ...}`` or ``{"error": ...}``, with its ``id``."""
    if req.error is not None:
        return {"error": {"class": "GenericError", "desc": req.error}}
    if not isinstance(req.value, dict):
        return error_reply(QBlockError("QMP input must be a JSON object"))
    request_id = req.value.get("id", _MISSING)
    try:
        reply: dict[str, Any] = {"return": await _execute(state, session, req.value)}
    except QBlockError as exc:
        if not session.negotiated and exc.qmp_class == "CommandNotFound":
            # monitor/qmp.c monitor_qmp_dispatch(): "Provide a more useful error message"
            exc = CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        reply = error_reply(exc)
    except Exception as exc:  # a bug in a handler must not take the monitor down
        log.exception("QMP command failed unexpectedly")
        reply = {"error": {"class": "GenericError", "desc": str(exc) or type(exc).__name__}}
    if request_id is not _MISSING:
        reply["id"] = request_id
    return reply
