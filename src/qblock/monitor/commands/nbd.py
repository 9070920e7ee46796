"""NBD server and block export commands (qapi/block-export.json, blockdev-nbd.c,
block/export/export.c; QEMU 7.2 messages, REFERENCE §4.7).

The daemon's ``--nbd-server`` and ``--export`` options call :func:`server_start` and
:func:`export_add` with the same arguments as the QMP commands.
"""
from __future__ import annotations

from typing import Any

from qblock.block.node import registry
from qblock.errors import InvalidArgument, QBlockError
from qblock.exports.nbd import server as nbd
from qblock.exports.nbd import tls
from qblock.keyval import parse_option_arg, to_bool
from qblock.monitor.context import BlockState, CommandContext
from qblock.monitor.commands.bitmap import MERGE_SOURCE, lookup as lookup_bitmap
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, Enum, ListOf, QapiType, Struct, opt, req

_INET = Struct("InetSocketAddress", {"host": req(STR), "port": req(STR), "numeric": opt(BOOL),
                                     "to": opt(INT), "ipv4": opt(BOOL), "ipv6": opt(BOOL)})
_UNIX = Struct("UnixSocketAddress", {"path": req(STR), "abstract": opt(BOOL),
                                     "tight": opt(BOOL)})
_ADDR_TYPES = {"inet": _INET, "unix": _UNIX}


class SocketAddress(QapiType):
    """SocketAddressLegacy ``{type, data}`` (QMP) or flat SocketAddress (``--nbd-server``)."""

    json_type = "object"

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy
        self.name = "SocketAddressLegacy" if legacy else "SocketAddress"
        self.tag = Enum("SocketAddressType", list(_ADDR_TYPES))

    def visit(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path)
        if "type" not in value:
            raise InvalidArgument(f"Parameter '{path}.type' is missing")
        kind = self.tag.visit(value["type"], f"{path}.type")
        if self.legacy:
            Struct(self.name, {"type": req(self.tag), "data": req(_ADDR_TYPES[kind])}).visit(
                value, path)
            return {"type": kind, **value["data"]}
        members = {"type": req(self.tag), **_ADDR_TYPES[kind].members}
        return Struct(self.name, members).visit(value, path)

    def schema_info(self) -> dict[str, Any]:
        return {"name": self.name, "meta-type": "object",
                "members": [{"name": "type", "type": "SocketAddressType"}]}


_SERVER_ARGS = {"max-connections": opt(INT), "handshake-max-seconds": opt(INT),
                "tls-creds": opt(STR)}
_EXPORT_ARGS = {"type": req(Enum("BlockExportType", ["nbd"])), "id": req(STR),
                "node-name": req(STR), "writable": opt(BOOL), "writethrough": opt(BOOL),
                "iothread": opt(STR), "fixed-iothread": opt(BOOL), "name": opt(STR),
                "description": opt(STR), "allocation-depth": opt(BOOL),
                "bitmaps": opt(ListOf(MERGE_SOURCE))}
EXPORT_OPTIONS = Struct("BlockExportOptions", _EXPORT_ARGS)
SERVER_OPTIONS = Struct("NbdServerOptions", {"addr": req(SocketAddress(legacy=False)),
                                             **_SERVER_ARGS})


async def server_start(addr: dict[str, Any], args: dict[str, Any]) -> None:
    """nbd_server_start(): one server per process."""
    if nbd.current() is not None:
        raise QBlockError("NBD server already running")
    tls_ctx = tls.lookup(args["tls-creds"]) if "tls-creds" in args else None
    server = nbd.NbdServer(args.get("max-connections", 100),
                           args.get("handshake-max-seconds", 10), tls=tls_ctx)
    await server.listen(addr)
    nbd.set_current(server)


async def server_stop(state: BlockState) -> None:
    """Close every NBD export (BLOCK_EXPORT_DELETED each) and the server."""
    server = nbd.current()
    if server is None:
        raise QBlockError("NBD server not running")
    nbd.set_current(None)
    for export in await server.close():
        _forget(state, export)


