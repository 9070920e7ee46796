"""The sans-IO NBD server core: handshake, options, commands, replies, hostile input."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.exports.nbd import protocol as p

SIZE = 1 << 20


def exports(**kw: object) -> dict[str, p.ExportInfo]:
    info = p.ExportInfo("disk", SIZE, read_only=False, description="a disk", **kw)  # type: ignore[arg-type]
    ro = p.ExportInfo("ro", SIZE, read_only=True)
    return {"disk": info, "ro": ro}


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data


def info_data(name: str, *requests: int) -> bytes:
    return (struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", len(requests))
            + struct.pack(f">{len(requests)}H", *requests))


def meta_data(name: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies as (option, reply type, payload)."""
    out = []
    while data:
        magic, option, rep, n = struct.unpack_from(">QIII", data)
        assert magic == p.REP_MAGIC
        out.append((option, rep, data[20:20 + n]))
        data = data[20 + n:]
    return out


def feed(conn: p.ServerConnection, data: bytes) -> list[p.Event]:
    conn.receive_data(data)
    events = []
    while not isinstance(ev := conn.next_event(), p.NeedData):
        events.append(ev)
    return events


def negotiated(structured: bool = True, name: str = "disk",
               contexts: tuple[str, ...] = ()) -> p.ServerConnection:
    conn = p.ServerConnection(exports(allocation_depth=True))
    conn.data_to_send()
    data = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    if structured:
        data += opt(p.Opt.STRUCTURED_REPLY)
    if contexts:
        data += opt(p.Opt.SET_META_CONTEXT, meta_data(name, *contexts))
    events = feed(conn, data + opt(p.Opt.GO, info_data(name)))
    assert [type(e) for e in events] == [p.Ready]
    conn.data_to_send()
    return conn


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def test_greeting_and_go_replies_in_qemu_order() -> None:
    conn = p.ServerConnection(exports())
    assert conn.data_to_send() == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)
    feed(conn, struct.pack(">I", 3))
    events = feed(conn, opt(p.Opt.GO, info_data("disk", p.Info.NAME, p.Info.BLOCK_SIZE)))
    assert isinstance(events[0], p.Ready) and events[0].export.name == "disk"
    reps = replies(conn.data_to_send())
    assert [r[1] for r in reps] == [p.Rep.INFO] * 4 + [p.Rep.ACK]
    assert reps[0][2] == struct.pack(">H", p.Info.NAME) + b"disk"
    assert reps[1][2] == struct.pack(">H", p.Info.DESCRIPTION) + b"a disk"
    assert reps[2][2] == struct.pack(">HIII", p.Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    tflags = (p.TFlag.HAS_FLAGS | p.TFlag.SEND_FLUSH | p.TFlag.SEND_FUA | p.TFlag.SEND_CACHE
              | p.TFlag.SEND_TRIM | p.TFlag.SEND_WRITE_ZEROES | p.TFlag.SEND_FAST_ZERO
              | p.TFlag.CAN_MULTI_CONN)
    assert reps[3][2] == struct.pack(">HQH", p.Info.EXPORT, SIZE, tflags)


def test_info_keeps_negotiating_and_unknown_export() -> None:
    conn = p.ServerConnection(exports())
    events = feed(conn, struct.pack(">I", 1) + opt(p.Opt.INFO, info_data("ro"))
                  + opt(p.Opt.GO, info_data("nope")))
    assert events == []
    reps = replies(conn.data_to_send()[18:])
    export_info = [r for r in reps if r[2][:2] == b"\0\0"][0]
    assert struct.unpack(">HQH", export_info[2])[2] & p.TFlag.READ_ONLY
    assert reps[-2][1] == p.Rep.ACK and reps[-1][1] == p.Rep.ERR_UNKNOWN
    assert reps[-1][2] == b"export 'nope' not present"


def test_export_name_old_style_padding() -> None:
    conn = p.ServerConnection(exports())
    conn.data_to_send()
    events = feed(conn, struct.pack(">I", 1) + opt(p.Opt.EXPORT_NAME, b"ro"))
    assert isinstance(events[0], p.Ready)
    out = conn.data_to_send()
    assert len(out) == 8 + 2 + 124 and struct.unpack(">Q", out[:8])[0] == SIZE
    bad = p.ServerConnection(exports())
    with pytest.raises(p.ProtocolError):
        feed(bad, struct.pack(">I", 3) + opt(p.Opt.EXPORT_NAME, b"missing"))


def test_list_abort_starttls_unknown_and_structured_twice() -> None:
    conn = p.ServerConnection(exports())
    conn.data_to_send()
    feed(conn, struct.pack(">I", 1) + opt(p.Opt.LIST) + opt(p.Opt.LIST, b"x")
         + opt(p.Opt.STARTTLS) + opt(99) + opt(p.Opt.STRUCTURED_REPLY)
         + opt(p.Opt.STRUCTURED_REPLY))
    reps = [r[1:] for r in replies(conn.data_to_send())]
    assert reps[:3] == [(p.Rep.SERVER, struct.pack(">I", 4) + b"diska disk"),
                        (p.Rep.SERVER, struct.pack(">I", 2) + b"ro"), (p.Rep.ACK, b"")]
    assert [r[0] for r in reps[3:]] == [p.Rep.ERR_INVALID, p.Rep.ERR_POLICY, p.Rep.ERR_UNSUP,
                                        p.Rep.ACK, p.Rep.ERR_INVALID]
    events = feed(conn, opt(p.Opt.ABORT))
    assert isinstance(events[0], p.Closed)
    assert replies(conn.data_to_send())[0][1] == p.Rep.ACK


def test_meta_contexts_list_and_set() -> None:
    conn = p.ServerConnection(exports(allocation_depth=True))
    conn.data_to_send()
    feed(conn, struct.pack(">I", 1) + opt(p.Opt.LIST_META_CONTEXT, meta_data("disk")))
    assert replies(conn.data_to_send())[0][1] == p.Rep.ERR_INVALID  # needs structured replies
    feed(conn, opt(p.Opt.STRUCTURED_REPLY) + opt(p.Opt.LIST_META_CONTEXT, meta_data("disk")))
    listed = [r[2] for r in replies(conn.data_to_send())[1:] if r[1] == p.Rep.META_CONTEXT]
    assert listed == [b"\0\0\0\0base:allocation", b"\0\0\0\0qemu:allocation-depth"]
    feed(conn, opt(p.Opt.LIST_META_CONTEXT, meta_data("disk", "qemu:", "foo:bar")))
    assert [r[2] for r in replies(conn.data_to_send())] == [b"\0\0\0\0qemu:allocation-depth",
                                                           b""]
    feed(conn, opt(p.Opt.SET_META_CONTEXT, meta_data("disk", "qemu:allocation-depth",
                                                     "base:", "base:allocation")))
    chosen = [r[2] for r in replies(conn.data_to_send()) if r[1] == p.Rep.META_CONTEXT]
    assert chosen == [b"\0\0\0\0base:allocation", b"\0\0\0\1qemu:allocation-depth"]
    assert conn.meta == {0: "base:allocation", 1: "qemu:allocation-depth"}


def test_bad_magic_and_client_flags_are_protocol_errors() -> None:
    with pytest.raises(p.ProtocolError):
        feed(p.ServerConnection(exports()), struct.pack(">I", 1 << 5))
    conn = p.ServerConnection(exports())
    with pytest.raises(p.ProtocolError):
        feed(conn, struct.pack(">I", 1) + b"X" * 16)
    conn = negotiated()
    with pytest.raises(p.ProtocolError):
        feed(conn, b"\xff" * 28)


def test_commands_become_requests_and_replies() -> None:
    conn = negotiated(contexts=("base:allocation",))
    events = feed(conn, request(p.Cmd.WRITE, 512, 4, p.CmdFlag.FUA, data=b"abcd")
                  + request(p.Cmd.READ, 0, 8, cookie=8) + request(p.Cmd.FLUSH, cookie=9)
                  + request(p.Cmd.TRIM, 0, 512, cookie=10)
                  + request(p.Cmd.WRITE_ZEROES, 0, 512, p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO)
                  + request(p.Cmd.CACHE, 0, 512) + request(p.Cmd.BLOCK_STATUS, 0, SIZE,
                                                           p.CmdFlag.REQ_ONE))
    assert [e.command for e in events] == [p.Cmd.WRITE, p.Cmd.READ, p.Cmd.FLUSH, p.Cmd.TRIM,
                                           p.Cmd.WRITE_ZEROES, p.Cmd.CACHE, p.Cmd.BLOCK_STATUS]
    write, read = events[0], events[1]
    assert write.data == b"abcd" and write.flags == p.CmdFlag.FUA
    conn.reply_ok(write)
    assert conn.data_to_send() == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 7)
    conn.reply_read(read, [(0, 4, b"abcd"), (4, 4, None)])
    out = conn.data_to_send()
    first = struct.unpack_from(">IHHQI", out)
    assert first == (p.STRUCTURED_REPLY_MAGIC, 0, p.ReplyType.OFFSET_DATA, 8, 12)
    assert out[20:32] == struct.pack(">Q", 0) + b"abcd"
    assert struct.unpack_from(">IHHQIQI", out, 32)[1:] == (1, p.ReplyType.OFFSET_HOLE, 8, 12,
                                                            4, 4)
    conn.reply_block_status(events[6], [(0, [(SIZE, p.STATE_HOLE | p.STATE_ZERO)])])
    out = conn.data_to_send()
    assert struct.unpack(">IHHQIIII", out)[1:] == (1, p.ReplyType.BLOCK_STATUS, 7, 12, 0,
                                                   SIZE, 3)
    assert isinstance(feed(conn, request(p.Cmd.DISC))[0], p.Closed)


