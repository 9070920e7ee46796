"""An asyncio NBD client (nbd/client.c, block/nbd.c; NBD doc/proto.md).

Fixed newstyle handshake with structured replies, ``base:allocation`` and NBD_OPT_GO asking
for the block size; then requests multiplexed by cookie on one socket, a reader task routing
each reply (simple or structured chunks) to the request waiting for it.  Encodings are the
constants of the server's sans-IO module (protocol.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import os
import ssl
import struct
from typing import Any

from qblock.errors import QBlockError
from qblock.exports.nbd import protocol as p

# nbd/common.c nbd_errno_to_system_errno()
_NBD_TO_ERRNO = {p.NBD_EPERM: errno.EPERM, p.NBD_EIO: errno.EIO, p.NBD_ENOMEM: errno.ENOMEM,
                 p.NBD_EINVAL: errno.EINVAL, p.NBD_ENOSPC: errno.ENOSPC,
                 p.NBD_EOVERFLOW: errno.EOVERFLOW, p.NBD_ENOTSUP: errno.ENOTSUP,
                 p.NBD_ESHUTDOWN: errno.ESHUTDOWN}
_REP_HDR = struct.Struct(">QIII")
# nbd/common.c nbd_opt_lookup()
_OPT_NAMES = {p.Opt.STARTTLS: "starttls", p.Opt.STRUCTURED_REPLY: "structured reply",
              p.Opt.SET_META_CONTEXT: "set meta context", p.Opt.GO: "go"}


class NbdRequestError(QBlockError):
    """The server answered a request with an error."""


class ConnectionLost(QBlockError):
    """The connection is gone; the request may not have been executed."""

    errno = errno.EIO


@dataclasses.dataclass
class Negotiated:
    """What the handshake settled (NBDExportInfo)."""

    size: int = 0
    flags: int = 0
    structured: bool = False
    base_allocation: int | None = None  # context id, when the server agreed
    min_block: int = 1
    max_block: int = p.MAX_BUFFER_SIZE


@dataclasses.dataclass
class _Pending:
    command: p.Cmd
    offset: int
    buf: memoryview | None = None
    extents: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    error: tuple[int, str] | None = None
    done: asyncio.Future[None] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class NbdClient:
    """One connection to one export."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.info = Negotiated()
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None

    @classmethod
    async def connect(cls, addr: dict[str, Any], export: str, *,
                      tls: ssl.SSLContext | None = None,
                      hostname: str | None = None) -> NbdClient:
        """Connect to ``{type: unix, path}`` or ``{type: inet, host, port}`` and negotiate;
        with ``tls``, STARTTLS first (checking the certificate against ``hostname``)."""
        if addr["type"] == "unix":
            reader, writer = await asyncio.open_unix_connection(addr["path"])
        else:
            reader, writer = await asyncio.open_connection(addr["host"], int(addr["port"]))
        client = cls(reader, writer)
        try:
            await client._handshake(export, tls, hostname)
        except BaseException:
            # nbd/client.c nbd_send_opt_abort(): tell the server before hanging up
            with contextlib.suppress(Exception):
                writer.write(struct.pack(">QII", p.IHAVEOPT, p.Opt.ABORT, 0))
                await asyncio.wait_for(writer.drain(), 1)
            writer.close()
            raise
        client._reader_task = asyncio.create_task(client._read_replies())
        return client

    # -- handshake (nbd/client.c nbd_receive_negotiate) ------------------------------------
    async def _handshake(self, export: str, tls: ssl.SSLContext | None,
                         hostname: str | None) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self.reader.readexactly(18))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise QBlockError("Server does not support the fixed newstyle NBD protocol")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise QBlockError("Server does not support the fixed newstyle NBD protocol")
        no_zeroes = flags & p.FLAG_NO_ZEROES
        self.writer.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE
                                      | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)))
        if tls is not None:
            # nbd/client.c nbd_receive_starttls()
            rep, _ = (await self._option(p.Opt.STARTTLS, b""))[-1]
            if rep != p.Rep.ACK:
                raise QBlockError(f"Server rejected request to start TLS {rep:x}")
            await self.writer.start_tls(tls, server_hostname=hostname)
        replies = await self._option(p.Opt.STRUCTURED_REPLY, b"")
        self.info.structured = replies[-1][0] == p.Rep.ACK
        name = export.encode()
        if self.info.structured:
            query = p.BASE_ALLOCATION.encode()
            payload = (struct.pack(">I", len(name)) + name + struct.pack(">I", 1)
                       + struct.pack(">I", len(query)) + query)
            for rep, data in await self._option(p.Opt.SET_META_CONTEXT, payload):
                if rep == p.Rep.META_CONTEXT and data[4:] == query:
                    self.info.base_allocation = struct.unpack_from(">I", data)[0]
        payload = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, p.Info.BLOCK_SIZE)
        got_export = False
        for rep, data in await self._option(p.Opt.GO, payload):
            if rep == p.Rep.INFO:
                (kind,) = struct.unpack_from(">H", data)
                if kind == p.Info.EXPORT:
                    self.info.size, self.info.flags = struct.unpack_from(">QH", data, 2)
                    got_export = True
                elif kind == p.Info.BLOCK_SIZE:
                    self.info.min_block, _, self.info.max_block = struct.unpack_from(
                        ">III", data, 2)
            elif rep & (1 << 31):
                msg = data.decode(errors="replace")
                if rep == p.Rep.ERR_UNKNOWN:
                    raise QBlockError("Requested export not available")
                raise QBlockError(f"Server refused export '{export}': {msg}")
        if not got_export:
            raise QBlockError("server sent no export information")

    async def _option(self, option: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final ACK or error."""
        self.writer.write(struct.pack(">QII", p.IHAVEOPT, option, len(payload)) + payload)
        await self.writer.drain()
        out = []
        while True:
            magic, opt, rep, length = _REP_HDR.unpack(
                await self.reader.readexactly(_REP_HDR.size))
            if magic != p.REP_MAGIC or opt != option:
                raise QBlockError("Unexpected option reply from server")
            if length > p.MAX_BUFFER_SIZE:
                raise QBlockError("server option reply too long")
            out.append((rep, await self.reader.readexactly(length)))
            if rep == p.Rep.ERR_TLS_REQD:
                # nbd/client.c nbd_handle_reply_err()
                raise QBlockError(f"TLS negotiation required before option {option} "
                                  f"({_OPT_NAMES.get(option, 'unknown')})")
            if rep == p.Rep.ACK or rep & (1 << 31):
                return out

    # -- transmission ------------------------------------------------------------------
    async def _read_replies(self) -> None:
        try:
            while True:
                (magic,) = struct.unpack(">I", await self.reader.readexactly(4))
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await self._simple()
                elif magic == p.STRUCTURED_REPLY_MAGIC and self.info.structured:
                    await self._structured()
                else:
                    raise QBlockError(f"invalid reply magic 0x{magic:x}")
        except (asyncio.IncompleteReadError, OSError, QBlockError) as exc:
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        for req in self._pending.values():
            if not req.done.done():
                req.done.set_exception(ConnectionLost(f"NBD connection lost: {exc}"))
        self._pending.clear()

    @property
    def alive(self) -> bool:
        return self._dead is None

    def _take(self, cookie: int) -> _Pending:
        req = self._pending.get(cookie)
        if req is None:
            raise QBlockError(f"unexpected reply cookie {cookie}")
        return req

    async def _simple(self) -> None:
        err, cookie = struct.unpack(">IQ", await self.reader.readexactly(12))
        req = self._take(cookie)
        if err:
            req.error = (err, "")
        elif req.command == p.Cmd.READ and req.buf is not None:
            req.buf[:] = await self.reader.readexactly(len(req.buf))
        self._finish(cookie)

    async def _structured(self) -> None:
        flags, rtype, cookie, length = struct.unpack(">HHQI",
                                                     await self.reader.readexactly(16))
        req = self._take(cookie)
        data = await self.reader.readexactly(length)
        if rtype == p.ReplyType.OFFSET_DATA and req.buf is not None:
            (off,) = struct.unpack_from(">Q", data)
            start = off - req.offset
            if start < 0 or start + length - 8 > len(req.buf):
                raise QBlockError("server sent data chunk outside the request")
            req.buf[start:start + length - 8] = data[8:]
        elif rtype == p.ReplyType.OFFSET_HOLE and req.buf is not None:
            off, n = struct.unpack_from(">QI", data)
            start = off - req.offset
            if start < 0 or start + n > len(req.buf):
                raise QBlockError("server sent hole chunk outside the request")
            req.buf[start:start + n] = bytes(n)
        elif rtype == p.ReplyType.BLOCK_STATUS:
            (ctx,) = struct.unpack_from(">I", data)
            if ctx == self.info.base_allocation:
                req.extents += list(struct.iter_unpack(">II", data[4:]))
        elif rtype in (p.ReplyType.ERROR, p.ReplyType.ERROR_OFFSET):
            err, mlen = struct.unpack_from(">IH", data)
            req.error = (err, data[6:6 + mlen].decode(errors="replace"))
        elif rtype != p.ReplyType.NONE:
            raise QBlockError(f"unexpected structured reply type {rtype}")
        if flags & p.REPLY_FLAG_DONE:
            self._finish(cookie)

    def _finish(self, cookie: int) -> None:
        req = self._pending.pop(cookie)
        if not req.done.done():
            req.done.set_result(None)

    async def request(self, command: p.Cmd, offset: int, length: int, *,
                      flags: int = 0, data: bytes | memoryview = b"",
                      buf: memoryview | None = None) -> list[tuple[int, int]]:
        """Send one request and wait for its reply; BLOCK_STATUS returns its extents."""
        if self._dead is not None:
            raise ConnectionLost(f"NBD connection lost: {self._dead}")
        cookie = next(self._cookies)
        req = _Pending(command, offset, buf)
        self._pending[cookie] = req
        try:
            self.writer.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie,
                                          offset, length))
            if data:
                self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError) as exc:
            self._fail_all(exc)
        await req.done
        if req.error is not None:
            code, msg = req.error
            err = _NBD_TO_ERRNO.get(code, errno.EINVAL)
            raise NbdRequestError(msg or os.strerror(err), errno=err)
        return req.extents

    async def close(self) -> None:
        """NBD_CMD_DISC, then close the socket."""
        with contextlib.suppress(OSError, RuntimeError):
            if self._dead is None:
                self.writer.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.DISC,
                                              next(self._cookies), 0, 0))
                await self.writer.drain()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
