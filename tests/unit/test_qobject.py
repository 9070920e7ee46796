"""QEMU's JSON writer: byte-exact against text written by qemu-storage-daemon 7.2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qblock.qobject import bucket, insertion_order, qdict_order, quote, to_json

DATA = Path(__file__).parent.parent / "data" / "qmp-7.2"


def _lines() -> list[str]:
    return [line for path in sorted(DATA.glob("*.json"))
            for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("line", _lines())
def test_reserialises_qemu_output_byte_for_byte(line: str) -> None:
    value = json.loads(line, object_pairs_hook=insertion_order)
    assert to_json(value) == line


def test_known_orders_from_reference() -> None:
    # REFERENCE.md §3: orders QEMU prints for these objects.
    assert qdict_order(["execute", "return", "id"][1:]) == ["return", "id"]
    assert qdict_order(["class", "desc"]) == ["class", "desc"]
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["event", "data", "timestamp"]) == ["timestamp", "event", "data"]
    assert qdict_order(["id", "status"]) == ["status", "id"]


def test_same_bucket_prints_newest_first() -> None:
    # Find two keys sharing a bucket; QDict lists the later insertion first.
    seen: dict[int, str] = {}
    for i in range(10000):
        key = f"k{i}"
        other = seen.setdefault(bucket(key), key)
        if other != key:
            break
    assert qdict_order([other, key]) == [key, other]
    assert to_json({other: 1, key: 2}) == f'{{"{key}": 2, "{other}": 1}}'


def test_escapes_like_json_writer() -> None:
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("\b\f\n\r\t") == '"\\b\\f\\n\\r\\t"'
    assert quote("\x01\x7f\u00e9") == '"\\u0001\\u007F\\u00E9"'
    assert quote("\U0001F600") == '"\\uD83D\\uDE00"'


def test_scalars_and_empty_containers() -> None:
    assert to_json([None, True, False, -3, 0.5, "x"]) == '[null, true, false, -3, 0.5, "x"]'
    assert to_json({}) == "{}"
    assert to_json([]) == "[]"
    with pytest.raises(ValueError):
        to_json(float("nan"))
    with pytest.raises(TypeError):
        to_json(object())


def test_pretty_matches_qemu_img_layout() -> None:
    value = {"type": "qcow2", "data": {"bitmaps": [{"flags": ["auto"]}], "e": {}}}
    assert to_json(value, pretty=True) == (
        '{\n    "type": "qcow2",\n    "data": {\n'
        '        "bitmaps": [\n            {\n                "flags": [\n'
        '                    "auto"\n                ]\n            }\n        ],\n'
        '        "e": {\n        }\n    }\n}')


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=5),
    max_leaves=20)


@given(_json, st.booleans())
def test_output_is_json_for_the_same_value(value: object, pretty: bool) -> None:
    # The model: Python's json module reads back exactly the value (key order aside).
    assert json.loads(to_json(value, pretty=pretty)) == value


@given(st.lists(st.text(max_size=6), max_size=12, unique=True))
def test_insertion_order_round_trip(keys: list[str]) -> None:
    value = dict.fromkeys(keys, 0)
    text = to_json(value)
    assert to_json(json.loads(text, object_pairs_hook=insertion_order)) == text
    assert list(json.loads(text)) == qdict_order(keys)
