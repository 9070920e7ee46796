"""The QMP wire protocol without I/O: bytes in, parsed requests out; replies framed as bytes.

Input is parsed exactly as QEMU's monitor does (qobject/json-lexer.c, json-streamer.c,
json-parser.c): a table-driven lexer with QEMU's extensions (single-quoted strings, ``\\'``),
error recovery (after a lexical error input is skipped up to a bracket, a brace or a control
character, REFERENCE §3), the streamer's limits (64 MiB of tokens, 2 Mi tokens, nesting 1024)
and the parser's messages ("JSON parse error, ...").  Runs of bytes that stay in one lexer state
are consumed with one regular-expression match, so a 100 MB message costs a few table steps per
token, not a Python step per byte.

Output: every reply and event is ``qobject.to_json`` text followed by a newline written as CRLF
(monitor/monitor.c monitor_puts).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from qblock.errors import InvalidArgument
from qblock.qobject import quote, to_json

MAX_TOKEN_SIZE = 64 << 20  # json-lexer.c / json-streamer.c
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
PARSE_MESSAGE_MAX = 1023  # json-parser.c parse_error(): char message[1024]

# Lexer states (json-lexer.c enum json_lexer_state); ERROR must be 0 (the table's default).
(ERROR, RECOVERY, DQ_ESC, DQ, SQ_ESC, SQ, ZERO, EXP_DIGITS, EXP_SIGN, EXP_E, MANTISSA,
 MANTISSA_DIGITS, DIGITS, SIGN, KEYWORD, START) = range(16)
# Token types (json-parser-int.h JSONTokenType); OVERSIZE is a token cut at MAX_TOKEN_SIZE.
(LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INTEGER, FLOAT, KEYWORD_TOKEN, STRING,
 OVERSIZE) = range(100, 111)
TOKEN_MIN = LCURLY
LOOKAHEAD = 0x100  # the transition does not consume the character


def _build_table() -> list[list[int]]:
    """json-lexer.c json_lexer[][256]: next state (or token type) per state and byte."""
    table = [[ERROR] * 256 for _ in range(START + 1)]

    def put(state: int, chars: bytes | range, nxt: int) -> None:
        for c in chars:
            table[state][c] = nxt

    def terminal(state: int, token: int) -> None:  # TERMINAL(): any ASCII char ends the token
        put(state, range(0x80), token | LOOKAHEAD)

    put(RECOVERY, range(0x20), START | LOOKAHEAD)
    put(RECOVERY, range(0x20, 0xFE), RECOVERY)
    put(RECOVERY, b"\xfe\xff[]{}", START | LOOKAHEAD)
    put(RECOVERY, b"\t", RECOVERY)
    for esc, body, quote_char in ((DQ_ESC, DQ, b'"'), (SQ_ESC, SQ, b"'")):
        put(esc, range(0x20, 0xFE), body)
        put(body, range(0x20, 0xFE), body)
        put(body, b"\\", esc)
        put(body, quote_char, STRING)
    terminal(ZERO, INTEGER)
    put(ZERO, b"0123456789", ERROR)
    put(ZERO, b".", MANTISSA)
    terminal(EXP_DIGITS, FLOAT)
    put(EXP_DIGITS, b"0123456789", EXP_DIGITS)
    put(EXP_SIGN, b"0123456789", EXP_DIGITS)
    put(EXP_E, b"-+", EXP_SIGN)
    put(EXP_E, b"0123456789", EXP_DIGITS)
    terminal(MANTISSA_DIGITS, FLOAT)
    put(MANTISSA_DIGITS, b"0123456789", MANTISSA_DIGITS)
    put(MANTISSA_DIGITS, b"eE", EXP_E)
    put(MANTISSA, b"0123456789", MANTISSA_DIGITS)
    terminal(DIGITS, INTEGER)
    put(DIGITS, b"0123456789", DIGITS)
    put(DIGITS, b"eE", EXP_E)
    put(DIGITS, b".", MANTISSA)
    put(SIGN, b"0", ZERO)
    put(SIGN, b"123456789", DIGITS)
    terminal(KEYWORD, KEYWORD_TOKEN)
    put(KEYWORD, bytes(range(ord("a"), ord("z") + 1)), KEYWORD)
    put(START, b'"', DQ)
    put(START, b"'", SQ)
    put(START, b"0", ZERO)
    put(START, b"123456789", DIGITS)
    put(START, b"-", SIGN)
    for char, token in zip(b"{}[],:", (LCURLY, RCURLY, LSQUARE, RSQUARE, COMMA, COLON)):
        table[START][char] = token
    put(START, bytes(range(ord("a"), ord("z") + 1)), KEYWORD)
    put(START, b" \t\r\n", START)
    return table


_TABLE = _build_table()

# Runs of input that keep the lexer in the same state (self-loops of the table above).  Each is
# a shortcut for many identical table steps, never a different result.
_RUNS = {
    START: re.compile(rb"[ \t\r\n]+"),
    RECOVERY: re.compile(rb"[\t\x20-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
    DQ: re.compile(rb'[\x20\x21\x23-\x5b\x5d-\xfd]+'),  # escapes take table steps
    SQ: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    DIGITS: re.compile(rb"[0-9]+"),
    MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    EXP_DIGITS: re.compile(rb"[0-9]+"),
    KEYWORD: re.compile(rb"[a-z]+"),
}
_SKIPPING = (START, RECOVERY)  # states whose run is not part of a token

Emit = Callable[[int, bytes], None]


class JsonLexer:
    """json-lexer.c: splits bytes into tokens and passes them to ``emit(type, text)``."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.state = START
        self.token = bytearray()

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            run = _RUNS.get(self.state)
            if run is not None:
                limit = end if self.state in _SKIPPING else min(
                    end, pos + MAX_TOKEN_SIZE + 1 - len(self.token))
                m = run.match(data, pos, limit)
                if m:
                    if self.state not in _SKIPPING:
                        self.token += data[pos:m.end()]
                    pos = m.end()
                    self._check_size()
                    continue
            self._feed_char(data[pos])
            pos += 1

    def _feed_char(self, ch: int) -> None:
        """json_lexer_feed_char(): one table step, repeated while the char is looked ahead at."""
        consumed = False
        while not consumed:
            nxt = _TABLE[self.state][ch]
            consumed = not nxt & LOOKAHEAD
            nxt &= ~LOOKAHEAD
            if consumed:
                self.token.append(ch)
            if nxt >= TOKEN_MIN:
                self.emit(nxt, bytes(self.token))
                self.token.clear()
                nxt = START
            elif nxt == START:
                self.token.clear()
            elif nxt == ERROR:
                self.emit(ERROR, bytes(self.token))
                self.token.clear()
                nxt = RECOVERY
            elif nxt == RECOVERY:
                self.token.clear()
            self.state = nxt
        self._check_size()

    def _check_size(self) -> None:
        # "Do not let a single token grow to an arbitrarily large size"
        if len(self.token) > MAX_TOKEN_SIZE:
            self.emit(OVERSIZE, bytes(self.token))
            self.token.clear()
            self.state = START


