"""Sans-IO NBD server core: bytes in, events and replies out, no sockets (the h11 model).

Covers the fixed newstyle handshake and the transmission phase with simple and structured
replies as QEMU 7.2's nbd/server.c speaks them (REFERENCE §6, NBD doc/proto.md).  The asyncio
shell (server.py) feeds received bytes with :meth:`ServerConnection.receive_data`, executes the
:class:`Request` events it gets from :meth:`ServerConnection.next_event`, answers them with the
``reply_*`` methods and writes :meth:`ServerConnection.data_to_send` to the socket.

Two error kinds, like h11: :class:`ProtocolError` means the peer broke the protocol (drop the
connection); :class:`LocalProtocolError` means the caller misused this object.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from collections.abc import Mapping

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# proto.md "Handshake flags" / "Client flags"
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# nbd.h NBD_MAX_BUFFER_SIZE, NBD_MAX_STRING_SIZE
MAX_BUFFER_SIZE = 32 * 1024 * 1024
MAX_STRING_SIZE = 4096
MAX_BLOCK_STATUS_EXTENTS = 1 << 20


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) | 1
    ERR_POLICY = (1 << 31) | 2
    ERR_INVALID = (1 << 31) | 3
    ERR_PLATFORM = (1 << 31) | 4
    ERR_TLS_REQD = (1 << 31) | 5
    ERR_UNKNOWN = (1 << 31) | 6
    ERR_SHUTDOWN = (1 << 31) | 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) | 8
    ERR_TOO_BIG = (1 << 31) | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(enum.IntFlag):
    """Transmission flags (proto.md "Transmission flags")."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


REPLY_FLAG_DONE = 1 << 0

# proto.md "Error values": what a system errno is sent as (nbd/common.c nbd_errno_to_system
# and server.c system_errno_to_nbd_errno: EROFS/EACCES become EPERM, the rest EINVAL).
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC = 1, 5, 12, 22, 28
NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 75, 95, 108
_ERRNO_TO_NBD = {0: 0, errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
                 errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.ENOSPC: NBD_ENOSPC,
                 errno.EFBIG: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC,
                 errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP,
                 errno.ESHUTDOWN: NBD_ESHUTDOWN, errno.EINVAL: NBD_EINVAL}


def nbd_errno(err: int) -> int:
    """server.c system_errno_to_nbd_errno()."""
    return _ERRNO_TO_NBD.get(err, NBD_EINVAL)


# Meta contexts and the ids QEMU gives them (server.c NBDExportMetaContexts).
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0  # proto.md "qemu:dirty-bitmap:" context: bit 0 set = dirty


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped."""


class LocalProtocolError(Exception):
    """The caller used this object in a way the protocol does not allow."""


@dataclasses.dataclass
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    read_only: bool = True
    description: str | None = None
    min_block: int = 1
    multi_conn: bool = True
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()

    def contexts(self) -> list[tuple[int, str]]:
        """(id, name) of every meta context this export offers (server.c NBD_META_ID_*:
        base:allocation 0, qemu:allocation-depth 1, dirty bitmap i is 2 + i)."""
        out = [(0, BASE_ALLOCATION)]
        if self.allocation_depth:
            out.append((1, ALLOCATION_DEPTH))
        out += [(2 + i, DIRTY_BITMAP_PREFIX + name) for i, name in enumerate(self.bitmaps)]
        return out

    def tflags(self, structured: bool) -> int:
        """nbd_export_create(): QEMU's transmission flags for this export."""
        flags = TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_CACHE
        if self.read_only:
            flags |= TFlag.READ_ONLY
        else:
            flags |= TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO
        if self.multi_conn:
            flags |= TFlag.CAN_MULTI_CONN
        if structured:
            flags |= TFlag.SEND_DF
        return int(flags)


@dataclasses.dataclass(frozen=True)
class Request:
    """A valid transmission-phase command for the server to execute and answer."""

    cookie: int
    command: Cmd
    flags: CmdFlag
    offset: int
    length: int
    data: bytes = b""


class Ready:
    """The handshake chose ``export``; transmission begins."""

    def __init__(self, export: ExportInfo) -> None:
        self.export = export


class Closed:
    """The client ended the session (ABORT or DISC); finish outstanding requests and close."""


