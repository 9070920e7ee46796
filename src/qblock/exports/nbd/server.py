"""The asyncio NBD server: a thin shell around the sans-IO core (protocol.py).

blockdev-nbd.c / nbd/server.c: one server per process listening on a unix or TCP socket,
exports looked up by name, each connection a task with up to 16 requests in flight whose
replies go out in completion order.  An export is a BlockBackend on its node that takes
consistent-read (+write when writable) and shares everything but resize (REFERENCE §4.7).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from typing import Any

from qblock.block import io
from qblock.block.backend import BlockBackend
from qblock.block.dirty_bitmap import CHECK_ALLOW_RO, DirtyBitmap, check_bitmap, find_bitmap
from qblock.block.node import BlockNode
from qblock.block.perm import PERM_ALL, Perm
from qblock.drivers.base import ReqFlags, Status
from qblock.errors import QBlockError
from qblock.exports.nbd import protocol as p

MAX_NBD_REQUESTS = 16  # nbd/server.c: requests in flight per client
CACHE_CHUNK = 1 << 20


def find_chain_bitmap(node: BlockNode, name: str, writable: bool) -> DirtyBitmap:
    """nbd_export_create(): a bitmap named by string is looked up on the exported node, then
    down its filtered or COW children; an enabled bitmap on a writable node cannot be
    exported read-only (its contents could change under the client)."""
    bs: BlockNode | None = node
    while bs is not None:
        bitmap = find_bitmap(bs, name)
        if bitmap is not None:
            if not writable and not bs.read_only and bitmap.enabled:
                raise QBlockError(f"Enabled bitmap '{name}' incompatible with readonly export")
            return bitmap
        child = bs.filtered_child() or bs.cow_child()
        bs = child.node if child is not None else None
    raise QBlockError(f"Bitmap '{name}' is not found")


class Export:
    """One NBD export: a named BlockBackend and the clients using it."""

    def __init__(self, export_id: str, node: BlockNode, name: str, *, writable: bool = False,
                 description: str | None = None, allocation_depth: bool = False,
                 multi_conn: bool = True, bitmaps: list[DirtyBitmap] | None = None) -> None:
        if writable and node.read_only:
            raise QBlockError("Cannot export read-only node as writable")
        self.bitmaps = list(bitmaps or [])
        for bitmap in self.bitmaps:
            check_bitmap(bitmap, CHECK_ALLOW_RO)
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
        self.id = export_id
        self.backend = BlockBackend(node, perm, PERM_ALL & ~Perm.RESIZE)
        # blk_get_request_alignment(): format drivers pad for themselves (bl.request_alignment
        # 1 in QEMU); only a protocol node exported directly shows its O_DIRECT alignment
        min_block = node.request_alignment if node.drv.is_protocol else 1
        self.info = p.ExportInfo(name, node.length() // 512 * 512, read_only=not writable,
                                 description=description, min_block=min_block,
                                 multi_conn=multi_conn, allocation_depth=allocation_depth,
                                 bitmaps=tuple(str(b.name) for b in self.bitmaps))
        self.clients: set[asyncio.Task[None]] = set()
        self.shutting_down = False
        # server.c: exported bitmaps are busy (no clear, remove or merge into) until removal
        for bitmap in self.bitmaps:
            bitmap.busy = True

    def release_bitmaps(self) -> None:
        for bitmap in self.bitmaps:
            bitmap.busy = False

    @property
    def node_name(self) -> str:
        return self.backend.node.node_name


class NbdServer:
    """Listening sockets, the exports by name and the connections being served."""

    def __init__(self, max_connections: int = 100, handshake_max_seconds: int = 10,
                 tls: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.tls = tls
        self.handshake_max_seconds = handshake_max_seconds
        self.exports: dict[str, Export] = {}
        self.infos: dict[str, p.ExportInfo] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections ever accepted (qemu-nbd exits when the last one ends)
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None

    # -- listening -----------------------------------------------------------------------
    async def listen(self, addr: dict[str, Any]) -> None:
        """Listen on a flat SocketAddress: ``{type: unix, path}`` or ``{type: inet, host, port}``."""
        if addr["type"] == "unix":
            path = addr["path"]
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(path) and not os.path.isdir(path):
                    os.unlink(path)
            srv = await asyncio.start_unix_server(self._accept, path)
            self._unix_paths.append(path)
        elif addr["type"] == "inet":
            srv = await asyncio.start_server(self._accept, addr.get("host") or None,
                                             int(addr["port"]), family=socket.AF_UNSPEC,
                                             reuse_address=True)
        else:
            raise QBlockError(f"Unsupported socket address type '{addr['type']}'")
        self._servers.append(srv)

    def add_export(self, export: Export) -> None:
        if export.info.name in self.exports:
            raise QBlockError(f"NBD server already has export named '{export.info.name}'")
        self.exports[export.info.name] = export
        self.infos[export.info.name] = export.info

    async def remove_export(self, export: Export, hard: bool) -> None:
        """Stop serving ``export``; ``hard`` disconnects its clients, else they must be gone."""
        live = {t for t in export.clients if not t.done()}
        if live and not hard:
            raise QBlockError(f"export '{export.id}' still in use")
        export.shutting_down = True
        self.exports.pop(export.info.name, None)
        self.infos.pop(export.info.name, None)
        for task in live:
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)
        export.release_bitmaps()
        await export.backend.close()

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def close(self) -> list[Export]:
        """Stop listening, drop every client; returns the exports (backends closed)."""
        for srv in self._servers:
            srv.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self._servers:
            await srv.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        exports = list(self.exports.values())
        for export in exports:
            await self.remove_export(export, hard=True)
        return exports

    # -- connections ---------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            if self._slots is None:
                await self._client(reader, writer, task)
            else:
                async with self._slots:
                    await self._client(reader, writer, task)
        except (asyncio.CancelledError, p.ProtocolError, OSError, asyncio.IncompleteReadError,
                TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      task: asyncio.Task[None]) -> None:
        conn = p.ServerConnection(self.infos, tls=self.tls is not None)
        limit = self.handshake_max_seconds or None
        async with asyncio.timeout(limit):
            ready = await _handshake(conn, reader, writer, self.tls)
        if ready is None:
            return
        export = self.exports.get(ready.export.name)
        if export is None or export.shutting_down:
            return
        export.clients.add(task)
        try:
            await Session(conn, export, reader, writer).run()
        finally:
            export.clients.discard(task)


async def _handshake(conn: p.ServerConnection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter,
                     tls: ssl.SSLContext | None) -> p.Ready | None:
    """Negotiate until the client picks an export (Ready) or leaves (None)."""
    while True:
        try:
            event = conn.next_event()
        finally:
            writer.write(conn.data_to_send())  # a TLS_REQD reply before a drop goes out
        await writer.drain()
        if isinstance(event, p.Ready):
            return event
        if isinstance(event, p.Closed):
            return None
        if isinstance(event, p.StartTLS):
            assert tls is not None
            await writer.start_tls(tls)
            continue
        conn.receive_data(await reader.read(65536))


class Session:
    """The transmission phase of one connection."""

    def __init__(self, conn: p.ServerConnection, export: Export, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.export = export
        self.blk = export.backend
        self.reader = reader
        self.writer = writer
        self.inflight: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_NBD_REQUESTS)

    async def run(self) -> None:
        try:
            while True:
                try:
                    event = self.conn.next_event()
                finally:
                    self._flush()  # an error reply queued before a ProtocolError goes out
                if isinstance(event, p.Closed):
                    break
                if isinstance(event, p.Request):
                    await self.slots.acquire()
                    task = asyncio.create_task(self._execute(event))
                    self.inflight.add(task)
                    task.add_done_callback(self._done)
                    continue
                self.conn.receive_data(await self.reader.read(1 << 20))
            # proto.md: finish outstanding requests before closing on DISC
            if self.inflight:
                await asyncio.wait(set(self.inflight))
            self._flush()
            await self.writer.drain()
        finally:
            # never cancel a request half-way through a format driver's metadata update:
            # like QEMU's client_close, let the requests in flight finish (asyncio.wait does
            # not cancel them even if this task is cancelled again)
            if self.inflight:
                await asyncio.wait(set(self.inflight))

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self.slots.release()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _execute(self, req: p.Request) -> None:
        try:
            await self._handle(req)
        except QBlockError as exc:
            self.conn.reply_error(req, exc.errno, str(exc))
        except OSError as exc:
            self.conn.reply_error(req, exc.errno or errno.EIO, exc.strerror or str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure is an EIO reply, as in QEMU
            self.conn.reply_error(req, errno.EIO, str(exc) or type(exc).__name__)
        self._flush()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _handle(self, req: p.Request) -> None:
        """server.c nbd_handle_request(): one command against the export's BlockBackend."""
        blk, cmd, flags = self.blk, req.command, req.flags
        fua = ReqFlags.FUA if flags & p.CmdFlag.FUA else ReqFlags.NONE
        if cmd == p.Cmd.READ:
            self.conn.reply_read(req, await self._read(req))
        elif cmd == p.Cmd.WRITE:
            await blk.pwritev(req.offset, req.data, fua)
            self.conn.reply_ok(req)
        elif cmd == p.Cmd.FLUSH:
            await blk.flush()
            self.conn.reply_ok(req)
        elif cmd == p.Cmd.TRIM:
            await blk.pdiscard(req.offset, req.length)
            if fua:
                await blk.flush()
            self.conn.reply_ok(req)
        elif cmd == p.Cmd.WRITE_ZEROES:
            zflags = fua
            if not flags & p.CmdFlag.NO_HOLE:
                zflags |= ReqFlags.MAY_UNMAP
            if flags & p.CmdFlag.FAST_ZERO:
                zflags |= ReqFlags.NO_FALLBACK
            await blk.pwrite_zeroes(req.offset, req.length, zflags)
            self.conn.reply_ok(req)
        elif cmd == p.Cmd.CACHE:
            # NBD_CMD_CACHE populates the cache: read through in bounded pieces, discard
            buf = memoryview(bytearray(min(req.length, CACHE_CHUNK)))
            for off in range(req.offset, req.offset + req.length, CACHE_CHUNK):
                n = min(CACHE_CHUNK, req.offset + req.length - off)
                await blk.preadv(off, buf[:n])
            self.conn.reply_ok(req)
        elif cmd == p.Cmd.BLOCK_STATUS:
            self.conn.reply_block_status(req, await self._block_status(req))

    async def _read(self, req: p.Request) -> list[tuple[int, int, bytes | None]]:
        """nbd_co_send_sparse_read(): zero runs become holes when structured; each run of
        data between holes is read with one request."""
        if not self.conn.structured or req.flags & p.CmdFlag.DF:
            return [(req.offset, req.length, bytes(await self.blk.pread(req.offset, req.length)))]
        runs: list[list[int]] = []  # [offset, length, is_hole]
        offset, end = req.offset, req.offset + req.length
        while offset < end:
            st, _ = await io.block_status_above(self.blk.node, None, offset, end - offset)
            n = st.pnum or end - offset
            hole = int(bool(st.status & Status.ZERO))
            if runs and runs[-1][2] == hole:
                runs[-1][1] += n
            else:
                runs.append([offset, n, hole])
            offset += n
        return [(off, n, None if hole else bytes(await self.blk.pread(off, n)))
                for off, n, hole in runs]

    async def _block_status(self, req: p.Request) -> list[tuple[int, list[tuple[int, int]]]]:
        """One extent list per selected meta context, adjacent equal extents merged."""
        limit = 1 if req.flags & p.CmdFlag.REQ_ONE else p.MAX_BLOCK_STATUS_EXTENTS
        out = []
        for ctx_id, name in sorted(self.conn.meta.items()):
            if ctx_id >= 2:
                bitmap = self.export.bitmaps[ctx_id - 2]
                out.append((ctx_id, _bitmap_extents(bitmap, req.offset, req.length, limit)))
                continue
            depth_ctx = name == p.ALLOCATION_DEPTH
            extents: list[tuple[int, int]] = []
            offset, end = req.offset, req.offset + req.length
            while offset < end and len(extents) <= limit:
                st, depth = await io.block_status_above(self.blk.node, None, offset,
                                                        end - offset)
                n = st.pnum or end - offset
                if depth_ctx:
                    value = depth
                else:
                    value = ((0 if st.status & Status.DATA else p.STATE_HOLE)
                             | (p.STATE_ZERO if st.status & Status.ZERO else 0))
                if extents and extents[-1][1] == value:
                    extents[-1] = (extents[-1][0] + n, value)
                else:
                    extents.append((n, value))
                offset += n
            out.append((ctx_id, extents[:limit] or [(req.length, 0)]))
        return out


def _bitmap_extents(bitmap: DirtyBitmap, offset: int, length: int,
                    limit: int) -> list[tuple[int, int]]:
    """server.c bitmap_to_extents(): alternating clean/dirty runs clipped to the request,
    at most ``limit`` of them."""
    extents: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end and len(extents) < limit:
        dirty = bitmap.get(pos) if pos < bitmap.size else False
        nxt = bitmap.next_clean(pos) if dirty else bitmap.next_dirty(pos)
        stop = end if nxt < 0 else min(nxt, end)
        extents.append((stop - pos, p.STATE_DIRTY if dirty else 0))
        pos = stop
    return extents


SERVER: NbdServer | None = None


def current() -> NbdServer | None:
    """The process's NBD server (blockdev-nbd.c keeps one, like this)."""
    return SERVER


def set_current(server: NbdServer | None) -> None:
    global SERVER
    SERVER = server

