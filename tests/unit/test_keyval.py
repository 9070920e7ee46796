"""Tests for qblock.keyval, with cases ported from QEMU tests/unit/test-keyval.c."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qblock.errors import QBlockError
from qblock.keyval import (
    KeyvalError, coerce, format_keyval, parse_keyval, parse_option_arg, parse_qemu_opts,
    to_bool, to_int, to_size,
)

LONG = "a" * 127 + "z"  # test-keyval.c long_key: 128 characters, one too many

# --- seed command lines --------------------------------------------------------------------


def test_seed_blockdev_file() -> None:
    text = ("node-name=file01,driver=file,aio=threads,filename=test01.qcow2,"
            "cache.direct=on,cache.no-flush=off")
    assert parse_keyval(text) == {
        "node-name": "file01", "driver": "file", "aio": "threads",
        "filename": "test01.qcow2", "cache": {"direct": "on", "no-flush": "off"},
    }
    assert parse_option_arg(text, "driver") == parse_keyval(text)


def test_seed_blockdev_qcow2() -> None:
    text = "node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,file=file01"
    assert parse_keyval(text, "driver") == {
        "node-name": "drive01", "driver": "qcow2",
        "cache": {"direct": "on", "no-flush": "off"}, "file": "file01",
    }


# --- test-keyval.c test_keyval_parse / test_keyval_parse_list ------------------------------

PARSE_OK = [
    ("", None, {}),                                                 # nothing
    ("k." + LONG[1:] + "=v", None, {"k": {LONG[1:]: "v"}}),         # long key fragment
    (LONG[1:] + "=v", None, {LONG[1:]: "v"}),                       # long key
    ("a=1,b=2,,x,a=3", None, {"a": "3", "b": "2,x"}),               # last one wins
    ("id=foo,id=bar", None, {"id": "bar"}),
    ("a.b.c=1,a.b.c=2,d=3", None, {"a": {"b": {"c": "2"}}, "d": "3"}),
    ("x=y,", None, {"x": "y"}),                                     # trailing comma ignored
    ("x=,,id=bar", None, {"x": ",id=bar"}),
    ("id=666", None, {"id": "666"}),                                # anti-social ID: caller's job
    ("an,aus=off,noaus=", "implied", {"implied": "an", "aus": "off", "noaus": ""}),
    ("val", "eins.zwei", {"eins": {"zwei": "val"}}),                # implied dotted key
    ("help=on", None, {"help": "on"}),
    ("help.abc", "implied", {"implied": "help.abc"}),
    ("a=x,,y", None, {"a": "x,y"}),
    ("a=,,,,", None, {"a": ",,"}),
    ("a=x=y", None, {"a": "x=y"}),
    ("a=", None, {"a": ""}),
    ("list.0=null,list.2=zwei,list.1=eins", None, {"list": ["null", "eins", "zwei"]}),
    ("list.1=goner,list.0=null,list.01=eins,list.2=zwei", None,
     {"list": ["null", "eins", "zwei"]}),
    ("a.list.1=eins,a.list.00=null,a.list.2=zwei", None,
     {"a": {"list": ["null", "eins", "zwei"]}}),
    ("a.0=,a.1=I,a.2.0=II", None, {"a": ["", "I", ["II"]]}),
    ("a.0=,b.0.0=head", None, {"a": [""], "b": [["head"]]}),
    ("bitmaps.0=a,bitmaps.1=b", None, {"bitmaps": ["a", "b"]}),
    ("__com.redhat_x.y=1", None, {"__com.redhat_x": {"y": "1"}}),   # downstream QAPI name
]

PARSE_ERR = [
    ("=val", None, "Invalid parameter ''"),                         # empty key
    (".", None, "Invalid parameter '.'"),                           # empty key fragment
    ("key.", None, "Invalid parameter 'key.'"),
    ("7up=val", None, "Invalid parameter '7up'"),
    (LONG + "=v", None, f"Parameter '{LONG}' is too long"),
    ("k." + LONG + "=v", None, f"Parameter fragment '{LONG}' is too long"),
    ("key[0]=val", None, "Invalid parameter 'key[0]'"),
    ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
    ("a.b=1,a.b.c=2", None, "Parameters 'a.b.*' used inconsistently"),
    ("a=1,a.b=2", None, "Parameters 'a.*' used inconsistently"),
    (",", None, "Invalid parameter ''"),
    ("an,noaus,noaus=", None, "Expected '=' after parameter 'an'"),  # no implied value
    ("no", None, "Expected '=' after parameter 'no'"),
    ("x=1,val", None, "Expected '=' after parameter 'val'"),
    (",", "implied", "Invalid parameter ''"),                       # implied key, empty value
    (",,,a=1", "implied", "Invalid parameter ''"),
    ("val,,ue", "implied", "Invalid parameter ''"),                 # implied value can't have ,
    ("=val", "implied", "Invalid parameter ''"),
    ("a=1,b", "implied", "Expected '=' after parameter 'b'"),       # only the first is implied
    ("help", None, "Help is not available for this option"),
    ("help", "implied", "Help is not available for this option"),
    ("number=42,help,foo=bar", None, "Help is not available for this option"),
    ("?", None, "Help is not available for this option"),
    ("help.abc", None, "Expected '=' after parameter 'help.abc'"),
    ("0=1", None, "Invalid parameter '0'"),                         # root can't be a list
    ("a.b.c=1,a.b.0=2", None, "Parameters 'a.b.*' used inconsistently"),
    ("a.0.c=1,a.b.c=2", None, "Parameters 'a.*' used inconsistently"),
    ("list.1=lonely", None, "Parameter 'list.0' missing"),
    ("list.0=null,list.2=eins,list.02=zwei", None, "Parameter 'list.1' missing"),
    ("bitmaps.0=a,bitmaps.2=b", None, "Parameter 'bitmaps.1' missing"),
    ("a.1x=v", None, "Invalid parameter 'a.1x'"),
]


@pytest.mark.parametrize(("text", "implied", "expected"), PARSE_OK)
def test_parse_ok(text: str, implied: str | None, expected: dict) -> None:
    assert parse_keyval(text, implied) == expected


@pytest.mark.parametrize(("text", "implied", "message"), PARSE_ERR)
def test_parse_error(text: str, implied: str | None, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval(text, implied)
    assert str(info.value) == message


def test_error_hierarchy() -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval("7up=val")
    assert isinstance(info.value, QBlockError)
    assert isinstance(info.value, ValueError)


# --- JSON form -------------------------------------------------------------------------------


def test_json_object() -> None:
    assert parse_option_arg('{"driver": "file", "filename": "x"}', "driver") == {
        "driver": "file", "filename": "x"}


def test_json_single_quotes() -> None:
    text = """{'driver': 'file', 'filename': 'it\\'s "x"', "cache": {'direct': true}}"""
    assert parse_option_arg(text) == {
        "driver": "file", "filename": 'it\'s "x"', "cache": {"direct": True}}


def test_json_keeps_types() -> None:
    text = '{"a": 1, "b": -1, "c": 1.5, "d": null, "e": [1, "x"], "f": 18446744073709551616}'
    assert parse_option_arg(text) == {
        "a": 1, "b": -1, "c": 1.5, "d": None, "e": [1, "x"], "f": 2.0**64}


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
    ('{"a": NaN}', "JSON parse error, invalid keyword 'NaN'"),
    ('{"a": 1} x', "JSON parse error, Extra data"),
    ("{'a: 1}", "JSON parse error, "),
    ('{"a": "\\q"}', "JSON parse error, Invalid \\escape"),
])
def test_json_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError, match="^" + message.replace("\\", "\\\\")):
        parse_option_arg(text)


