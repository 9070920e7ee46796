"""The ``nbd`` protocol driver (block/nbd.c): a remote NBD export as a node.

Options as BlockdevOptionsNbd: ``server`` (SocketAddress ``{type: unix, path}`` or
``{type: inet, host, port}``), ``export`` (default ""), ``tls-creds`` (a tls-creds-x509
object with a client endpoint) and ``tls-hostname``, ``reconnect-delay`` (seconds a request
waits for the connection to come back, 0: a lost connection fails requests with EIO) and
``open-timeout`` (accepted).  Requests larger than the server's maximum block size are split;
block status uses ``base:allocation``; FUA the server lacks is a flush after the write.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from qblock.drivers.base import BlockDriver, BlockStatus, ReqFlags, Status
from qblock.drivers.options import pop_int, pop_str
from qblock.errors import InvalidArgument, NotSupported, QBlockError
from qblock.exports.nbd import protocol as p
from qblock.exports.nbd import tls
from qblock.exports.nbd.client import ConnectionLost, NbdClient

# proto.md: request lengths are 32-bit; zero/trim/status requests are split below this
MAX_LENGTH = 1 << 31
RECONNECT_INTERVAL = 0.1  # seconds between connection attempts while reconnecting


def _server_address(server: Any) -> dict[str, str]:
    """The flat SocketAddress of ``server`` (unix or inet)."""
    if not isinstance(server, dict):
        raise InvalidArgument("Parameter 'server' is missing" if server is None else
                              "Invalid parameter type for 'server', expected: object")
    rest = dict(server)
    kind = pop_str(rest, "type", choices=("unix", "inet"))
    if kind is None:
        raise InvalidArgument("Parameter 'server.type' is missing")
    if kind == "unix":
        path = pop_str(rest, "path")
        if path is None:
            raise InvalidArgument("Parameter 'server.path' is missing")
        addr = {"type": "unix", "path": path}
    else:
        host = pop_str(rest, "host")
        if host is None:
            raise InvalidArgument("Parameter 'server.host' is missing")
        port = rest.pop("port", "10809")
        addr = {"type": "inet", "host": host, "port": str(port)}
    if rest:
        raise InvalidArgument(f"Parameter 'server.{next(iter(rest))}' is unexpected")
    return addr


class NbdDriver(BlockDriver):
    format_name = "nbd"
    is_protocol = True

    client: NbdClient

    async def open(self, node: Any, options: dict[str, Any]) -> None:
        await super().open(node, options)
        addr = _server_address(options.pop("server", None))
        export = pop_str(options, "export", "") or ""
        creds = pop_str(options, "tls-creds")
        hostname = pop_str(options, "tls-hostname")
        self.reconnect_delay = pop_int(options, "reconnect-delay", 0)
        pop_int(options, "open-timeout", 0)
        if hostname is None and addr["type"] == "inet":
            hostname = addr["host"]
        self.addr, self.export, self.hostname = addr, export, hostname
        self.tls = tls.client(creds, hostname) if creds is not None else None
        self._reconnecting = asyncio.Lock()
        self.client = await self._connect()
        info = self.client.info
        if info.flags & p.TFlag.READ_ONLY and not node.read_only:
            await self.client.close()
            raise QBlockError("NBD export is read-only")
        node.request_alignment = max(1, info.min_block)
        # nbd_refresh_filename()
        if addr["type"] == "unix":
            node.filename = f"nbd+unix:///{export}?socket={addr['path']}"
        else:
            node.filename = f"nbd://{addr['host']}:{addr['port']}/{export}"

    async def _connect(self) -> NbdClient:
        try:
            return await NbdClient.connect(self.addr, self.export, tls=self.tls,
                                           hostname=self.hostname)
        except (OSError, asyncio.IncompleteReadError) as exc:
            addr = self.addr
            where = addr["path"] if addr["type"] == "unix" else f"{addr['host']}:{addr['port']}"
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else \
                "server closed the connection during the handshake"
            raise QBlockError(f"Failed to connect to '{where}': {reason}") from None

    async def _reconnect(self, deadline: float) -> None:
        """block/nbd.c nbd_reconnect_attempt(): connect again until ``deadline``; the export
        must keep its size and flags."""
        loop = asyncio.get_running_loop()
        async with self._reconnecting:
            if self.client.alive:
                return  # another request reconnected meanwhile
            while True:
                try:
                    client = await self._connect()
                except QBlockError:
                    if loop.time() >= deadline:
                        raise ConnectionLost("NBD connection lost and reconnect-delay "
                                             "expired") from None
                    await asyncio.sleep(RECONNECT_INTERVAL)
                    continue
                old, info = self.client, self.client.info
                if (client.info.size, client.info.flags) != (info.size, info.flags):
                    await client.close()
                    raise ConnectionLost("NBD export changed while reconnecting")
                self.client = client
                with contextlib.suppress(Exception):
                    await old.close()
                return

    async def _request(self, cmd: p.Cmd, offset: int, length: int, *, flags: int = 0,
                       data: memoryview | None = None,
                       buf: memoryview | None = None) -> list[tuple[int, int]]:
        """One request; with reconnect-delay, a lost connection is re-established and the
        request sent again (NBD requests are idempotent) until the delay runs out."""
        deadline: float | None = None
        while True:
            try:
                return await self.client.request(cmd, offset, length, flags=flags,
                                                 data=data if data is not None else b"",
                                                 buf=buf)
            except ConnectionLost:
                if not self.reconnect_delay:
                    raise
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.reconnect_delay
            await self._reconnect(deadline)

    async def close(self) -> None:
        client = getattr(self, "client", None)  # absent when open() failed to connect
        if client is not None:
            await client.close()

    def getlength(self) -> int:
        return self.client.info.size

    def _has(self, flag: p.TFlag) -> bool:
        return bool(self.client.info.flags & flag)

    def _max(self) -> int:
        """The largest read/write request: the server's maximum, aligned down."""
        align = self.node.request_alignment
        return max(align, min(self.client.info.max_block, p.MAX_BUFFER_SIZE) // align * align)

    def _fua(self, flags: ReqFlags) -> int:
        return p.CmdFlag.FUA if flags & ReqFlags.FUA and self._has(p.TFlag.SEND_FUA) else 0

    async def _emulate_fua(self, flags: ReqFlags) -> None:
        """io.c bdrv_driver_pwritev(): FUA the server cannot do is a flush afterwards."""
        if flags & ReqFlags.FUA and not self._has(p.TFlag.SEND_FUA):
            await self.co_flush_to_disk()

    async def co_preadv(self, offset: int, buf: memoryview, flags: ReqFlags) -> None:
        step = self._max()
        for pos in range(0, len(buf), step):
            piece = buf[pos:pos + step]
            await self._request(p.Cmd.READ, offset + pos, len(piece), buf=piece)

    async def co_pwritev(self, offset: int, data: memoryview, flags: ReqFlags) -> None:
        step, fua = self._max(), self._fua(flags)
        for pos in range(0, len(data), step):
            piece = data[pos:pos + step]
            await self._request(p.Cmd.WRITE, offset + pos, len(piece), flags=fua, data=piece)
        await self._emulate_fua(flags)

    def _spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = MAX_LENGTH - self.node.request_alignment
        step -= step % self.node.request_alignment
        return [(offset + pos, min(step, length - pos)) for pos in range(0, length, step)]

    async def co_pwrite_zeroes(self, offset: int, length: int, flags: ReqFlags) -> None:
        """nbd_client_co_pwrite_zeroes(): NO_HOLE unless unmapping is allowed; FAST_ZERO for
        a request that must not fall back to writing zeroes."""
        if not self._has(p.TFlag.SEND_WRITE_ZEROES):
            raise NotSupported("NBD server does not support write zeroes")
        cmd_flags = self._fua(flags)
        if not flags & ReqFlags.MAY_UNMAP:
            cmd_flags |= p.CmdFlag.NO_HOLE
        if flags & ReqFlags.NO_FALLBACK:
            if not self._has(p.TFlag.SEND_FAST_ZERO):
                raise NotSupported("NBD server does not support fast zeroing")
            cmd_flags |= p.CmdFlag.FAST_ZERO
        for off, n in self._spans(offset, length):
            await self._request(p.Cmd.WRITE_ZEROES, off, n, flags=cmd_flags)
        await self._emulate_fua(flags)

    async def co_pdiscard(self, offset: int, length: int) -> None:
        if not self._has(p.TFlag.SEND_TRIM):
            return
        for off, n in self._spans(offset, length):
            await self._request(p.Cmd.TRIM, off, n)

    async def co_flush_to_disk(self) -> None:
        if self._has(p.TFlag.SEND_FLUSH):
            await self._request(p.Cmd.FLUSH, 0, 0)

    async def co_block_status(self, offset: int, length: int) -> BlockStatus:
        """nbd_client_co_block_status(): the first base:allocation extent (REQ_ONE)."""
        if self.client.info.base_allocation is None:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, length, offset, self.node)
        n = self._spans(offset, length)[0][1]
        extents = await self._request(p.Cmd.BLOCK_STATUS, offset, n, flags=p.CmdFlag.REQ_ONE)
        if not extents or extents[0][0] == 0:
            raise QBlockError("Protocol error: invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
        ext_len, ext_flags = extents[0]
        status = Status.OFFSET_VALID
        if not ext_flags & p.STATE_HOLE:
            status |= Status.DATA
        if ext_flags & p.STATE_ZERO:
            status |= Status.ZERO
        return BlockStatus(status, min(ext_len, n), offset, self.node)

    async def co_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        """nbd_co_truncate(): only the current size (or smaller, when not exact)."""
        size = self.client.info.size
        if exact and length != size:
            raise NotSupported("Cannot resize NBD nodes")
        if length > size:
            raise NotSupported("Cannot grow NBD nodes")

    def allocated_file_size(self) -> int | None:
        return None
