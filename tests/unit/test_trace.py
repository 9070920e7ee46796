"""Trace points: one write seen at every layer, QEMU's --trace option syntax, output formats."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

import qblock
from qblock import trace

MIB = 1 << 20


def test_one_write_is_seen_at_every_layer_in_order(make_image: Any) -> None:
    path = make_image(MIB)
    with qblock.open(path, driver="raw") as disk:
        raw, file = disk.node.node_name, disk.node.file.node.node_name
        with trace.capture("blk_co_*", "bdrv_co_*", "file_co_*") as records:
            disk.write(65536, b"\x5a" * 4096)
    assert [(name, fields.get("bs")) for name, fields in records] == [
        ("blk_co_pwritev", raw),
        ("bdrv_co_pwritev_part", raw),
        ("bdrv_co_pwritev_part", file),
        ("file_co_pwritev", None),
    ]
    for _, fields in records:
        assert (fields["offset"], fields["bytes"]) == (65536, 4096)
    assert records[0][1]["blk"] == "an unnamed block device"
    assert records[-1][1]["filename"] == str(path)


def test_capture_sees_only_its_patterns(make_image: Any) -> None:
    with qblock.open(make_image(MIB), driver="raw") as disk:
        with trace.capture("file_co_preadv") as records:
            disk.write(0, b"a" * 512)
            disk.read(0, 512)
        assert [name for name, _ in records] == ["file_co_preadv"]
        disk.read(0, 512)  # after the capture: nothing more is recorded
    assert len(records) == 1


def test_disabled_points_emit_nothing(make_image: Any) -> None:
    seen: list[str] = []
    trace.add_sink(lambda name, fields: seen.append(name))
    point = trace.point("blk_co_pwritev")
    assert trace.point("blk_co_pwritev") is point and not point.enabled
    point(offset=0, bytes=1)  # a disabled point ignores direct calls too
    with qblock.open(make_image(MIB), driver="raw") as disk:
        disk.write(0, b"b" * 512)
    assert seen == []
    trace.enable("blk_co_pwritev")
    assert point.enabled
    trace.enable("-blk_co_*")  # a later '-pattern' wins
    assert not point.enabled
    trace.reset()
    trace.enable("blk_co_pwritev")
    assert not point.enabled  # no sink, nothing to emit to


def test_configure_pattern_log_format(make_image: Any) -> None:
    out = io.StringIO()
    trace.configure("bdrv_co_pwritev_part", stream=out)
    with qblock.open(make_image(MIB), driver="raw") as disk:
        disk.write(4096, b"c" * 512)
        disk.read(0, 512)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the raw node and the file node; reads are not enabled
    pid = os.getpid()
    for line in lines:
        # QEMU's log backend: PID@SEC.USEC:name key value ...
        assert re.fullmatch(rf"{pid}@\d+\.\d{{6}}:bdrv_co_pwritev_part bs \S+ offset 4096 "
                            r"bytes 512 flags 0", line), line


def test_configure_enable_key_and_json_output(make_image: Any) -> None:
    out = io.StringIO()
    trace.configure("enable=file_co_pwritev", json_output=True, stream=out)
    path = make_image(MIB)
    with qblock.open(path, driver="raw") as disk:
        disk.write(512, b"d" * 1024)
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["event"] == "file_co_pwritev"
    assert (record["filename"], record["offset"], record["bytes"]) == (str(path), 512, 1024)
    assert isinstance(record["ts"], float)


def test_configure_events_file(tmp_path: Path, make_image: Any) -> None:
    events = tmp_path / "events"
    events.write_text("# QEMU's events file: one pattern a line\n"
                      "blk_co_pwritev\n"
                      "\n"
                      "file_co_*   # trailing comment\n")
    out = io.StringIO()
    trace.configure(f"events={events}", stream=out)
    with qblock.open(make_image(MIB), driver="raw") as disk:
        disk.write(0, b"e" * 512)
        disk.read(0, 512)
    names = [line.split(":", 1)[1].split(" ", 1)[0] for line in out.getvalue().splitlines()]
    assert names == ["blk_co_pwritev", "file_co_pwritev", "file_co_preadv"]


def test_configure_file_output(tmp_path: Path, make_image: Any) -> None:
    log = tmp_path / "trace.log"
    trace.configure(f"enable=blk_co_preadv,file={log}")
    with qblock.open(make_image(MIB), driver="raw") as disk:
        disk.read(0, 512)
    (line,) = log.read_text().splitlines()
    assert ":blk_co_preadv " in line and "offset 0 bytes 512" in line


def test_configure_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        trace.configure("bogus=1")


def test_known_points_lists_every_layer(make_image: Any) -> None:
    with qblock.open(make_image(MIB), driver="raw"):
        pass
    names = trace.known_points()
    for expected in ("blk_co_preadv", "blk_co_pwritev", "bdrv_co_preadv_part",
                     "bdrv_co_pwritev_part", "file_co_preadv", "file_co_pwritev"):
        assert expected in names