@dataclasses.dataclass
class Request:
    """One complete input: a parsed JSON value, or the JSON error QEMU reports for it."""

    value: Any = None
    error: str | None = None

    @property
    def is_oob(self) -> bool:
        """monitor/qmp.c qmp_is_oob(): has ``exec-oob`` and no ``execute``."""
        return (self.error is None and isinstance(self.value, dict)
                and "exec-oob" in self.value and "execute" not in self.value)


class JsonStreamer:
    """json-streamer.c: groups tokens into messages, enforces the limits, runs the parser."""

    def __init__(self) -> None:
        self.lexer = JsonLexer(self._process_token)
        self.out: list[Request] = []
        self._reset()

    def _reset(self) -> None:
        self.brace_count = 0
        self.bracket_count = 0
        self.tokens: list[tuple[int, bytes]] = []
        self.token_size = 0

    def feed(self, data: bytes) -> list[Request]:
        self.lexer.feed(data)
        out, self.out = self.out, []
        return out

    def _emit(self, request: Request) -> None:
        self._reset()
        self.out.append(request)

    def _process_token(self, kind: int, text: bytes) -> None:
        if kind == LCURLY:
            self.brace_count += 1
        elif kind == RCURLY:
            self.brace_count -= 1
        elif kind == LSQUARE:
            self.bracket_count += 1
        elif kind == RSQUARE:
            self.bracket_count -= 1
        elif kind == ERROR:
            stray = lossy_decode(text.split(b"\0", 1)[0])
            return self._emit(Request(error=f"JSON parse error, stray '{stray}'"))
        # "we limit total memory allocated per object and the maximum recursion depth"
        if self.token_size + len(text) + 1 > MAX_TOKEN_SIZE:
            return self._emit(Request(error="JSON token size limit exceeded"))
        if len(self.tokens) + 1 > MAX_TOKEN_COUNT:
            return self._emit(Request(error="JSON token count limit exceeded"))
        if self.bracket_count + self.brace_count > MAX_NESTING:
            return self._emit(Request(error="JSON nesting depth limit exceeded"))
        self.tokens.append((kind, text))
        self.token_size += len(text)
        if ((self.brace_count > 0 or self.bracket_count > 0)
                and self.brace_count >= 0 and self.bracket_count >= 0):
            return None
        try:
            request = Request(value=parse_tokens(self.tokens))
        except JsonParseError as exc:
            request = Request(error=str(exc))
        return self._emit(request)


