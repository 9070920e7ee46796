"""Hostile QMP clients against a real ``qblock daemon``, side by side with qemu-storage-daemon.

Each malformed input gets the reply the real qemu-storage-daemon 7.2 sends for the same bytes
(compared live, byte for byte, except query-version's numbers), and after every attack a
well-behaved qemu.qmp QMPClient is still served.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemon_tools import qblock, qsd, raw_exchange, running

qmp = pytest.importorskip("qemu.qmp")
pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

CASES = [
    b"{", b"}", b"[}", b"[}]", b'{"a" 1}', b"{1: 2}", b'{"a": 1,}', b"[1 2]",
    b'{"a": 1, "a": 2}', b'"\\q"', b'"\\u12"', b'"\\uDBFF\\uDFFF"', b'"\xef\xbf\xbe"',
    b'"\xff"', b'"abc\x00def"', b"%", b'ab"\x01x\n{"execute": "x"}', b"1 2 3", b"[1]", b"{}",
    b'{"execute": 1}', b'{"execute": "x", "arguments": []}', b'{"arguments": 1, "foo": 2}',
    b'{"execute": "query-version", "foo": 1, "id": 2}', b'{"exec-oob": "x"}',
    b'{"execute": "x", "exec-oob": "y"}', b'{"execute": "nope", "id": [1]}',
    b'{"execute": "qmp_capabilities"}', b'{"id": 1e400, "execute": "x"}',
    b'{"execute": "query-version", "arguments": {"a": 1}}',
    b'{"execute": "block_resize", "arguments": {"size": "x"}}',
    b'{"execute": "query-version", "id": {"b": 1, "a": 2}}',
    b'{"execute": "query-version", "id": "\xc0\x80\\ud83d\\ude00"}',
    b'{"execute": "query-version", "id": -9223372036854775809}',
    b"{'execute': 'query-version', 'id': '\\\"'}",
    b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}',
    b"[" * 1025 + b"]" * 1025 + b'{"execute": "query-version", "id": 3}',
]


def normalise(data: bytes) -> list[object]:
    """Replies as JSON values, query-version's version numbers and package blanked."""
    out: list[object] = []
    for line in data.split(b"\r\n")[:-1]:
        reply = json.loads(line.replace(b'"id": inf', b'"id": "inf"'))
        if isinstance(reply.get("return"), dict) and "qemu" in reply["return"]:
            reply["return"] = {"qemu": "...", "package": "..."}
        out.append(reply)
    return out


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    ours, our_sock = qblock(tmp)
    theirs, their_sock = qsd(tmp)
    with running(ours, our_sock), running(theirs, their_sock):
        yield our_sock, their_sock


def well_behaved(sock: Path) -> dict[str, object]:
    async def go() -> dict[str, object]:
        client = qmp.QMPClient("good")
        await client.connect(str(sock))
        try:
            return await client.execute("query-version")
        finally:
            await client.disconnect()
    return asyncio.run(asyncio.wait_for(go(), 30))


@pytest.mark.parametrize("negotiate", [True, False], ids=["command-mode", "negotiation"])
def test_malformed_input_gets_qemus_replies(daemons: tuple[Path, Path], negotiate: bool) -> None:
    ours, theirs = daemons
    for data in CASES:
        with ThreadPoolExecutor(2) as pool:
            got, expected = pool.map(
                lambda sock: raw_exchange(sock, data, negotiate=negotiate, quiet=0.3),
                (ours, theirs))
        assert normalise(got) == normalise(expected), data
        # Byte for byte where no version number is involved.
        if b"query-version" not in data:
            assert got == expected, data
    assert "qemu" in well_behaved(ours)


def test_100mb_message(daemons: tuple[Path, Path]) -> None:
    """A 100 MB command name: cut at QEMU's 64 MiB token limit, the rest lexed as QEMU does,
    then the next command is served.  (qemu-storage-daemon reads its monitor one byte per
    main-loop turn, far too slowly to compare here; the expected replies follow json-lexer.c.)"""
    ours, _ = daemons
    payload = b'{"execute": "' + b"a" * (100 << 20) + b'"}\n{"execute": "query-version", "id": 9}'
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(ours))
        f = s.makefile("rb")
        f.readline()
        s.sendall(b'{"execute": "qmp_capabilities"}')
        f.readline()
        s.sendall(payload)
        s.settimeout(120)
        replies = [f.readline() for _ in range(4)]
    elapsed = time.monotonic() - started
    assert replies[0] == b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\r\n'
    assert replies[1].startswith(b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'aaaa')
    assert replies[2] == b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"}\\n\'"}}\r\n'
    assert json.loads(replies[3])["id"] == 9
    assert elapsed < 60
    assert "qemu" in well_behaved(ours)


def test_disconnect_mid_message_and_mid_command(daemons: tuple[Path, Path]) -> None:
    ours, _ = daemons
    for tail in (b'{"execute": "query-ver', b'{"execute": "query-qmp-schema"}' * 50):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(ours))
            s.recv(4096)
            s.sendall(b'{"execute": "qmp_capabilities"}' + tail)
    assert "qemu" in well_behaved(ours)


def test_200_clients_at_once(daemons: tuple[Path, Path]) -> None:
    ours, _ = daemons
    results: list[bytes] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        reply = raw_exchange(ours, b'{"execute": "query-version", "id": %d}' % i, quiet=5)
        with lock:
            results.append(reply)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 200
    ids = sorted(json.loads(r.split(b"\r\n")[0])["id"] for r in results)
    assert ids == list(range(200))
    assert "qemu" in well_behaved(ours)


def test_client_that_never_reads(daemons: tuple[Path, Path]) -> None:
    """A client floods requests and never reads: the daemon stops reading from it
    (backpressure) instead of buffering without bound, and serves everyone else."""
    ours, _ = daemons
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(ours))
        s.setblocking(False)
        request = b'{"execute": "query-qmp-schema"}'
        sent = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                sent += s.send(request)
            except BlockingIOError:
                time.sleep(0.2)
                try:
                    sent += s.send(request)
                except BlockingIOError:
                    break
        assert time.monotonic() < deadline, "the daemon kept reading a client that never reads"
        assert "qemu" in well_behaved(ours)
