"""``qblock dump`` of the mapping and refcount tables: dump-l1, dump-l2, dump-refcounts.

Tables are read whole and classified with numpy; only rows that are in use are printed.
Spec: qcow2.txt "Cluster mapping" (L1/L2 entries, compressed cluster descriptor, extended L2)
and "Host cluster management" (refcount table and blocks).
"""
from __future__ import annotations

import json
from typing import Any, BinaryIO

import numpy as np

from qblock.cli.dump_format import DumpError, RawHeader
from qblock.drivers.qcow2.cluster import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                                          OFLAG_COPIED, OFLAG_ZERO)
from qblock.drivers.qcow2.header import INCOMPAT_EXTL2
from qblock.drivers.qcow2.refcount import REFT_OFFSET_MASK, refblock_codec

_U64 = np.uint64


def _read_u64(f: BinaryIO, offset: int, count: int) -> np.ndarray:
    f.seek(offset)
    raw = f.read(count * 8)
    raw += bytes(count * 8 - len(raw))  # past EOF reads as zero
    return np.frombuffer(raw, dtype=">u8").astype(_U64)


def _print(rows: list[str]) -> None:
    print("\n".join(rows))


def l1_entries(f: BinaryIO, h: RawHeader) -> np.ndarray:
    return _read_u64(f, h.fields["l1_table_offset"], h.fields["l1_size"])


def dump_l1(f: BinaryIO, h: RawHeader, as_json: bool) -> None:
    """The used entries of the active L1 table: L2 table offset and the COPIED flag."""
    l1 = l1_entries(f, h)
    used = np.flatnonzero(l1)
    offsets = (l1 & _U64(L1E_OFFSET_MASK)).tolist()
    copied = ((l1 & _U64(OFLAG_COPIED)) != 0).tolist()
    rows = [{"index": int(i), "entry": int(l1[i]), "l2_offset": offsets[i],
             "copied": copied[i]} for i in used.tolist()]
    if as_json:
        print(json.dumps({"l1_table_offset": h.fields["l1_table_offset"],
                          "l1_size": h.fields["l1_size"], "entries": rows}, indent=4))
        return
    out = [f"{'L1 table':<25} offset {h.fields['l1_table_offset']:#x}, "
           f"{h.fields['l1_size']} entries, {len(rows)} used",
           f"{'index':<8} {'entry':<20} {'l2_offset':<14} copied"]
    out += [f"{r['index']:<8} {r['entry']:<#20x} {r['l2_offset']:<#14x} "
            f"{'yes' if r['copied'] else 'no'}" for r in rows]
    _print(out)


def _l2_types(entries: np.ndarray, bitmaps: np.ndarray | None) -> np.ndarray:
    """Each cluster's kind: compressed, data, zero or unallocated.

    qcow2.txt "Standard Cluster Descriptor": bit 0 reads as zeroes.  With extended L2
    ("Extended L2 Entries") bit 0 is reserved and a cluster without a host offset is
    "zero" if any subcluster has its zero bit (bits 32-63 of the bitmap) set.
    """
    compressed = (entries & _U64(OFLAG_COMPRESSED)) != 0
    data = ~compressed & ((entries & _U64(L2E_OFFSET_MASK)) != 0)
    if bitmaps is None:
        zero = ~compressed & ((entries & _U64(OFLAG_ZERO)) != 0)
    else:
        zero = ~compressed & ~data & ((bitmaps >> _U64(32)) != 0)
    kinds = np.full(len(entries), "unallocated", dtype=object)
    kinds[data] = "data"
    kinds[zero] = "zero"
    kinds[compressed] = "compressed"
    return kinds