def test_non_object_json_is_not_json() -> None:
    # qobject_input_visitor_new_str() only treats a leading '{' as JSON.
    with pytest.raises(KeyvalError, match=r"Invalid parameter '\[1\]'"):
        parse_option_arg("[1]")
    with pytest.raises(KeyvalError, match="Invalid parameter"):
        parse_option_arg(' {"a": 1}')


# --- QemuOpts ---------------------------------------------------------------------------------

QEMU_OPTS = [
    ("socket,id=c,path=P,server=on,wait=off", "backend",
     {"id": "c", "backend": "socket", "path": "P", "server": "on", "wait": "off"}),
    ("iothread,id=x", "qom-type", {"id": "x", "qom-type": "iothread"}),
    ("file,path=a,,b", "backend", {"backend": "file", "path": "a,b"}),
    ("a,,b,x=1", "backend", {"backend": "a,b", "x": "1"}),           # implied value with ,,
    ("an,noaus,noaus=", "implied", {"implied": "an", "aus": "off", "noaus": ""}),
    ("socket,server,nowait", "backend", {"backend": "socket", "server": "on", "wait": "off"}),
    ("cache.direct=on", None, {"cache.direct": "on"}),                # flat: dots stay
    ("=val", None, {"": "val"}),                                      # empty name accepted
    ("x=1,x=2", None, {"x": "2"}),                                    # last one wins ...
    ("id=foo,id=bar", None, {"id": "foo"}),                           # ... except for id
    ("help", None, {"help": "on"}),
    (",a=1", "backend", {"backend": "", "a": "1"}),
    ("x,,id=bar", "backend", {"id": "bar", "backend": "x,id=bar"}),   # QEMU's id scan quirk
    ("", "backend", {}),
]


