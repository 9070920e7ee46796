"""Bounded LRU caches of L2 table slices and refcount blocks (QEMU block/qcow2-cache.c).

An entry is a native numpy array decoded from the big-endian table on disk.  Dirty entries are
written back on eviction and flush.  A cache may depend on another (qcow2_cache_set_dependency):
before any of its dirty entries is written, the other cache is written out and the file
flushed.  The driver uses this to keep the on-disk order safe: refcounts reach the disk before
an L2 entry that points at the newly counted cluster, and an L2 entry that stopped pointing at a
cluster reaches the disk before that cluster's refcount drops.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from qblock.block import io
from qblock.errors import InvalidArgument

if TYPE_CHECKING:
    from qblock.block.graph import BdrvChild

MiB = 1024 * 1024
DEFAULT_L2_CACHE_MAX_SIZE = 32 * MiB  # qcow2.h, 64-bit hosts
DEFAULT_CACHE_CLEAN_INTERVAL = 600  # seconds
MIN_L2_CACHE_SIZE = 2  # entries
MIN_REFCOUNT_CACHE_SIZE = 4  # clusters

Decoder = Callable[[bytes], np.ndarray]
Encoder = Callable[[np.ndarray], bytes]
PreWrite = Callable[[int, int], Awaitable[None]]


def cache_sizes(cluster_size: int, l2_entry_size: int, virtual_size: int,
                opts: dict[str, int]) -> tuple[int, int, int]:
    """(L2 cache entries, L2 cache entry size, refcount cache entries) like QEMU.

    qcow2.c read_cache_sizes() and qcow2_update_options_prepare(); ``opts`` holds the sizes
    that were given (keys cache-size, l2-cache-size, refcount-cache-size, l2-cache-entry-size).
    """
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2_entry_size) // cluster_size) * cluster_size
    combined_set = "cache-size" in opts
    l2_set = "l2-cache-size" in opts
    rc_set = "refcount-cache-size" in opts
    combined = opts.get("cache-size", 0)
    l2_max_setting = opts.get("l2-cache-size", DEFAULT_L2_CACHE_MAX_SIZE)
    refcount_size = opts.get("refcount-cache-size", 0)
    entry_size = opts.get("l2-cache-entry-size", cluster_size)
    l2_size = min(max_l2_cache, l2_max_setting)
    if combined_set:
        if l2_set and rc_set:
            raise InvalidArgument("cache-size, l2-cache-size and refcount-cache-size may not be "
                                  "set at the same time")
        if l2_set and l2_max_setting > combined:
            raise InvalidArgument("l2-cache-size may not exceed cache-size")
        if refcount_size > combined:
            raise InvalidArgument("refcount-cache-size may not exceed cache-size")
        if l2_set:
            refcount_size = combined - l2_size
        elif rc_set:
            l2_size = combined - refcount_size
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_size = max_l2_cache
            refcount_size = combined - l2_size
        else:
            refcount_size = min(combined, min_refcount_cache)
            l2_size = combined - refcount_size
    # A cache that cannot cover the whole disk defaults to 4 KiB slices.
    if l2_size < max_l2_cache and "l2-cache-entry-size" not in opts:
        entry_size = min(cluster_size, 4096)
    if entry_size < 512 or entry_size > cluster_size or entry_size & (entry_size - 1):
        raise InvalidArgument("L2 cache entry size must be a power of two between 512 and the "
                              f"cluster size ({cluster_size})")
    l2_entries = max(l2_size // entry_size, MIN_L2_CACHE_SIZE)
    rc_entries = max(refcount_size // cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if l2_entries > 0x7FFFFFFF:
        raise InvalidArgument("L2 cache size too big")
    if rc_entries > 0x7FFFFFFF:
        raise InvalidArgument("Refcount cache size too big")
    return l2_entries, entry_size, rc_entries


class _Entry:
    __slots__ = ("table", "dirty", "last_used")

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.dirty = False
        self.last_used = time.monotonic()


class Qcow2Cache:
    """An LRU of fixed-size metadata tables keyed by their host offset."""

    def __init__(self, name: str, file: BdrvChild, size: int, entry_size: int,
                 decode: Decoder, encode: Encoder, pre_write: PreWrite) -> None:
        self.name = name
        self.file = file
        self.size = size
        self.entry_size = entry_size
        self._decode = decode
        self._encode = encode
        self._pre_write = pre_write
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self.depends: Qcow2Cache | None = None

    def __contains__(self, offset: int) -> bool:
        return offset in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dirty(self) -> bool:
        return any(e.dirty for e in self._entries.values())

    async def get(self, offset: int) -> np.ndarray:
        """The table at ``offset``, read from the file on a miss (qcow2_cache_get)."""
        entry = self._entries.get(offset)
        if entry is not None:
            self._entries.move_to_end(offset)
            entry.last_used = time.monotonic()
            return entry.table
        await self._make_room()
        raw = await io.pread(self.file, offset, self.entry_size)
        entry = self._entries.get(offset)  # another request may have loaded it meanwhile
        if entry is None:
            entry = _Entry(self._decode(bytes(raw)))
            self._entries[offset] = entry
        return entry.table

    async def get_empty(self, offset: int, table: np.ndarray) -> np.ndarray:
        """Install ``table`` as the (dirty) content at ``offset`` without reading it."""
        if offset not in self._entries:
            await self._make_room()
        entry = _Entry(table)
        entry.dirty = True
        self._entries[offset] = entry
        self._entries.move_to_end(offset)
        return table

    def mark_dirty(self, offset: int, table: np.ndarray) -> None:
        """Record that ``table`` (the entry at ``offset``) was modified.

        An entry evicted while its caller still held the table is put back, so no update
        is lost.
        """
        entry = self._entries.get(offset)
        if entry is None or entry.table is not table:
            entry = _Entry(table)
            self._entries[offset] = entry
        entry.dirty = True

    def discard(self, offset: int) -> None:
        """Forget an entry whose cluster was freed (qcow2_cache_discard)."""
        self._entries.pop(offset, None)

    def clear(self) -> None:
        """Drop every entry, dirty or not (after a repair rewrote the tables on disk)."""
        self._entries.clear()

    async def _make_room(self) -> None:
        while len(self._entries) >= self.size:
            offset, entry = next(iter(self._entries.items()))
            if entry.dirty:
                await self._write_entry(offset, entry)
            self._entries.pop(offset, None)

    async def _write_entry(self, offset: int, entry: _Entry) -> None:
        """qcow2_cache_entry_flush(): honour the dependency, check overlaps, write."""
        if self.depends is not None:
            await self.flush_dependency()
        if not entry.dirty:
            return
        data = self._encode(entry.table)
        await self._pre_write(offset, len(data))
        entry.dirty = False
        try:
            await io.pwritev(self.file, offset, data)
        except BaseException:
            entry.dirty = True
            raise

    async def write(self) -> None:
        """Write every dirty entry, lowest offset first (qcow2_cache_write)."""
        for offset in sorted(o for o, e in self._entries.items() if e.dirty):
            entry = self._entries.get(offset)
            if entry is not None and entry.dirty:
                await self._write_entry(offset, entry)

    async def flush(self) -> None:
        """Write every dirty entry and flush the file (qcow2_cache_flush)."""
        await self.write()
        await io.flush(self.file.node)

    async def flush_dependency(self) -> None:
        """Flush the cache this one depends on and drop the dependency."""
        dep = self.depends
        if dep is not None:
            await dep.flush()
            self.depends = None

    async def set_dependency(self, dependency: Qcow2Cache) -> None:
        """Entries of this cache may only be written after ``dependency`` is on disk."""
        if dependency.depends is not None:
            await dependency.flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            await self.flush_dependency()
        self.depends = dependency

    async def clean(self, max_age: float) -> None:
        """Drop clean entries unused for ``max_age`` seconds (cache-clean-interval)."""
        now = time.monotonic()
        for offset in [o for o, e in self._entries.items()
                       if not e.dirty and now - e.last_used >= max_age]:
            del self._entries[offset]

    def entries(self) -> list[tuple[int, Any]]:
        """(offset, table) of every cached entry, for the overlap checks."""
        return [(o, e.table) for o, e in self._entries.items()]