async def export_add(state: BlockState, args: dict[str, Any]) -> None:
    """blk_exp_add() + nbd_export_create(), checks in QEMU's order."""
    export_id = args["id"]
    if export_id in state.exports:
        raise QBlockError(f"Block export id '{export_id}' is already in use")
    node = registry.find(args["node-name"])
    writable = args.get("writable", False)
    if writable and node.read_only:
        raise QBlockError("Cannot export read-only node as writable")
    server = nbd.current()
    if server is None:
        raise QBlockError("NBD server not running")
    name = args.get("name", args["node-name"])
    if len(name.encode()) > 4096:
        raise QBlockError(f"export name '{name}' too long")
    if name in server.exports:
        raise QBlockError(f"NBD server already has export named '{name}'")
    bitmaps = [nbd.find_chain_bitmap(node, ref, writable) if isinstance(ref, str)
               else lookup_bitmap(ref["node"], ref["name"])[1]
               for ref in args.get("bitmaps", [])]
    export = nbd.Export(export_id, node, name, writable=writable,
                        description=args.get("description"),
                        allocation_depth=args.get("allocation-depth", False),
                        multi_conn=server.max_connections != 1, bitmaps=bitmaps)
    server.add_export(export)
    state.exports[export_id] = export
    state.backends.append(export.backend)


async def export_del(state: BlockState, export: nbd.Export, mode: str) -> None:
    server = nbd.current()
    assert server is not None
    await server.remove_export(export, hard=mode == "hard")
    _forget(state, export)


def _forget(state: BlockState, export: nbd.Export) -> None:
    state.exports.pop(export.id, None)
    if export.backend in state.backends:
        state.backends.remove(export.backend)
    state.events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})


def _typed(opts: dict[str, Any], schema: Struct) -> dict[str, Any]:
    """Keyval strings converted to the member types of ``schema`` (qobject keyval visitor)."""
    out = dict(opts)
    for key, member in schema.members.items():
        value = out.get(key)
        if not isinstance(value, str):
            continue
        if member.type is BOOL:
            out[key] = to_bool(value, key)
        elif member.type is INT:
            try:
                out[key] = int(value)
            except ValueError:
                raise InvalidArgument(f"Parameter '{key}' expects an integer") from None
    return out


async def server_start_option(text: str) -> None:
    """``--nbd-server addr.type=unix,addr.path=P[,max-connections=N]`` (NbdServerOptions)."""
    args = SERVER_OPTIONS.visit(_typed(parse_option_arg(text), SERVER_OPTIONS), "")
    await server_start(args["addr"], args)


async def export_option(state: BlockState, text: str) -> None:
    """``--export [type=]nbd,id=ID,node-name=N[,name=X][,writable=on]`` (BlockExportOptions)."""
    opts = _typed(parse_option_arg(text, "type"), EXPORT_OPTIONS)
    await export_add(state, EXPORT_OPTIONS.visit(opts, ""))


async def shutdown(state: BlockState) -> None:
    """Daemon exit: stop the server if one runs."""
    if nbd.current() is not None:
        await server_stop(state)


@command("nbd-server-start", {"addr": req(SocketAddress(legacy=True)), **_SERVER_ARGS})
async def nbd_server_start(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    await server_start(args["addr"], args)
    return {}


@command("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    await server_stop(ctx.state)
    return {}


@command("block-export-add", EXPORT_OPTIONS, boxed=True)
async def block_export_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    await export_add(ctx.state, args)
    return {}


_MODE = Enum("BlockExportRemoveMode", ["safe", "hard"])


@command("block-export-del", {"id": req(STR), "mode": opt(_MODE)})
async def block_export_del(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    export = ctx.state.exports.get(args["id"])
    if export is None:
        raise QBlockError(f"Export '{args['id']}' is not found")
    await export_del(ctx.state, export, args.get("mode", "safe"))
    return {}


@command("query-block-exports")
async def query_block_exports(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    """Newest first: export.c keeps block_exports with QLIST_INSERT_HEAD."""
    return [{"id": e.id, "type": "nbd", "node-name": e.node_name,
             "shutting-down": e.shutting_down} for e in reversed(ctx.state.exports.values())]


@command("nbd-server-add", {"device": req(STR), "name": opt(STR), "description": opt(STR),
                            "writable": opt(BOOL), "bitmap": opt(STR)})
async def nbd_server_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Deprecated: block-export-add with id = name (default: device); ``bitmap`` is
    ``bitmaps: [bitmap]``."""
    name = args.get("name", args["device"])
    options = {"type": "nbd", "id": name, "node-name": args["device"], "name": name,
               "writable": args.get("writable", False)}
    if "description" in args:
        options["description"] = args["description"]
    if "bitmap" in args:
        options["bitmaps"] = [args["bitmap"]]
    await export_add(ctx.state, options)
    return {}


@command("nbd-server-remove", {"name": req(STR), "mode": opt(_MODE)})
async def nbd_server_remove(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Deprecated: block-export-del of the NBD export with this name."""
    server = nbd.current()
    export = server.exports.get(args["name"]) if server is not None else None
    if export is None:
        raise QBlockError(f"Export '{args['name']}' is not found")
    await export_del(ctx.state, export, args.get("mode", "safe"))
    return {}
