"""``qblock ctl``: a client for people, talking QMP to ``qblock daemon`` or qemu-storage-daemon.

Sub-commands:
  domblkinfo NODE   virsh domblkinfo's Capacity/Allocation/Physical, computed as libvirt does
                    (ctl_blkinfo), from a running daemon or an offline image (--offline IMAGE)
  graph             the block graph as text, DOT, SVG or PNG (ctl_graph), live or from a saved
                    x-debug-query-block-graph reply (--json FILE)
  jobs              query-jobs / query-block-jobs as a table; --watch follows them (ctl_jobs)
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import graphviz
from qemu.qmp import ExecuteError, QMPClient, QMPError

from qblock.cli import ctl_blkinfo, ctl_graph, ctl_jobs
from qblock.errors import QBlockError

PROG = "qblock ctl"
TIMEOUT = 30.0


class CtlError(Exception):
    """A failure to report as ``qblock ctl: message`` with exit status 1."""


def _address(args: argparse.Namespace) -> str | tuple[str, int]:
    if args.socket:
        return str(args.socket)
    host, sep, port = args.tcp.rpartition(":")
    if not sep or not port.isdigit():
        raise CtlError(f"invalid --tcp address '{args.tcp}', expected HOST:PORT")
    return (host.strip("[]") or "localhost", int(port))


@dataclasses.dataclass
class Session:
    """Replies of one QMP session, and the daemon's working directory when it can be known."""

    replies: list[Any]
    peer_cwd: str | None


def _connect_unix(path: str) -> tuple[socket.socket, str | None]:
    """Connect to a unix socket; find the peer's cwd via SO_PEERCRED and /proc/PID/cwd.

    The daemon resolves relative filenames (``filename=test01.qcow2``) against its own working
    directory, so stat() of such a source must too.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        cwd: str | None = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, AttributeError):
        cwd = None
    return sock, cwd


async def _query_async(address: str | tuple[str, int],
                       commands: Sequence[tuple[str, dict[str, Any] | None, bool]]) -> Session:
    """Run ``(command, arguments, optional)`` in order; an optional command that fails -> None."""
    client = QMPClient("qblock-ctl")
    cwd = None
    try:
        if isinstance(address, str):
            sock, cwd = _connect_unix(address)
            await asyncio.wait_for(client.connect(sock), TIMEOUT)
        else:
            await asyncio.wait_for(client.connect(address), TIMEOUT)
    except (QMPError, OSError, asyncio.TimeoutError) as e:
        raise CtlError(f"cannot connect to {address}: {e}") from e
    try:
        replies = []
        for name, arguments, optional in commands:
            try:
                replies.append(await asyncio.wait_for(client.execute(name, arguments), TIMEOUT))
            except ExecuteError as e:
                if not optional:
                    raise CtlError(f"{name}: {e}") from e
                replies.append(None)
        return Session(replies, cwd)
    except (QMPError, asyncio.TimeoutError) as e:
        raise CtlError(f"{address}: {e}") from e
    finally:
        await client.disconnect()


def query(address: str | tuple[str, int],
          commands: Sequence[tuple[str, dict[str, Any] | None, bool]]) -> Session:
    """Connect, negotiate capabilities, run ``commands``, disconnect; the replies in order."""
    return asyncio.run(_query_async(address, commands))


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CtlError(f"cannot read '{path}': {e}") from e


# -- domblkinfo -------------------------------------------------------------------------------

def domblkinfo(args: argparse.Namespace) -> int:
    if args.offline:
        try:
            info = ctl_blkinfo.offline_block_info(args.offline, args.format)
        except (OSError, QBlockError) as e:
            raise CtlError(f"{args.offline}: {e}") from e
    else:
        if not args.node:
            raise CtlError("domblkinfo needs a NODE (node-name or BlockBackend name)")
        session = query(_address(args), [
            ("query-blockstats", None, False),
            ("query-blockstats", {"query-nodes": True}, False),
            ("query-named-block-nodes", {"flat": True}, False)])
        try:
            info = ctl_blkinfo.running_block_info(args.node, *session.replies,
                                                  cwd=session.peer_cwd)
        except KeyError as e:
            raise CtlError(e.args[0]) from e
    lines = ctl_blkinfo.format_block_info(info, args.human)
    if not args.brief:
        lines += [""] + ctl_blkinfo.explain(info)
    print("\n".join(lines))
    return 0


# -- graph ------------------------------------------------------------------------------------

def graph(args: argparse.Namespace) -> int:
    if args.nodes and not args.json:
        raise CtlError("--nodes only goes with --json")
    if args.json:
        g = ctl_graph.BlockGraph.from_replies(
            _load_json(args.json), _load_json(args.nodes) if args.nodes else None)
    else:
        reply, named, exports = query(_address(args), [
            ("x-debug-query-block-graph", None, False),
            ("query-named-block-nodes", {"flat": True}, False),
            ("query-block-exports", None, True)]).replies
        g = ctl_graph.BlockGraph.from_replies(reply, named, exports)
    try:
        data = ctl_graph.render(g, args.output_format)
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError) as e:
        raise CtlError(f"graphviz: {e}") from e
    if args.output and args.output != "-":
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


# -- jobs -------------------------------------------------------------------------------------

def jobs(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise CtlError("--interval must be positive")
    try:
        return ctl_jobs.run(_address(args), args.watch, args.interval)
    except ctl_jobs.JobsError as e:
        raise CtlError(str(e)) from e


# -- command line -----------------------------------------------------------------------------

def _add_connection(p: argparse.ArgumentParser, *, offline: str | None = None) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--socket", metavar="PATH", help="QMP monitor on a unix socket")
    group.add_argument("--tcp", metavar="HOST:PORT", help="QMP monitor on a TCP socket")
    if offline == "image":
        group.add_argument("--offline", metavar="IMAGE",
                           help="measure an image file that no daemon has open")
    elif offline == "json":
        group.add_argument("--json", metavar="FILE",
                           help="render a saved x-debug-query-block-graph reply")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("domblkinfo", help="virsh domblkinfo numbers for a disk",
                       description="Capacity, Allocation and Physical as libvirt's "
                       "virDomainGetBlockInfo computes them, plus the host bytes allocated.")
    p.add_argument("node", nargs="?", metavar="NODE",
                   help="top node-name of the disk (its format node), or a BlockBackend name")
    p.add_argument("--human", action="store_true", help="print sizes like virsh --human")
    p.add_argument("--brief", action="store_true", help="omit the explanation")
    p.add_argument("--format", choices=("raw", "qcow2"),
                   help="image format for --offline (default: probed)")
    _add_connection(p, offline="image")
    p.set_defaults(func=domblkinfo)

    p = sub.add_parser("graph", help="draw the block graph",
                       description="The block graph from x-debug-query-block-graph and "
                       "query-named-block-nodes as a text tree, DOT, SVG or PNG.")
    p.add_argument("--format", dest="output_format", default="text",
                   choices=("text", "dot", "svg", "png"))
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--nodes", metavar="FILE",
                   help="with --json: a saved query-named-block-nodes reply (drivers, filenames)")
    _add_connection(p, offline="json")
    p.set_defaults(func=graph)

    p = sub.add_parser("jobs", help="list or watch the daemon's jobs",
                       description=ctl_jobs.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch", action="store_true",
                   help="follow the jobs (events and progress) until all have ended")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="seconds between progress polls with --watch (default 0.5)")
    _add_connection(p)
    p.set_defaults(func=jobs)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CtlError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