class StartTLS:
    """STARTTLS was accepted: send the pending data, then run the TLS handshake on the
    socket before feeding more bytes."""


class NeedData:
    """No complete event in the buffer yet."""


NEED_DATA = NeedData()
Event = Request | Ready | Closed | StartTLS | NeedData


class Phase(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_OPT_HDR = struct.Struct(">QII")
_REQ_HDR = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class ServerConnection:
    """One client's NBD session as seen by the server.

    ``exports`` maps export names to what the handshake advertises; it is read when a client
    asks, so the server can add and remove exports while connections negotiate.
    """

    def __init__(self, exports: Mapping[str, ExportInfo], tls: bool = False) -> None:
        self.exports = exports
        self.tls_required = tls
        self.tls_active = False
        self.phase = Phase.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.meta: dict[int, str] = {}
        self._meta_export: str | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # -- I/O boundary --------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Append bytes from the peer (``b""`` = end of stream)."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            if self.phase is not Phase.TRANSMISSION or self._in:
                self.phase = Phase.CLOSED
                raise ProtocolError("client closed the connection during a request")
            self.phase = Phase.CLOSED
            self._events.append(Closed())
            return
        self._in += data

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> Event:
        """Parse the next event; may queue option replies and error replies to send."""
        while not self._events and self.phase is not Phase.CLOSED:
            if self.phase is Phase.CLIENT_FLAGS:
                progressed = self._client_flags()
            elif self.phase is Phase.OPTIONS:
                progressed = self._option()
            else:
                progressed = self._request()
            if not progressed:
                break
        return self._events.pop(0) if self._events else NEED_DATA

    def _send(self, data: bytes) -> None:
        self._out += data

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _fail(self, message: str) -> ProtocolError:
        self.phase = Phase.CLOSED
        return ProtocolError(message)

    # -- handshake -----------------------------------------------------------------------
    def _client_flags(self) -> bool:
        raw = self._take(4)
        if raw is None:
            return False
        (flags,) = struct.unpack(">I", raw)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise self._fail(f"Unknown client flags 0x{flags:x} received")
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _option(self) -> bool:
        if len(self._in) < _OPT_HDR.size:
            return False
        magic, option, length = _OPT_HDR.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise self._fail("Bad magic received")
        if length > MAX_BUFFER_SIZE:
            raise self._fail(f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})")
        if len(self._in) < _OPT_HDR.size + length:
            return False
        del self._in[:_OPT_HDR.size]
        data = self._take(length) or b""
        self._handle_option(option, data)
        return True

    def _rep(self, option: int, rep: int, payload: bytes = b"") -> None:
        self._send(struct.pack(">QIII", REP_MAGIC, option, rep, len(payload)) + payload)

    def _rep_err(self, option: int, rep: Rep, message: str) -> None:
        self._rep(option, rep, message.encode())

    def _handle_option(self, option: int, data: bytes) -> None:
        """server.c nbd_negotiate_options(): one option, its replies."""
        if self.tls_required and not self.tls_active:
            self._before_tls(option, data)
            return
        if option == Opt.EXPORT_NAME:
            self._export_name(data)
            return
        if not self.fixed_newstyle:
            raise self._fail(f"Unsupported option {option} without fixed newstyle")
        if option == Opt.ABORT:
            self._rep(option, Rep.ACK)
            self.phase = Phase.CLOSED
            self._events.append(Closed())
        elif option in (Opt.LIST, Opt.STRUCTURED_REPLY, Opt.STARTTLS) and data:
            self._rep_err(option, Rep.ERR_INVALID,
                          f"option '{Opt(option).name}' has unexpected length")
        elif option == Opt.LIST:
            for exp in self.exports.values():
                payload = struct.pack(">I", len(exp.name.encode())) + exp.name.encode()
                self._rep(option, Rep.SERVER, payload + (exp.description or "").encode())
            self._rep(option, Rep.ACK)
        elif option == Opt.STARTTLS:
            if self.tls_active:
                self._rep_err(option, Rep.ERR_INVALID, "TLS already enabled")
            else:
                self._rep_err(option, Rep.ERR_POLICY, "TLS not configured")
        elif option == Opt.STRUCTURED_REPLY:
            if self.structured:
                self._rep_err(option, Rep.ERR_INVALID, "structured reply already negotiated")
            else:
                self.structured = True
                self._rep(option, Rep.ACK)
        elif option in (Opt.INFO, Opt.GO):
            self._info(option, data)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._rep_err(option, Rep.ERR_UNSUP, f"Unsupported option {option}")

    def _before_tls(self, option: int, data: bytes) -> None:
        """server.c nbd_negotiate_options(): with TLS credentials only STARTTLS is allowed
        until the channel is encrypted; the rest get TLS_REQD (ABORT then closes)."""
        if option == Opt.STARTTLS:
            if data or self._in:
                raise self._fail("STARTTLS with unexpected data")
            self._rep(option, Rep.ACK)
            self.tls_active = True
            self._events.append(StartTLS())
        elif option == Opt.EXPORT_NAME:
            raise self._fail(f"Option 0x{option:x} not permitted before TLS")
        else:
            self._rep_err(option, Rep.ERR_TLS_REQD,
                          f"Option 0x{option:x} not permitted before TLS")
            if option == Opt.ABORT:
                self.phase = Phase.CLOSED
                self._events.append(Closed())

    def _export_name(self, data: bytes) -> None:
        """NBD_OPT_EXPORT_NAME: no option reply; an unknown export drops the connection."""
        name = data.decode(errors="replace")
        exp = self.exports.get(name)
        if exp is None:
            raise self._fail(f"export '{name}' not present")
        self._enter(exp)
        self._send(struct.pack(">QH", exp.size, exp.tflags(self.structured)))
        if not self.no_zeroes:
            self._send(bytes(124))

    def _enter(self, exp: ExportInfo) -> None:
        if self._meta_export != exp.name:
            self.meta = {}
        self.export = exp
        self.phase = Phase.TRANSMISSION
        self._events.append(Ready(exp))

    def _info(self, option: int, data: bytes) -> None:
        """NBD_OPT_INFO / NBD_OPT_GO (server.c nbd_negotiate_handle_info)."""
        if len(data) < 4:
            self._rep_err(option, Rep.ERR_INVALID, "request data is truncated")
            return
        (namelen,) = struct.unpack_from(">I", data)
        if namelen > MAX_STRING_SIZE:
            self._rep_err(option, Rep.ERR_INVALID, "export name too long")
            return
        if len(data) < 6 + namelen:
            self._rep_err(option, Rep.ERR_INVALID, "request data is truncated")
            return
        name = data[4:4 + namelen].decode(errors="replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * nreq:
            self._rep_err(option, Rep.ERR_INVALID, "Invalid request length")
            return
        requests = struct.unpack_from(f">{nreq}H", data, 6 + namelen)
        exp = self.exports.get(name)
        if exp is None:
            self._rep_err(option, Rep.ERR_UNKNOWN, f"export '{name}' not present")
            return
        if Info.NAME in requests:
            self._rep(option, Rep.INFO, struct.pack(">H", Info.NAME) + exp.name.encode())
        if exp.description:
            self._rep(option, Rep.INFO,
                      struct.pack(">H", Info.DESCRIPTION) + exp.description.encode())
        # server.c: the minimum is the request alignment only for a client that can honour it
        blocksize = Info.BLOCK_SIZE in requests
        minimum = exp.min_block if blocksize or option == Opt.INFO else 1
        self._rep(option, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, minimum,
                                                max(4096, minimum), MAX_BUFFER_SIZE))
        self._rep(option, Rep.INFO, struct.pack(">HQH", Info.EXPORT, exp.size,
                                                exp.tflags(self.structured)))
        # server.c: only OPT_INFO insists on BLOCK_SIZE; GO tolerates every client
        if option == Opt.INFO and not blocksize and exp.min_block > 1:
            self._rep_err(option, Rep.ERR_BLOCK_SIZE_REQD,
                          "request NBD_INFO_BLOCK_SIZE to use this export")
            return
        self._rep(option, Rep.ACK)
        if option == Opt.GO:
            self._enter(exp)

    def _meta_context(self, option: int, data: bytes) -> None:
        """NBD_OPT_LIST/SET_META_CONTEXT (server.c nbd_negotiate_meta_queries)."""
        if not self.structured:
            self._rep_err(option, Rep.ERR_INVALID, f"request option '{Opt(option).name}' when "
                          "structured reply is not negotiated")
            return
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            self._rep_err(option, Rep.ERR_INVALID, str(exc))
            return
        exp = self.exports.get(name)
        if exp is None:
            self._rep_err(option, Rep.ERR_UNKNOWN, f"export '{name}' not present")
            return
        is_list = option == Opt.LIST_META_CONTEXT
        offered = exp.contexts()
        chosen: dict[int, str] = {}
        if is_list and not queries:
            chosen = dict(offered)
        for query in queries:
            for ctx_id, ctx_name in offered:
                if ctx_name == query or (is_list and query in _list_prefixes(ctx_name)):
                    chosen[ctx_id] = ctx_name
        for ctx_id, ctx_name in sorted(chosen.items()):
            self._rep(option, Rep.META_CONTEXT,
                      struct.pack(">I", 0 if is_list else ctx_id) + ctx_name.encode())
        if not is_list:
            self.meta = chosen
            self._meta_export = name
        self._rep(option, Rep.ACK)

    # -- transmission --------------------------------------------------------------------
    def _request(self) -> bool:
        """server.c nbd_co_receive_request(): parse and check one request."""
        if len(self._in) < _REQ_HDR.size:
            return False
        magic, flags, cmd, cookie, offset, length = _REQ_HDR.unpack_from(self._in)
        if magic != REQUEST_MAGIC:
            raise self._fail(f"invalid magic (got 0x{magic:x})")
        if cmd == Cmd.WRITE and length > MAX_BUFFER_SIZE:
            # the payload cannot be skipped: answer, then drop the connection
            del self._in[:_REQ_HDR.size]
            self._error(cookie, NBD_EINVAL, f"len ({length}) is larger than max len "
                        f"({MAX_BUFFER_SIZE})")
            raise self._fail("Disconnecting client due to unrecoverable error")
        payload_len = length if cmd == Cmd.WRITE else 0
        if len(self._in) < _REQ_HDR.size + payload_len:
            return False
        del self._in[:_REQ_HDR.size]
        payload = self._take(payload_len) or b""
        if cmd == Cmd.DISC:
            self.phase = Phase.CLOSED
            self._events.append(Closed())
            return True
        err = self._check(cmd, flags, offset, length)
        if err is not None:
            self._error(cookie, *err)
            return True
        self._events.append(Request(cookie, Cmd(cmd), CmdFlag(flags), offset, length, payload))
        return True

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """The checks QEMU makes before executing a request: (NBD errno, message) or None."""
        assert self.export is not None
        if cmd not in Cmd.__members__.values():
            return NBD_EINVAL, f"invalid request type ({cmd}) received"
        if cmd == Cmd.READ and length > MAX_BUFFER_SIZE:
            return NBD_EINVAL, f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})"
        valid = CmdFlag.FUA
        if cmd == Cmd.READ and self.structured:
            valid |= CmdFlag.DF
        elif cmd == Cmd.WRITE_ZEROES:
            valid |= CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
        elif cmd == Cmd.BLOCK_STATUS:
            valid |= CmdFlag.REQ_ONE
        if flags & ~valid:
            return NBD_EINVAL, f"unsupported flags (got 0x{flags:x})"
        if cmd in (Cmd.FLUSH,):
            return None
        size = self.export.size
        if offset > size or length > size - offset:
            msg = f"operation from {offset}, len {length}, size {size}, past end of file"
            return (NBD_ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NBD_EINVAL), msg
        if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and self.export.read_only:
            return NBD_EPERM, "export is read-only"
        if cmd == Cmd.BLOCK_STATUS and not self.meta:
            return NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated"
        return None

    # -- replies -------------------------------------------------------------------------
    def _simple(self, cookie: int, error: int, data: bytes = b"") -> None:
        self._send(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def _chunk(self, cookie: int, rtype: int, payload: bytes, done: bool) -> None:
        self._send(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype,
                               cookie, len(payload)) + payload)

    def _error(self, cookie: int, nbd_err: int, message: str) -> None:
        """nbd_send_generic_reply() for a failure: an ERROR chunk if structured."""
        if self.structured:
            msg = message.encode()[:65535]
            self._chunk(cookie, ReplyType.ERROR,
                        struct.pack(">IH", nbd_err, len(msg)) + msg, True)
        else:
            self._simple(cookie, nbd_err)

    def _check_live(self) -> None:
        if self.phase is Phase.OPTIONS or self.phase is Phase.CLIENT_FLAGS:
            raise LocalProtocolError("no request to reply to before transmission")

    def reply_error(self, req: Request, err: int, message: str) -> None:
        """Answer ``req`` with a system errno (mapped to NBD's) and a message."""
        self._check_live()
        self._error(req.cookie, nbd_errno(err), message)

    def reply_ok(self, req: Request) -> None:
        """Success without payload: a simple reply even with structured replies (QEMU)."""
        self._check_live()
        if req.command in (Cmd.READ, Cmd.BLOCK_STATUS):
            raise LocalProtocolError(f"{req.command.name} needs a reply with payload")
        self._simple(req.cookie, 0)

    def reply_read(self, req: Request, extents: list[tuple[int, int, bytes | None]]) -> None:
        """Answer a READ: ``(offset, length, data or None for a hole)`` covering the request.

        Holes become OFFSET_HOLE chunks when structured replies are on and DF is not set.
        """
        self._check_live()
        if req.command != Cmd.READ:
            raise LocalProtocolError("reply_read answers READ only")
        if not self.structured:
            self._simple(req.cookie, 0, b"".join(d if d is not None else bytes(n)
                                                 for _, n, d in extents))
            return
        if req.flags & CmdFlag.DF or not extents:
            data = b"".join(d if d is not None else bytes(n) for _, n, d in extents)
            if not data:
                self._chunk(req.cookie, ReplyType.NONE, b"", True)
            else:
                self._chunk(req.cookie, ReplyType.OFFSET_DATA,
                            struct.pack(">Q", req.offset) + data, True)
            return
        last = len(extents) - 1
        for i, (off, n, d) in enumerate(extents):
            if d is None:
                self._chunk(req.cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", off, n),
                            i == last)
            else:
                self._chunk(req.cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", off) + d,
                            i == last)

    def reply_block_status(self, req: Request,
                           contexts: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """Answer BLOCK_STATUS: one chunk per selected context of ``(length, flags)`` extents."""
        self._check_live()
        if req.command != Cmd.BLOCK_STATUS or not self.structured:
            raise LocalProtocolError("reply_block_status answers negotiated BLOCK_STATUS only")
        last = len(contexts) - 1
        for i, (ctx_id, extents) in enumerate(contexts):
            body = struct.pack(">I", ctx_id) + b"".join(struct.pack(">II", n, f)
                                                        for n, f in extents)
            self._chunk(req.cookie, ReplyType.BLOCK_STATUS, body, i == last)


def _list_prefixes(ctx_name: str) -> tuple[str, ...]:
    """Queries that list ``ctx_name`` in NBD_OPT_LIST_META_CONTEXT (namespace wildcards)."""
    namespace = ctx_name.split(":", 1)[0] + ":"
    if ctx_name.startswith(DIRTY_BITMAP_PREFIX):
        return namespace, DIRTY_BITMAP_PREFIX
    return (namespace,)


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """``u32 namelen, name, u32 nq, nq × (u32 len, query)``."""
    view = memoryview(data)
    pos = 0

    def string() -> str:
        nonlocal pos
        if len(view) < pos + 4:
            raise ValueError("request data is truncated")
        (n,) = struct.unpack_from(">I", view, pos)
        if n > MAX_STRING_SIZE:
            raise ValueError("string too long")
        if len(view) < pos + 4 + n:
            raise ValueError("request data is truncated")
        text = bytes(view[pos + 4:pos + 4 + n]).decode(errors="replace")
        pos += 4 + n
        return text

    name = string()
    if len(view) < pos + 4:
        raise ValueError("request data is truncated")
    (nq,) = struct.unpack_from(">I", view, pos)
    pos += 4
    queries = [string() for _ in range(min(nq, len(view)))]
    if len(queries) != nq or pos != len(view):
        raise ValueError("Invalid request length")
    return name, queries
