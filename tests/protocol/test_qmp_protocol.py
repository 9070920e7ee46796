"""The sans-IO QMP core: JSON streaming as QEMU's monitor parses it, framing, negotiation,
QEMU's error messages and id echo, the parser limits, and a fuzz test.

Expected strings are what qemu-storage-daemon 7.2 replied to the same bytes (recorded with
tests/interop/test_daemon_hostile.py, which also compares live).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qblock.monitor import commands  # noqa: F401  (registers the commands)
from qblock.monitor.context import BlockState
from qblock.monitor.dispatch import dispatch
from qblock.monitor.protocol import (MAX_NESTING, MAX_TOKEN_SIZE, QmpConnection, Request,
                                     encode, is_valid_codepoint, lossy_decode, parse_string)


def feed(data: bytes) -> list[Request]:
    return QmpConnection().feed(data)


def errors(data: bytes) -> list[str | None]:
    return [r.error for r in feed(data)]


def run_session(*messages: bytes, negotiate: bool = True) -> list[dict[str, Any]]:
    """Feed raw bytes to one session and dispatch each request; return the replies."""
    state, conn = BlockState(), QmpConnection()

    async def go() -> list[dict[str, Any]]:
        replies = []
        if negotiate:
            for req in conn.feed(b'{"execute": "qmp_capabilities"}'):
                assert await dispatch(state, conn, req) == {"return": {}}
        for data in messages:
            for req in conn.feed(data):
                replies.append(await dispatch(state, conn, req))
        return replies

    return asyncio.run(go())


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


# -- JSON streaming ------------------------------------------------------------------------
def test_values_and_qemu_extensions() -> None:
    assert [r.value for r in feed(b"{'a': 'it\\'s \"q\"'} [1, 2.5, -0, true, null]")] == [
        {"a": "it's \"q\""}, [1, 2.5, 0, True, None]]


def test_message_split_across_feeds_byte_by_byte() -> None:
    conn = QmpConnection()
    data = b'{"execute": "query-version", "id": ["\\u00e9", 12345, 1.5e3]}'
    out = [r for byte in data for r in conn.feed(bytes([byte]))]
    assert [r.value for r in out] == [{"execute": "query-version", "id": ["é", 12345, 1500.0]}]


def test_numbers_follow_qnum_rules() -> None:
    (req,) = feed(b"[18446744073709551615, -9223372036854775809, 0.1]")
    assert req.value[0] == 2**64 - 1 and isinstance(req.value[0], int)
    assert isinstance(req.value[1], float)


def test_a_number_waits_for_its_end() -> None:
    assert [r.value for r in feed(b"1 2 3")] == [1, 2]


@pytest.mark.parametrize("data, expected", [
    (b"[}", ["JSON parse error, expecting value"]),
    (b"[}]", ["JSON parse error, expecting value"] * 2),
    (b'{"a" 1}', ["JSON parse error, missing : in object pair"]),
    (b"{1: 2}", ["JSON parse error, key is not a string in object"]),
    (b'{"a": 1, }', ["JSON parse error, expecting value"]),
    (b'{"a": 1 "b"}', ["JSON parse error, expected separator in dict"]),
    (b"[1 2]", ["JSON parse error, expected separator in list"]),
    (b'{"a": 1, "a": 2}', ["JSON parse error, duplicate key"]),
    (b'"\\q"', ["JSON parse error, invalid escape sequence in string"]),
    (b'"\\u12"', ['JSON parse error, \\u12" is not a valid Unicode character']),
    (b'"\\uDBFF\\uDFFF"', ["JSON parse error, \\uDBFF\\uDFFF is not a valid Unicode character"]),
    (b'"\\ud800"', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'"\xef\xbf\xbe"', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'"\xff"', ["JSON parse error, stray '\"\ufffd'"]),
    (b'"abc\x00def"', ["JSON parse error, stray '\"abc'"]),
    (b"%", ["JSON parse error, stray '%'"]),
    (b'ab"\x01x\n{}', ["JSON parse error, invalid keyword 'ab'",
                       "JSON parse error, stray '\"\x01'", None]),
])
def test_parse_errors_match_qemu(data: bytes, expected: list[str | None]) -> None:
    assert errors(data) == expected


def test_lexical_error_recovers_at_next_brace() -> None:
    reqs = feed(b'XYZ garbage {"execute": "x"}')
    assert reqs[0].error == "JSON parse error, stray 'X'"
    assert reqs[-1].value == {"execute": "x"}


def test_modified_utf8_nul_and_surrogate_pairs() -> None:
    assert parse_string(b'"\xc0\x80"') == "\0"
    assert parse_string(b'"\\ud83d\\ude00"') == "\U0001F600"
    assert lossy_decode(b"a\xe2\x82b\xef\xbf\xbe") == "a\ufffdb\ufffd"


def test_nesting_limit() -> None:
    assert errors(b"[" * (MAX_NESTING + 1))[0] == "JSON nesting depth limit exceeded"
    deep = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    (req,) = feed(deep)
    assert req.error is None


def test_token_size_limit_then_the_rest_is_lexed_again() -> None:
    """A string over 64 MiB is cut there; what follows is lexed from the start state."""
    reqs = feed(b'"' + b"a" * MAX_TOKEN_SIZE + b"bb\" {}")
    assert [r.error for r in reqs] == ["JSON token size limit exceeded",
                                       "JSON parse error, invalid keyword 'bb'"]


def test_token_count_limit() -> None:
    (first, *rest) = feed(b"[" + b"1," * (1 << 20) + b"1]")
    assert first.error == "JSON token count limit exceeded"


def test_parse_error_message_is_capped_like_qemus_buffer() -> None:
    (req,) = feed(b"a" * 5000 + b" ")
    assert len(req.error.encode()) == len("JSON parse error, ") + 1023


# -- framing ---------------------------------------------------------------------------------
def test_framing_is_qemu_json_with_crlf() -> None:
    assert encode({"return": {}, "id": 1}) == b'{"return": {}, "id": 1}\r\n'
    assert encode({"id": float("inf"), "return": {}}) == b'{"return": {}, "id": inf}\r\n'
    assert encode({"return": {"a": 1}}, pretty=True) == b'{\r\n    "return": {\r\n        "a": 1\r\n    }\r\n}\r\n'


def test_greeting() -> None:
    from qblock.monitor.commands.control import VERSION
    greeting = json.loads(QmpConnection().greeting(VERSION))
    assert greeting == {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                            "package": VERSION.package},
                                "capabilities": ["oob"]}}


# -- dispatch: negotiation, messages, id echo ---------------------------------------------
def test_negotiation_mode() -> None:
    replies = run_session(b'{"execute": "query-version", "id": 7}', negotiate=False)
    assert replies == [{"id": 7, "error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}]
    again = run_session(b'{"execute": "qmp_capabilities"}')
    assert error_of(again[0]) == ("CommandNotFound",
                                  "Capabilities negotiation is already complete, command ignored")


def test_capability_not_offered() -> None:
    conn = QmpConnection(offered=())
    state = BlockState()
    (req,) = conn.feed(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    reply = asyncio.run(dispatch(state, conn, req))
    assert error_of(reply) == ("GenericError", "Capability oob not available")
    assert not conn.negotiated


@pytest.mark.parametrize("data, expected", [
    (b"[1]", "QMP input must be a JSON object"),
    (b"{}", "QMP input lacks member 'execute'"),
    (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": []}', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "query-version", "foo": 1}', "QMP input member 'foo' is unexpected"),
    (b'{"exec-oob": "x"}', "QMP input member 'exec-oob' is unexpected"),
    (b'{"execute": "query-version", "arguments": {"a": 1}}', "Parameter 'a' is unexpected"),
])
def test_request_errors(data: bytes, expected: str) -> None:
    (reply,) = run_session(data)
    assert error_of(reply) == ("GenericError", expected)


def test_unknown_command_and_id_echo() -> None:
    (reply,) = run_session(b'{"execute": "nope", "id": {"b": [1], "a": null}}')
    assert reply == {"error": {"class": "CommandNotFound",
                               "desc": "The command nope has not been found"},
                     "id": {"b": [1], "a": None}}
    assert encode(reply).startswith(b'{"id": {"a": null, "b": [1]}, "error"')


def test_parse_error_has_no_id() -> None:
    (reply,) = run_session(b'{"execute": "x", "id": 1,}')
    assert "id" not in reply


def test_oob_capability() -> None:
    state, conn = BlockState(), QmpConnection()

    async def go() -> list[dict[str, Any]]:
        data = (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
                b'{"exec-oob": "query-version", "id": 5}'
                b'{"execute": "query-version", "exec-oob": "x"}')
        return [await dispatch(state, conn, r) for r in conn.feed(data)]

    ok, not_oob, clash = asyncio.run(go())
    assert ok == {"return": {}} and conn.oob_enabled
    assert error_of(not_oob) == ("GenericError", "The command query-version does not support OOB")
    assert error_of(clash) == ("GenericError",
                               "QMP input member 'execute' clashes with 'exec-oob'")


def test_control_commands() -> None:
    version, cmds, schema, quit_ = run_session(
        b'{"execute": "query-version"}{"execute": "query-commands"}'
        b'{"execute": "query-qmp-schema"}{"execute": "quit"}')
    assert version["return"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    names = {c["name"] for c in cmds["return"]}
    assert {"qmp_capabilities", "query-version", "query-commands", "quit"} <= names
    assert {e["name"] for e in schema["return"] if e["meta-type"] == "command"} == names
    assert quit_ == {"return": {}}


# -- fuzz ------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_only_give_requests_or_json_errors(chunks: list[bytes]) -> None:
    """Any bytes: the core raises nothing; each input becomes a value or a JSON error, and
    each reply is a well-formed QMP reply."""
    conn = QmpConnection()
    state = BlockState()

    async def go() -> None:
        for chunk in chunks:
            for req in conn.feed(chunk):
                assert req.error is None or req.value is None
                reply = await dispatch(state, conn, req)
                assert set(reply) <= {"return", "error", "id"} and len(set(reply) - {"id"}) == 1
                assert encode(reply).endswith(b"}\r\n")

    asyncio.run(go())


_QAPI_TEXT = st.text(st.characters(codec="utf-8").filter(lambda c: is_valid_codepoint(ord(c))),
                     max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | _QAPI_TEXT,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(_QAPI_TEXT, inner, max_size=4), max_leaves=20))
def test_parser_agrees_with_json_on_valid_documents(value: Any) -> None:
    """Any JSON document Python writes (without the noncharacters QEMU rejects) parses back
    to the same value: Python's json module is the model."""
    text = json.dumps([value]).encode()
    (req,) = feed(text)
    assert req.value == [value]
