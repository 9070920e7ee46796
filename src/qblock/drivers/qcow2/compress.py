"""Compression of one qcow2 cluster (QEMU block/qcow2-threads.c).

qcow2.txt "Compressed Clusters Descriptor": type 0 is raw deflate (no zlib header, window
bits 12), type 1 is zstd frames.  QEMU compresses a whole cluster into a buffer of
``cluster_size - 1`` bytes; if the result does not fit the cluster is stored uncompressed.
Decompression must produce exactly one cluster; trailing bytes (the rest of the last 512-byte
sector) may belong to another compressed cluster and are ignored.
"""
from __future__ import annotations

import io
import zlib

import zstandard

from qblock.drivers.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from qblock.errors import QBlockError

# QEMU: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)
ZLIB_WINDOW_BITS = -12
ZLIB_MEM_LEVEL = 9
ZSTD_LEVEL = 3  # ZSTD_CLEVEL_DEFAULT, what QEMU's default ZSTD_CCtx uses


class DecompressError(QBlockError):
    """A compressed cluster did not decompress to exactly one cluster (EIO in QEMU)."""


def compress_cluster(data: bytes | memoryview, compression_type: int) -> bytes | None:
    """Compress one cluster; None when the result would not be smaller than the cluster."""
    limit = len(data) - 1
    if compression_type == COMPRESSION_ZLIB:
        obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WINDOW_BITS,
                               ZLIB_MEM_LEVEL)
        out = obj.compress(data) + obj.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(bytes(data))
    else:
        raise QBlockError(f"qcow2: unknown compression type: {compression_type}")
    return out if len(out) <= limit else None


def decompress_cluster(data: bytes | memoryview, cluster_size: int,
                       compression_type: int) -> bytes:
    """Decompress ``data`` into exactly ``cluster_size`` bytes; DecompressError otherwise."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            # max_length bounds the output: a hostile stream cannot make us allocate more.
            out = zlib.decompressobj(ZLIB_WINDOW_BITS).decompress(bytes(data), cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(bytes(data)), read_across_frames=True)
            out = reader.read(cluster_size)
        else:
            raise DecompressError(f"qcow2: unknown compression type: {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise DecompressError(f"Could not decompress cluster: {e}") from None
    if len(out) != cluster_size:
        raise DecompressError("Could not decompress cluster: short output")
    return out