class JsonParseError(Exception):
    """json-parser.c parse_error(): the message is "JSON parse error, " and at most 1023 bytes."""

    def __init__(self, message: str) -> None:
        super().__init__("JSON parse error, " + message[:PARSE_MESSAGE_MAX])


_EXPECT_KEY, _EXPECT_VALUE = 0, 1


def parse_tokens(tokens: list[tuple[int, bytes]]) -> Any:
    """json-parser.c json_parser_parse() on one message, without recursion (nesting is 1024).

    The first error wins, as in QEMU, so the same messages come out in the same cases.
    """
    pos = 0
    n = len(tokens)
    stack: list[list[Any]] = []  # [container, stage, pending key]

    def pop() -> tuple[int, bytes]:
        nonlocal pos
        if pos >= n:
            raise JsonParseError("premature EOI")
        pos += 1
        return tokens[pos - 1]

    while True:
        # parse_value()
        if pos >= n:
            raise JsonParseError("premature EOI")
        kind, text = tokens[pos]
        complete = True
        if kind == LCURLY or kind == LSQUARE:
            pos += 1
            container: Any = {} if kind == LCURLY else []
            if pos >= n:
                raise JsonParseError("premature EOI")
            if tokens[pos][0] == (RCURLY if kind == LCURLY else RSQUARE):
                pos += 1
                value = container
            else:
                stack.append([container, _EXPECT_KEY, None])
                complete = False
        elif kind in (INTEGER, FLOAT, STRING):
            pos += 1
            value = _literal(kind, text)
        elif kind == KEYWORD_TOKEN:
            pos += 1
            value = _keyword(text)
        else:
            raise JsonParseError("expecting value")
        # Hand the finished value to the enclosing containers.
        while complete and stack:
            frame = stack[-1]
            container = frame[0]
            if isinstance(container, list):
                container.append(value)
                closer, what = RSQUARE, "list"
            elif frame[1] == _EXPECT_KEY:
                if not isinstance(value, str):
                    raise JsonParseError("key is not a string in object")
                if pop()[0] != COLON:
                    raise JsonParseError("missing : in object pair")
                frame[1], frame[2] = _EXPECT_VALUE, value
                break
            else:
                if frame[2] in container:
                    raise JsonParseError("duplicate key")
                container[frame[2]] = value
                frame[1] = _EXPECT_KEY
                closer, what = RCURLY, "dict"
            kind = pop()[0]
            if kind == closer:
                stack.pop()
                value = container
                continue
            if kind != COMMA:
                raise JsonParseError(f"expected separator in {what}")
            break
        if complete and not stack:
            return value


def _keyword(text: bytes) -> Any:
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise JsonParseError(f"invalid keyword '{text.decode('ascii')}'")


_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def _literal(kind: int, text: bytes) -> Any:
    if kind == STRING:
        return parse_string(text)
    if kind == INTEGER:
        # int64 if it fits, else uint64, else a double (json-parser.c parse_literal)
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(text)


_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                   ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _cvt4hex(text: bytes) -> int:
    return int(text, 16) if _HEX4.fullmatch(text) else -1


def parse_string(token: bytes) -> str:
    """json-parser.c parse_string(): escapes, surrogate pairs, modified UTF-8 validation."""
    body = token[1:-1]
    parts: list[str] = []
    pos = 0
    while True:
        esc = body.find(b"\\", pos)
        segment = body[pos:] if esc < 0 else body[pos:esc]
        if segment:
            decoded = strict_decode(segment)
            if decoded is None:
                raise JsonParseError("invalid UTF-8 sequence in string")
            parts.append(decoded)
        if esc < 0:
            return "".join(parts)
        code = body[esc + 1]
        if code in _SIMPLE_ESCAPES:
            parts.append(_SIMPLE_ESCAPES[code])
            pos = esc + 2
            continue
        if code != ord("u"):
            raise JsonParseError("invalid escape sequence in string")
        cp = _cvt4hex(body[esc + 2:esc + 6])
        length = 6
        if 0xD800 <= cp <= 0xDBFF and body[esc + 6:esc + 8] == b"\\u":
            trailing = _cvt4hex(body[esc + 8:esc + 12])
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                length = 12
            else:
                cp = -1
        if not is_valid_codepoint(cp):
            shown = lossy_decode(token[esc + 1:esc + 1 + length])
            raise JsonParseError(f"{shown} is not a valid Unicode character")
        parts.append(chr(cp))
        pos = esc + length


def is_valid_codepoint(cp: int) -> bool:
    """util/unicode.c is_valid_codepoint(): no surrogates, no noncharacters, at most U+10FFFF."""
    if cp < 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


