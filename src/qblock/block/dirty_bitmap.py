"""In-memory dirty bitmaps (QEMU block/dirty-bitmap.c over util/hbitmap.c).

One bit covers ``granularity`` guest bytes; the bits live in a numpy array of little-endian
uint64 words, bit k in word k // 64 at position k % 64 (the order of QEMU's serialisation:
unsigned longs, LSB first).  Every operation works on whole words or slices; no loop visits
single bits.
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from qblock.errors import InvalidArgument, NotSupported, QBlockError

if TYPE_CHECKING:
    from qblock.block.node import BlockNode

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
_U64 = np.dtype("<u8")
_MASK = 0xFFFFFFFFFFFFFFFF
_ALL = np.uint64(_MASK)


def check_granularity(granularity: int) -> None:
    """block-dirty-bitmap-add's rule (blockdev.c)."""
    if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise InvalidArgument("Granularity must be power of 2 and at least 512")
    if granularity > MAX_GRANULARITY:
        raise InvalidArgument("Granularity must be power of 2 and at most 2147483648")


class DirtyBitmap:
    """A named dirty bitmap of a node (BdrvDirtyBitmap)."""

    def __init__(self, name: str | None, size: int, granularity: int, *,
                 persistent: bool = False, enabled: bool = True) -> None:
        check_granularity(granularity)
        self.name = name
        self.granularity = granularity
        self.gran_bits = granularity.bit_length() - 1
        self.persistent = persistent
        self.enabled = enabled
        self.busy = False
        self.readonly = False
        self.inconsistent = False
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        self.size = size
        self.nbits = -(-size // self.granularity)
        self.words = np.zeros(max(1, -(-self.nbits // 64)), dtype=_U64)
        # word access by Python ints; the words are little-endian, so native only there
        self._q = memoryview(self.words).cast("B").cast("Q") if sys.byteorder == "little" \
            else self.words

    def resize(self, size: int) -> None:
        """Follow a resize of the node: new bits clean, bits past the end dropped
        (hbitmap_truncate)."""
        old = self.words
        self._alloc(size)
        n = min(len(old), len(self.words))
        self.words[:n] = old[:n]
        self._clear_tail()

    # -- state ---------------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        """Whether writes mark the bitmap (an inconsistent bitmap is disabled in QEMU)."""
        return self.enabled and not self.inconsistent

    # -- bit ranges ----------------------------------------------------------------------------

    def _apply(self, first: int, end: int, value: bool) -> None:
        """Set or clear bits [first, end): Python ints on the two edge words (the common
        case of a small request costs no numpy call), a slice for the words between."""
        if first >= end:
            return
        w0, w1 = first >> 6, (end - 1) >> 6
        lo = (_MASK << (first & 63)) & _MASK
        hi = _MASK >> (63 - ((end - 1) & 63))
        q = self._q
        if w0 == w1:
            q[w0] = q[w0] | (lo & hi) if value else q[w0] & ~(lo & hi) & _MASK
            return
        if value:
            q[w0] |= lo
            q[w1] |= hi
        else:
            q[w0] &= ~lo & _MASK
            q[w1] &= ~hi & _MASK
        if w1 - w0 > 1:
            self.words[w0 + 1:w1] = _ALL if value else 0

    def set_range(self, offset: int, length: int) -> None:
        """Mark guest bytes [offset, offset + length) dirty (bdrv_set_dirty_bitmap)."""
        end = offset + length
        if end > self.size:
            end = self.size
        if length > 0 and offset < end:
            self._apply(offset >> self.gran_bits, (end - 1 >> self.gran_bits) + 1, True)

    def reset_range(self, offset: int, length: int) -> None:
        """Mark clean the bits wholly inside [offset, offset + length), the last one also
        when the range reaches the end (bdrv_reset_dirty_bitmap; a partly covered granule
        stays dirty, so no write is ever forgotten)."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return
        last = self.nbits if end == self.size else end >> self.gran_bits
        self._apply(-(-offset // self.granularity), last, False)

    def set_ranges(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Mark many byte ranges dirty with table operations: partial head and tail words
        by OR-at, the full words between by a difference array over words."""
        offsets = np.asarray(offsets, dtype=np.int64)
        ends = np.minimum(offsets + np.asarray(lengths, dtype=np.int64), self.size)
        keep = ends > offsets
        first = offsets[keep] >> self.gran_bits
        end = (ends[keep] + self.granularity - 1) >> self.gran_bits
        w0, w1 = first >> 6, (end - 1) >> 6
        head = _ALL << (first & 63).astype(np.uint64)
        tail = _ALL >> (63 - ((end - 1) & 63)).astype(np.uint64)
        same = w0 == w1
        np.bitwise_or.at(self.words, w0[same], head[same] & tail[same])
        multi = ~same
        np.bitwise_or.at(self.words, w0[multi], head[multi])
        np.bitwise_or.at(self.words, w1[multi], tail[multi])
        inner = multi & (w1 - w0 > 1)
        if inner.any():
            delta = np.zeros(len(self.words) + 1, dtype=np.int32)
            np.add.at(delta, w0[inner] + 1, 1)
            np.add.at(delta, w1[inner], -1)
            self.words[np.cumsum(delta[:-1]) > 0] = _ALL

    def set_all(self) -> None:
        self._apply(0, self.nbits, True)

    def repair(self) -> None:
        """Trust nothing of an inconsistent bitmap: every bit dirty, usable again."""
        self.inconsistent = False
        self.set_all()

    def clear(self) -> None:
        self.words[:] = 0

    def get(self, offset: int) -> bool:
        """Whether the bit covering guest byte ``offset`` is set."""
        return self._bit(offset >> self.gran_bits)

    # -- queries -------------------------------------------------------------------------------

    def count(self) -> int:
        """Dirty bytes: set bits times the granularity, the last bit clipped to the size."""
        bits = int(np.bitwise_count(self.words).sum())
        total = bits * self.granularity
        if bits and self.size % self.granularity and self._bit(self.nbits - 1):
            total -= self.granularity - self.size % self.granularity
        return total

    def _bit(self, k: int) -> bool:
        return bool(int(self.words[k // 64]) >> (k % 64) & 1)

    def bool_array(self) -> np.ndarray:
        """One bool per bit (nbits of them)."""
        return np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.nbits] \
            .astype(bool)

    def next_dirty(self, offset: int) -> int:
        """The byte offset of the first dirty bit at or after ``offset``; -1 if none."""
        return self._next(offset, True)

    def next_clean(self, offset: int) -> int:
        """The byte offset of the first clean bit at or after ``offset``; -1 if none."""
        return self._next(offset, False)

    def _next(self, offset: int, dirty: bool) -> int:
        k = max(0, offset) >> self.gran_bits
        if k >= self.nbits:
            return -1
        w = k // 64
        words = self.words[w:] if dirty else ~self.words[w:]
        first = int(words[0]) & ((0xFFFFFFFFFFFFFFFF << (k % 64)) & 0xFFFFFFFFFFFFFFFF)
        if first:
            bit = w * 64 + (first & -first).bit_length() - 1
        else:
            nz = np.flatnonzero(words[1:])
            if not len(nz):
                return -1
            i = int(nz[0]) + 1
            v = int(words[i])
            bit = (w + i) * 64 + (v & -v).bit_length() - 1
        if bit >= self.nbits:
            return -1
        return max(offset, bit << self.gran_bits)

    def extent_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The dirty extents as arrays of byte offsets and lengths, clipped to the size."""
        bits = self.bool_array().astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], bits, [0]))))
        starts = edges[0::2].astype(np.int64) << self.gran_bits
        ends = np.minimum(edges[1::2].astype(np.int64) << self.gran_bits, self.size)
        return starts, ends - starts

    def extents(self) -> Iterator[tuple[int, int]]:
        """The dirty extents as (offset, length) in bytes."""
        starts, lengths = self.extent_arrays()
        yield from zip(starts.tolist(), lengths.tolist())

    # -- whole-bitmap operations -------------------------------------------------------------

    def merge(self, src: DirtyBitmap) -> None:
        """OR ``src`` into this bitmap; granularities may differ (bdrv_merge_dirty_bitmap)."""
        if src.size != self.size:
            raise InvalidArgument(f"Bitmaps are of different sizes (destination size is "
                                  f"{self.size}, source size is {src.size}) and can't be "
                                  f"merged")
        if src.granularity == self.granularity:
            self.words |= src.words
            return
        self.set_ranges(*src.extent_arrays())

    def serialize(self) -> bytes:
        """The bits as bytes, LSB first, ceil(nbits / 8) of them (qcow2 bitmap data)."""
        return self.words.tobytes()[:-(-self.nbits // 8)]

    def deserialize(self, data: bytes | memoryview, byte_offset: int = 0) -> None:
        """OR serialized bits (LSB first) starting at serialized byte ``byte_offset``."""
        view = self.words.view(np.uint8)
        n = min(len(data), -(-self.nbits // 8) - byte_offset)
        view[byte_offset:byte_offset + n] |= np.frombuffer(data, dtype=np.uint8, count=n)
        self._clear_tail()

    def _clear_tail(self) -> None:
        """Bits past nbits stay zero (QEMU's serialisation relies on it)."""
        if self.nbits % 64 or not self.nbits:
            self.words[-1] &= np.uint64((1 << (self.nbits % 64)) - 1)

    def sha256(self) -> str:
        """x-debug-block-dirty-bitmap-sha256: the words as little-endian u64 (hbitmap_sha256)."""
        return hashlib.sha256(self.words.tobytes()).hexdigest()


def _pack(bits: np.ndarray, nwords: int) -> np.ndarray:
    """Bools (bit k = element k) into little-endian uint64 words."""
    raw = np.packbits(bits, bitorder="little")
    out = np.zeros(nwords * 8, dtype=np.uint8)
    out[:len(raw)] = raw
    return out.view(_U64)


# -- bitmaps of a node (block/dirty-bitmap.c, blockdev.c) ------------------------------------

CHECK_BUSY = 1
CHECK_RO = 2
CHECK_INCONSISTENT = 4
CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT
CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT
MAX_NAME_SIZE = 1023


def check_bitmap(bitmap: DirtyBitmap, flags: int) -> None:
    """bdrv_dirty_bitmap_check(): refuse a busy, read-only or inconsistent bitmap."""
    if flags & CHECK_BUSY and bitmap.busy:
        raise InvalidArgument(f"Bitmap '{bitmap.name}' is currently in use by another "
                              f"operation and cannot be used")
    if flags & CHECK_RO and bitmap.readonly:
        raise InvalidArgument(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if flags & CHECK_INCONSISTENT and bitmap.inconsistent:
        raise InvalidArgument(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


def find_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """bdrv_find_dirty_bitmap()."""
    for bitmap in node.dirty_bitmaps:
        if bitmap.name == name:
            return bitmap
    return None


def default_granularity(node: BlockNode) -> int:
    """bdrv_get_default_bitmap_granularity(): the cluster size clamped to [4K, 64K]."""
    header = getattr(node.drv, "header", None)
    cluster_size = getattr(header, "cluster_size", 0)
    return min(max(cluster_size, 4096), 65536) if cluster_size else 65536


def create_bitmap(node: BlockNode, name: str, granularity: int) -> DirtyBitmap:
    """bdrv_create_dirty_bitmap(): a new enabled bitmap covering the node."""
    if find_bitmap(node, name) is not None:
        raise InvalidArgument(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise InvalidArgument(f"Bitmap name too long: {name}")
    # bdrv_getlength(): the length in whole 512-byte sectors
    bitmap = DirtyBitmap(name, -(-node.length() // 512) * 512, granularity)
    node.dirty_bitmaps.append(bitmap)
    return bitmap


def dirty_info(node: BlockNode) -> list[dict[str, object]]:
    """bdrv_query_dirty_bitmaps(): BlockDirtyInfo, newest first like QEMU's list."""
    out: list[dict[str, object]] = []
    for bm in reversed(node.dirty_bitmaps):
        info: dict[str, object] = {"name": bm.name, "count": bm.count(),
                                   "granularity": bm.granularity, "recording": bm.recording,
                                   "busy": bm.busy, "persistent": bm.persistent}
        if bm.name is None:  # an anonymous bitmap (a backup's successor) has no name member
            del info["name"]
        if bm.inconsistent:
            info["inconsistent"] = True
        out.append(info)
    return out


# -- operations shared by QMP and qblock img bitmap (blockdev.c, bitmap-qmp-cmds.c) -----------

def add(node: BlockNode, name: str, granularity: int | None = None, *,
        persistent: bool = False, disabled: bool = False) -> DirtyBitmap:
    """block-dirty-bitmap-add."""
    if not name:
        raise InvalidArgument("Bitmap name cannot be empty")
    if find_bitmap(node, name) is not None:
        raise InvalidArgument(f"Bitmap already exists: {name}")
    if granularity is None:
        granularity = default_granularity(node)
    elif granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise InvalidArgument("Granularity must be power of 2 and at least 512")
    if persistent:
        can_store = getattr(node.drv, "can_store_new_dirty_bitmap", None)
        if can_store is None:
            raise NotSupported(f"Can't store persistent bitmaps to {node.node_name}: "
                               "Operation not supported")
        try:
            can_store(name, granularity)
        except QBlockError as e:
            raise type(e)(f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
                          f"{e}") from None
    bitmap = create_bitmap(node, name, granularity)
    bitmap.enabled = not disabled
    bitmap.persistent = persistent
    return bitmap


async def remove(node: BlockNode, bitmap: DirtyBitmap) -> None:
    """block-dirty-bitmap-remove: a persistent bitmap leaves the image now."""
    check_bitmap(bitmap, CHECK_BUSY | CHECK_RO)
    if bitmap.persistent:
        await node.drv.remove_persistent_dirty_bitmap(bitmap.name)
    node.dirty_bitmaps.remove(bitmap)


def clear(bitmap: DirtyBitmap) -> None:
    check_bitmap(bitmap, CHECK_DEFAULT)
    bitmap.clear()


def set_enabled(bitmap: DirtyBitmap, enabled: bool) -> None:
    """block-dirty-bitmap-enable / -disable."""
    check_bitmap(bitmap, CHECK_ALLOW_RO)
    bitmap.enabled = enabled


def merge(target: DirtyBitmap, sources: Iterable[DirtyBitmap]) -> None:
    """block-dirty-bitmap-merge: the sources (looked up lazily, in order) into a scratch
    bitmap, then that into the target, so a failure leaves the target as it was."""
    scratch = DirtyBitmap(None, target.size, target.granularity)
    for src in sources:
        check_bitmap(src, CHECK_INCONSISTENT)
        scratch.merge(src)
    check_bitmap(target, CHECK_DEFAULT)
    target.merge(scratch)


def repair(bitmap: DirtyBitmap) -> None:
    """qblock extension: an inconsistent bitmap becomes consistent and all dirty."""
    check_bitmap(bitmap, CHECK_BUSY | CHECK_RO)
    if not bitmap.inconsistent:
        raise InvalidArgument(f"Bitmap '{bitmap.name}' is not inconsistent")
    bitmap.repair()