def test_simple_replies_without_structured() -> None:
    conn = negotiated(structured=False)
    (read,) = feed(conn, request(p.Cmd.READ, 0, 4))
    conn.reply_read(read, [(0, 4, None)])
    assert conn.data_to_send() == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 7) + bytes(4)
    assert feed(conn, request(p.Cmd.READ, 0, 4, p.CmdFlag.DF)) == []  # DF needs structured
    assert struct.unpack(">IIQ", conn.data_to_send())[1] == p.NBD_EINVAL
    assert feed(conn, request(p.Cmd.BLOCK_STATUS, 0, 4)) == []
    assert struct.unpack(">IIQ", conn.data_to_send())[1] == p.NBD_EINVAL


@pytest.mark.parametrize("name, req, err", [
    ("disk", request(p.Cmd.READ, SIZE - 1, 2), p.NBD_EINVAL),
    ("disk", request(p.Cmd.WRITE, SIZE, 1, data=b"x"), p.NBD_ENOSPC),
    ("disk", request(p.Cmd.WRITE_ZEROES, SIZE - 1, 2), p.NBD_ENOSPC),
    ("disk", request(p.Cmd.TRIM, 1 << 62, 2), p.NBD_EINVAL),
    ("disk", request(p.Cmd.READ, 0, 64 << 20), p.NBD_EINVAL),
    ("disk", request(42, 0, 0), p.NBD_EINVAL),
    ("disk", request(p.Cmd.WRITE, 0, 1, p.CmdFlag.NO_HOLE, data=b"x"), p.NBD_EINVAL),
    ("ro", request(p.Cmd.WRITE, 0, 1, data=b"x"), p.NBD_EPERM),
    ("ro", request(p.Cmd.TRIM, 0, 1), p.NBD_EPERM),
])
def test_invalid_requests_get_errors_not_events(name: str, req: bytes, err: int) -> None:
    conn = negotiated(name=name)
    assert feed(conn, req) == []
    out = conn.data_to_send()
    magic, flags, rtype, cookie, n, error, msglen = struct.unpack_from(">IHHQIIH", out)
    assert (magic, flags, rtype, cookie, error) == (p.STRUCTURED_REPLY_MAGIC, 1,
                                                    p.ReplyType.ERROR, 7, err)
    assert msglen == n - 6 > 0
    conn.receive_data(request(p.Cmd.FLUSH, cookie=1))
    assert isinstance(conn.next_event(), p.Request)  # the stream stays in sync