@pytest.mark.parametrize(("text", "implied", "expected"), QEMU_OPTS)
def test_qemu_opts(text: str, implied: str | None, expected: dict) -> None:
    assert parse_qemu_opts(text, implied) == expected


def test_qemu_opts_bad_id() -> None:
    with pytest.raises(KeyvalError, match="^Parameter 'id' expects an identifier$"):
        parse_qemu_opts("id=666")


# --- conversions (test-keyval.c test_keyval_visit_*, util/cutils.c qemu_strtosz) -------------


@pytest.mark.parametrize(("text", "expected"), [
    ("on", True), ("yes", True), ("true", True), ("y", True),
    ("off", False), ("no", False), ("false", False), ("n", False),
])
def test_to_bool(text: str, expected: bool) -> None:
    assert to_bool(text, "b") is expected


@pytest.mark.parametrize("text", ["offer", "ON", "", "1"])
def test_to_bool_bad(text: str) -> None:
    with pytest.raises(KeyvalError, match="^Parameter 'bool1' expects 'on' or 'off'$"):
        to_bool(text, "bool1")


@pytest.mark.parametrize(("text", "unsigned", "expected"), [
    ("0", True, 0),
    ("18446744073709551615", True, 2**64 - 1),
    ("-1", True, 2**64 - 1),                # strtoull() negation
    ("0x2a", True, 42), ("052", True, 42),  # hex and octal
    ("-9223372036854775808", False, -2**63),
    ("9223372036854775807", False, 2**63 - 1),
    (" +42", False, 42), ("-0x10", False, -16),
])
def test_to_int(text: str, unsigned: bool, expected: int) -> None:
    assert to_int(text, "number1", unsigned=unsigned) == expected


@pytest.mark.parametrize(("text", "unsigned"), [
    ("18446744073709551616", True), ("-18446744073709551616", True),
    ("9223372036854775808", False), ("-9223372036854775809", False),
    ("3.14", False), ("08", False), ("", False), ("0x", False), ("12 ", False), ("1_0", False),
])
def test_to_int_bad(text: str, unsigned: bool) -> None:
    with pytest.raises(KeyvalError, match="^Parameter 'number1' expects integer$"):
        to_int(text, "number1", unsigned=unsigned)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0),
    ("9007199254740991", 2**53 - 1), ("9007199254740992", 2**53), ("9007199254740993", 2**53 + 1),
    ("9223372036854775807", 2**63 - 1), ("9223372036854775808", 2**63),
    ("18446744073709549568", 0xfffffffffffff800), ("18446744073709550591", 0xfffffffffffffbff),
    ("18446744073709551615", 2**64 - 1),
    ("8b", 8), ("1.5k", 1536), ("2M", 2 * 2**20), ("0.1G", 2**30 // 10),
    ("16777215T", 16777215 * 2**40),
    ("1.5G", 3 * 2**29), ("1K", 1024), ("1P", 2**50), ("1E", 2**60), ("1.5e", 3 * 2**59),
    ("12.345M", int(12.345 * 2**20 + 0.5)),  # rounded half up
    ("1.k", 1024), ("1.", 1), ("1.0B", 1), (".5k", 512), (" 42", 42), ("+42", 42),
    ("0x7fEE", 0x7fee), ("0x1b", 27),        # hex: plain byte count, 'b' is a digit
    ("08", 8),                               # decimal, not octal
])
def test_to_size(text: str, expected: int) -> None:
    assert to_size(text, "sz1") == expected