_NONCHARACTERS = re.compile("[\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17)) + "]")
# Well-formed UTF-8 plus modified UTF-8's two-byte NUL (util/unicode.c mod_utf8_codepoint).
_UTF8_RUN = re.compile(rb"(?:[\x01-\x7f]|\xc0\x80|[\xc2-\xdf][\x80-\xbf]"
                       rb"|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
                       rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}"
                       rb"|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})+")


def _decode_valid(data: bytes) -> str:
    return data.replace(b"\xc0\x80", b"\0").decode("utf-8")


def strict_decode(data: bytes) -> str | None:
    """Decode modified UTF-8 as QEMU's parser accepts it, or None if any sequence is invalid.

    The lexer keeps control characters out of strings, so ``data`` holds no NUL byte.
    """
    if data.isascii():
        return data.decode("ascii")
    try:
        text = _decode_valid(data)
    except UnicodeDecodeError:
        return None
    return None if _NONCHARACTERS.search(text) else text


def _invalid_sequence_length(data: bytes, pos: int) -> int:
    """Bytes mod_utf8_codepoint() consumes for the invalid sequence starting at ``pos``."""
    byte = data[pos]
    if byte >= 0xFE or not byte & 0x40:
        return 1  # impossible byte or unexpected continuation byte
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    end = pos + 1
    for _ in range(1, length):
        if end >= len(data) or data[end] & 0xC0 != 0x80:
            break  # continuation byte missing: stops before it
        end += 1
    return end - pos


def lossy_decode(data: bytes) -> str:
    """Decode as json-writer.c prints a C string: each invalid sequence becomes U+FFFD."""
    if data.isascii():
        return data.decode("ascii")
    parts: list[str] = []
    pos = 0
    while pos < len(data):
        m = _UTF8_RUN.match(data, pos)
        if m:
            parts.append(_NONCHARACTERS.sub("\ufffd", _decode_valid(m.group())))
            pos = m.end()
        else:
            parts.append("\ufffd")
            pos += _invalid_sequence_length(data, pos)
    return "".join(parts)


def encode(message: Any, *, pretty: bool = False) -> bytes:
    """Frame one reply or event: QEMU's JSON text, newline written as CRLF (monitor_puts)."""
    try:
        text = to_json(message, pretty=pretty)
    except ValueError:
        text = _to_json_nonfinite(message, pretty)
    return (text + "\n").replace("\n", "\r\n").encode("utf-8")


def _to_json_nonfinite(message: Any, pretty: bool) -> str:
    """Print numbers too large for a double (an echoed ``"id": 1e400``) as C's "%.17g" does.

    qobject.to_json refuses non-finite values; QEMU prints them as ``inf``, ``-inf``, ``nan``.
    """
    spelled: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            key = f"\0nonfinite{len(spelled)}\0"
            spelled[quote(key)] = "%.17g" % value
            return key
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = to_json(mark(message), pretty=pretty)
    for placeholder, spelling in spelled.items():
        text = text.replace(placeholder, spelling)
    return text


@dataclasses.dataclass
class Version:
    major: int
    minor: int
    micro: int
    package: str


class QmpConnection:
    """The protocol state of one QMP session (monitor/qmp.c MonitorQMP).

    Starts in capabilities-negotiation mode; ``qmp_capabilities`` switches it to command mode
    (``negotiated``), enabling the capabilities it accepted.  ``oob`` is offered on socket
    monitors, as QEMU does for monitors running in its I/O thread.
    """

    def __init__(self, *, pretty: bool = False, offered: tuple[str, ...] = ("oob",)) -> None:
        self.pretty = pretty
        self.offered = offered
        self.enabled: set[str] = set()
        self.negotiated = False
        self.streamer = JsonStreamer()

    @property
    def oob_enabled(self) -> bool:
        return "oob" in self.enabled

    def greeting(self, version: Version) -> bytes:
        return self.encode({"QMP": {
            "version": {"qemu": {"major": version.major, "minor": version.minor,
                                 "micro": version.micro},
                        "package": version.package},
            "capabilities": list(self.offered)}})

    def feed(self, data: bytes) -> list[Request]:
        """Bytes from the client; returns each complete request (or JSON error) in order."""
        return self.streamer.feed(data)

    def encode(self, message: Any) -> bytes:
        return encode(message, pretty=self.pretty)

    def accept_capabilities(self, wanted: list[str]) -> None:
        """monitor/qmp.c qmp_caps_accept(): all or nothing; switches to command mode."""
        unavailable = [c for c in wanted if c not in self.offered]
        if unavailable:
            raise InvalidArgument(f"Capability {', '.join(unavailable)} not available")
        self.enabled = set(wanted)
        self.negotiated = True
