"""The QMP server: asyncio listeners and one task pair per session around the sans-IO core.

Each session reads, parses (protocol.QmpConnection) and queues requests; its own dispatcher task
runs them in order, so a long command in one session never blocks another session.  As in
QEMU (monitor/qmp.c handle_qmp_command), a session without the ``oob`` capability stops reading
while a command runs; with ``oob``, up to 8 in-band requests wait in the queue and ``exec-oob``
requests run at once.  Unlike QEMU's socket chardev, which serves one client at a time, a
listener here serves any number of clients concurrently.

Output is bounded: a client that stops reading while events pile up is disconnected once
``OUTPUT_LIMIT`` bytes wait in its buffer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import stat
from typing import Any

from qblock.monitor import commands  # noqa: F401  (registers every command)
from qblock.monitor.context import BlockState
from qblock.monitor.dispatch import dispatch
from qblock.monitor.protocol import QmpConnection, Request, Version

log = logging.getLogger(__name__)

READ_SIZE = 64 << 10
QUEUE_LEN_MAX = 8  # monitor-internal.h QMP_REQ_QUEUE_LEN_MAX
OUTPUT_LIMIT = 16 << 20
LISTEN_BACKLOG = 256


@dataclasses.dataclass
class Listener:
    """A bound, listening socket from ``--chardev socket,...,server=on``."""

    chardev_id: str
    sock: socket.socket
    path: str | None = None  # unix socket path, removed on close
    description: str = ""
    # Clients accepted before a monitor was attached (wait=on): served once one is.
    pending: list[socket.socket] = dataclasses.field(default_factory=list)


def listen_unix(chardev_id: str, path: str) -> Listener:
    """Bind a unix socket readable and writable by its owner only (mode 0600), then listen."""
    path = os.path.abspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket, as QEMU replaces it (never any other file)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(chardev_id, sock, path, f"unix:{path},server=on")


def listen_tcp(chardev_id: str, host: str, port: int) -> Listener:
    """Bind and listen on a TCP address (``host=,port=``)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(chardev_id, sock, None, f"tcp:{host}:{sock.getsockname()[1]},server=on")


class Session:
    """One connected QMP client."""

    def __init__(self, server: QmpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, pretty: bool) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = QmpConnection(pretty=pretty)
        self.queue: asyncio.Queue[Request | None] = asyncio.Queue(QUEUE_LEN_MAX)
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        """Write one reply or event; drop the client if its unread output exceeds the bound."""
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(self.conn.encode(message))
        if self.writer.transport.get_write_buffer_size() > OUTPUT_LIMIT:
            log.warning("QMP client does not read its output; disconnecting it")
            self.abort()

    def on_event(self, event: dict[str, Any]) -> None:
        if self.conn.negotiated:  # events go to sessions in command mode only
            self.send(event)

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def run(self) -> None:
        self.server.state.events.subscribe(self.on_event)
        dispatcher = asyncio.create_task(self._dispatch_loop())
        try:
            self.send_raw(self.conn.greeting(self.server.version))
            await self._read_loop()
        except (ConnectionError, OSError):
            pass
        finally:
            self.server.state.events.unsubscribe(self.on_event)
            self.closed = True
            # Requests not yet started are dropped (monitor_qmp_cleanup_queue_and_resume);
            # a command already running finishes, its reply goes nowhere.
            while not self.queue.empty():
                self.queue.get_nowait()
                self.queue.task_done()
            self.queue.put_nowait(None)
            await dispatcher
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def _read_loop(self) -> None:
        while not self.closed:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            for req in self.conn.feed(data):
                if self.closed:
                    return
                if req.is_oob:
                    await self._execute(req)  # exec-oob runs at once, ahead of the queue
                    continue
                await self.queue.put(req)
                if not self.conn.oob_enabled:
                    await self.queue.join()  # without oob, one command at a time

    async def _dispatch_loop(self) -> None:
        while True:
            req = await self.queue.get()
            try:
                if req is None:
                    return
                await self._execute(req)
            finally:
                self.queue.task_done()

    async def _execute(self, req: Request) -> None:
        reply = await dispatch(self.server.state, self.conn, req)
        self.send(reply)
        if not self.closed:
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
        if self.server.state.quit_requested:
            self.server.quit_event.set()


class QmpServer:
    """All QMP monitors of a daemon: listeners, their sessions, and the shared block state."""

    def __init__(self, state: BlockState, version: Version) -> None:
        self.state = state
        self.version = version
        self.quit_event = asyncio.Event()
        self.sessions: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.listeners: list[Listener] = []
        self.connected = asyncio.Event()

    async def add_monitor(self, listener: Listener, *, pretty: bool = False) -> None:
        """Serve QMP on ``listener`` (``--monitor chardev=ID``)."""
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connected.set()
            task = asyncio.current_task()
            assert task is not None
            self.sessions.add(task)
            try:
                await Session(self, reader, writer, pretty).run()
            except asyncio.CancelledError:
                pass  # shutdown ends sessions; asyncio's stream callback must not see it raise
            finally:
                self.sessions.discard(task)

        if listener.path is not None:
            server = await asyncio.start_unix_server(on_connect, sock=listener.sock,
                                                     limit=READ_SIZE)
        else:
            server = await asyncio.start_server(on_connect, sock=listener.sock, limit=READ_SIZE)
        self.servers.append(server)
        for conn in listener.pending:
            conn.setblocking(False)
            if listener.path is not None:
                reader, writer = await asyncio.open_unix_connection(sock=conn)
            else:
                reader, writer = await asyncio.open_connection(sock=conn)
            asyncio.get_running_loop().create_task(on_connect(reader, writer))
        listener.pending.clear()
        if listener not in self.listeners:
            self.listeners.append(listener)

    def own(self, listener: Listener) -> None:
        """Take charge of closing a listener even if no monitor uses it."""
        if listener not in self.listeners:
            self.listeners.append(listener)

    async def close(self) -> None:
        """Stop listening, disconnect every client, remove unix socket files."""
        for server in self.servers:
            server.close()
        for task in list(self.sessions):
            task.cancel()
        for task in list(self.sessions):
            with contextlib.suppress(BaseException):
                await task
        for listener in self.listeners:
            for conn in listener.pending:
                conn.close()
            listener.sock.close()
            if listener.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listener.path)