@pytest.mark.parametrize("text", [
    "-1", "-0", "18446744073709551616", "16777216T", "0Z", "16Gi", "", ".", "k",
    "1.5", "1.5B",            # a fraction needs a scaling suffix
    "1e3", "1.5e3",           # no exponents
    "0x20M", "0x1.8", "0x",   # no hex with suffix or fraction
    "1 K", "1KB",
])
def test_to_size_bad(text: str) -> None:
    with pytest.raises(KeyvalError, match="^Parameter 'sz1' expects size$"):
        to_size(text, "sz1")


def test_coerce() -> None:
    schema = {"driver": "str", "size": "size", "cache": {"direct": "bool"},
              "bitmaps": ["str"], "nums": ["int"], "opaque": "any"}
    value = parse_keyval("driver=null-co,size=1G,cache.direct=on,bitmaps.0=b0,nums.0=0x10,"
                         "opaque.x=1,extra=y")
    assert coerce(value, schema) == {
        "driver": "null-co", "size": 2**30, "cache": {"direct": True}, "bitmaps": ["b0"],
        "nums": [16], "opaque": {"x": "1"}, "extra": "y"}
    # JSON values are already typed and pass through.
    assert coerce({"size": 5, "cache": {"direct": False}}, schema) == {
        "size": 5, "cache": {"direct": False}}


@pytest.mark.parametrize(("text", "message"), [
    ("cache.direct=maybe", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("nums.0=1,nums.1=x", "Parameter 'nums[1]' expects integer"),
    ("cache=on", "Invalid parameter type for 'cache', expected: object"),
    ("nums=1", "Invalid parameter type for 'nums', expected: array"),
    ("size.x=1", "Invalid parameter type for 'size', expected: string"),
])
def test_coerce_errors(text: str, message: str) -> None:
    schema = {"size": "size", "cache": {"direct": "bool"}, "nums": ["uint64"]}
    with pytest.raises(KeyvalError) as info:
        coerce(parse_keyval(text), schema)
    assert str(info.value) == message


# --- format_keyval and properties ------------------------------------------------------------


def test_format_keyval() -> None:
    assert format_keyval({}) == ""
    assert format_keyval({"a": "x,y", "b": {"c": ["1", {"d": ""}]}}) == "a=x,,y,b.c.0=1,b.c.1.d="


@pytest.mark.parametrize("options", [{"a": {}}, {"a": []}, {"7up": "x"}, {"a": {"0": "x"}}])
def test_format_keyval_inexpressible(options: dict) -> None:
    with pytest.raises(KeyvalError):
        format_keyval(options)


KEYS = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,12}", fullmatch=True)
VALUES = st.text(alphabet=st.sampled_from(list("ab,=.x ,é\\'\"{}")) | st.characters(),
                 max_size=12)
TREES = st.recursive(
    VALUES,
    lambda children: (st.dictionaries(KEYS, children, min_size=1, max_size=4)
                      | st.lists(children, min_size=1, max_size=4)),
    max_leaves=20,
)


@given(st.dictionaries(KEYS, TREES, max_size=5))
def test_format_keyval_round_trips(options: dict) -> None:
    assert parse_keyval(format_keyval(options)) == options


@given(st.text(alphabet=st.sampled_from(list("ab0,=._-?{}'\"")), max_size=30),
       st.sampled_from([None, "implied", "a.b"]))
def test_parsers_fail_only_with_keyval_error(text: str, implied: str | None) -> None:
    for parse in (parse_keyval, parse_option_arg, parse_qemu_opts):
        try:
            result = parse(text, implied)
        except KeyvalError:
            continue
        assert isinstance(result, dict)
    for convert in (to_size, to_int, to_bool):
        try:
            convert(text, "x")
        except KeyvalError:
            pass