def test_oversized_write_answers_then_drops() -> None:
    conn = negotiated()
    with pytest.raises(p.ProtocolError):
        feed(conn, request(p.Cmd.WRITE, 0, 64 << 20))
    assert struct.unpack_from(">IHHQIIH", conn.data_to_send())[5] == p.NBD_EINVAL


def test_eof_mid_request_and_misuse() -> None:
    conn = negotiated()
    conn.receive_data(request(p.Cmd.WRITE, 0, 8, data=b"half"))
    assert conn.next_event() is p.NEED_DATA
    with pytest.raises(p.ProtocolError):
        conn.receive_data(b"")
    fresh = p.ServerConnection(exports())
    with pytest.raises(p.LocalProtocolError):
        fresh.reply_ok(p.Request(1, p.Cmd.FLUSH, p.CmdFlag.NONE, 0, 0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_fuzz_only_protocol_errors(chunks: list[bytes], handshake_done: bool) -> None:
    conn = negotiated() if handshake_done else p.ServerConnection(exports())
    try:
        for chunk in chunks:
            feed(conn, chunk)
    except p.ProtocolError:
        return
    assert isinstance(conn.next_event(), (p.NeedData, p.Closed, p.Request, p.Ready))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 2**32 - 1), st.binary(max_size=80))
def test_fuzz_option_payloads(option: int, payload: bytes) -> None:
    conn = p.ServerConnection(exports())
    try:
        feed(conn, struct.pack(">I", 1) + opt(p.Opt.STRUCTURED_REPLY) + opt(option, payload))
    except p.ProtocolError:
        return
    for _, rep, _ in replies(conn.data_to_send()[18:]):
        assert rep in p.Rep.__members__.values()


def test_block_size_required_only_for_info() -> None:
    """server.c: with request alignment > 1, OPT_INFO without BLOCK_SIZE is refused, OPT_GO is
    tolerated with minimum 1; a client that asks gets the alignment as minimum."""
    aligned = {"d": p.ExportInfo("d", SIZE, min_block=4096)}
    conn = p.ServerConnection(aligned)
    conn.data_to_send()
    feed(conn, struct.pack(">I", 1) + opt(p.Opt.INFO, info_data("d")))
    reps = replies(conn.data_to_send())
    assert reps[-1][1] == p.Rep.ERR_BLOCK_SIZE_REQD
    assert reps[0][2] == struct.pack(">HIII", p.Info.BLOCK_SIZE, 4096, 4096, 32 << 20)
    feed(conn, opt(p.Opt.INFO, info_data("d", p.Info.BLOCK_SIZE)))
    assert replies(conn.data_to_send())[-1][1] == p.Rep.ACK
    events = feed(conn, opt(p.Opt.GO, info_data("d")))
    assert isinstance(events[0], p.Ready)
    reps = replies(conn.data_to_send())
    assert reps[0][2] == struct.pack(">HIII", p.Info.BLOCK_SIZE, 1, 4096, 32 << 20)