def dump_l2(f: BinaryIO, h: RawHeader, index: int, as_json: bool) -> None:
    """The used entries of the L2 table an L1 entry points to."""
    l1 = l1_entries(f, h)
    if not 0 <= index < len(l1):
        raise DumpError(f"L1 index {index} is out of range [0, {len(l1)})")
    l2_offset = int(l1[index] & _U64(L1E_OFFSET_MASK))
    cs = h.cluster_size
    extended = bool(h.fields["incompatible_features"] & INCOMPAT_EXTL2)
    width = 2 if extended else 1  # qcow2.txt "Extended L2 Entries": 128 bits per entry
    n = cs // (8 * width)
    rows: list[dict[str, Any]] = []
    if l2_offset:
        raw = _read_u64(f, l2_offset, n * width).reshape(n, width)
        entries = raw[:, 0]
        bitmaps = raw[:, 1] if extended else None
        used = np.flatnonzero(entries if bitmaps is None else entries | bitmaps)
        kinds = _l2_types(entries, bitmaps)
        # qcow2.txt "Compressed Clusters Descriptor": host offset in bits 0..x-1,
        # x = 62 - (cluster_bits - 8).
        x = 62 - (h.fields["cluster_bits"] - 8)
        host = np.where(kinds == "compressed", entries & _U64((1 << x) - 1),
                        entries & _U64(L2E_OFFSET_MASK)).tolist()
        copied = ((entries & _U64(OFLAG_COPIED)) != 0).tolist()
        guest_base = index * n * cs
        for i in used.tolist():
            row = {"index": i, "guest_offset": guest_base + i * cs, "entry": int(entries[i]),
                   "type": kinds[i], "host_offset": host[i], "copied": copied[i]}
            if extended:
                row["bitmap"] = int(raw[i, 1])
            rows.append(row)
    if as_json:
        print(json.dumps({"l1_index": index, "l2_offset": l2_offset, "entries": rows},
                         indent=4))
        return
    out = [f"{'L2 table':<25} L1 index {index}, offset {l2_offset:#x}, {n} entries, "
           f"{len(rows)} used",
           f"{'index':<8} {'guest_offset':<14} {'entry':<20} {'type':<12} "
           f"{'host_offset':<14} copied" + ("  bitmap" if extended else "")]
    for r in rows:
        text = (f"{r['index']:<8} {r['guest_offset']:<#14x} {r['entry']:<#20x} "
                f"{r['type']:<12} {r['host_offset']:<#14x} {'yes' if r['copied'] else 'no':<6}")
        out.append(text + (f"  {r['bitmap']:#018x}" if extended else ""))
    _print([o.rstrip() for o in out])


def dump_refcounts(f: BinaryIO, h: RawHeader, as_json: bool) -> None:
    """The refcount table and, per refcount block, how many clusters it counts and the
    largest refcount."""
    cs = h.cluster_size
    bits = 1 << h.fields["refcount_order"]
    per_block = cs * 8 // bits
    table = _read_u64(f, h.fields["refcount_table_offset"],
                      h.fields["refcount_table_clusters"] * cs // 8)
    offsets = (table & _U64(REFT_OFFSET_MASK)).tolist()
    decode, _ = refblock_codec(bits)
    blocks = []
    for i in np.flatnonzero(table).tolist():
        f.seek(offsets[i])
        raw = f.read(cs)
        counts = decode(raw + bytes(cs - len(raw)))
        blocks.append({"index": i, "offset": offsets[i], "first_cluster": i * per_block,
                       "used": int(np.count_nonzero(counts)),
                       "max_refcount": int(counts.max()) if len(counts) else 0})
    if as_json:
        print(json.dumps({"refcount_table_offset": h.fields["refcount_table_offset"],
                          "refcount_table_clusters": h.fields["refcount_table_clusters"],
                          "refcount_bits": bits, "refcount_blocks": blocks}, indent=4))
        return
    out = [f"{'Refcount table':<25} offset {h.fields['refcount_table_offset']:#x}, "
           f"{len(table)} entries, {len(blocks)} used, refcount_bits {bits}",
           f"{'index':<8} {'offset':<14} {'first_cluster':<14} {'used':<8} max_refcount"]
    out += [f"{b['index']:<8} {b['offset']:<#14x} {b['first_cluster']:<14} {b['used']:<8} "
            f"{b['max_refcount']}" for b in blocks]
    _print(out)
