"""``qblock nbd IMAGE``: qemu-nbd's server mode (qemu-nbd.c).

Serves one image over NBD on a unix socket (-k) or TCP (-b/-p, default 0.0.0.0:10809).  Like
qemu-nbd, it serves one client at a time unless -e says otherwise, and exits when the last
client disconnects unless -t (persistent) is given.
"""
from __future__ import annotations

import asyncio
import getopt
import os
import signal
import sys

from qblock.block.node import close_node
from qblock.api import image_options
from qblock.block.open import open_node
from qblock.errors import InvalidArgument, QBlockError
from qblock.exports.nbd import tls
from qblock.exports.nbd.server import Export, NbdServer, find_chain_bitmap
from qblock.keyval import parse_keyval

PROG = "qblock nbd"

HELP = f"""\
Usage: {PROG} [OPTIONS] FILE
Exports a QEMU disk image using the NBD protocol.

  -h, --help                display this help and exit
  -p, --port=PORT           port to listen on (default '10809')
  -b, --bind=IFACE          interface to bind to (default '0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -x, --export-name=NAME    expose export by name (default is empty string)
  -B, --bitmap=NAME         expose a persistent dirty bitmap
  -D, --description=TEXT    export a human-readable description
  -r, --read-only           export read-only
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
      --object type,id=ID,...  define an object such as 'tls-creds-x509'
      --tls-creds=ID        use id of an earlier --object to provide TLS
      --fork                fork off the server process and exit the parent
                            once the server is running
"""

_SHORT = "hp:b:k:e:tx:D:rf:B:"
_LONG = ["help", "port=", "bind=", "socket=", "shared=", "persistent", "export-name=",
         "description=", "read-only", "format=", "fork", "bitmap=", "object=", "tls-creds="]


async def serve(image: str, opts: dict[str, str], ready_fd: int | None,
                bitmaps: list[str] | None = None) -> int:
    """Open the image, export it (with the dirty ``bitmaps`` named by -B), serve until done;
    the exit status."""
    read_only = "read-only" in opts
    shared = int(opts.get("shared", "1"))
    node = await open_node(image_options(image, driver=opts.get("format")), read_only=read_only,
                           implicit=True)
    tls_ctx = tls.lookup(opts["tls-creds"]) if "tls-creds" in opts else None
    server = NbdServer(max_connections=shared, handshake_max_seconds=0, tls=tls_ctx)
    try:
        found = [find_chain_bitmap(node, name, not read_only) for name in bitmaps or []]
        server.add_export(Export("", node, opts.get("export-name", ""), writable=not read_only,
                                 description=opts.get("description"),
                                 multi_conn=shared != 1, bitmaps=found))
        if "socket" in opts:
            await server.listen({"type": "unix", "path": opts["socket"]})
        else:
            await server.listen({"type": "inet", "host": opts.get("bind", "0.0.0.0"),
                                 "port": opts.get("port", "10809")})
        if ready_fd is not None:
            _detach(ready_fd)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await _wait(server, stop, persistent="persistent" in opts)
    finally:
        await server.close()
        await close_node(node)
    return 0


def _add_object(text: str) -> None:
    """``--object tls-creds-x509,id=ID,dir=DIR,endpoint=server`` (the only type served)."""
    props = parse_keyval(text, "qom-type")
    if props.get("qom-type") != "tls-creds-x509":
        raise InvalidArgument(f"Parameter 'qom-type' does not accept value "
                              f"'{props.get('qom-type')}'")
    tls.add_object(props)


def _detach(ready_fd: int) -> None:
    """--fork: release the waiting parent, let go of its stdio (qemu-nbd.c nbd_client_thread)."""
    os.write(ready_fd, b"\0")
    os.close(ready_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    os.close(devnull)


async def _wait(server: NbdServer, stop: asyncio.Event, persistent: bool) -> None:
    """Until a signal or, unless persistent, the last client has gone (qemu-nbd.c
    nbd_client_closed: nb_fds back to 0)."""
    while not stop.is_set():
        if not persistent and server.accepted and not server.connections:
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass


def main(argv: list[str]) -> int:
    try:
        pairs, args = getopt.gnu_getopt(argv, _SHORT, _LONG)
    except getopt.GetoptError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    names = {"h": "help", "p": "port", "b": "bind", "k": "socket", "e": "shared",
             "t": "persistent", "x": "export-name", "D": "description", "r": "read-only",
             "f": "format"}
    opts = {names.get(k.lstrip("-"), k.lstrip("-")): v for k, v in pairs}
    bitmaps = [v for k, v in pairs if k in ("-B", "--bitmap")]
    try:
        for k, v in pairs:
            if k == "--object":
                _add_object(v)
    except QBlockError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if "help" in opts:
        print(HELP, end="")
        return 0
    if len(args) != 1:
        print(f"{PROG}: Expected exactly one image file (got {len(args)})", file=sys.stderr)
        return 1
    ready_fd = None
    if "fork" in opts:
        rfd, wfd = os.pipe()
        if os.fork() > 0:
            os.close(wfd)
            return 0 if os.read(rfd, 1) == b"\0" else 1
        os.close(rfd)
        os.setsid()
        ready_fd = wfd
    try:
        return asyncio.run(serve(args[0], opts, ready_fd, bitmaps))
    except (QBlockError, OSError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
