"""The qcow2 header cluster: fixed header, header extensions, backing file name.

The structure is declared once (``V2_FIELDS``/``V3_FIELDS``) and kept apart from the driver
logic.  ``Qcow2Header.parse`` validates like QEMU's qcow2_do_open()/qcow2_read_extensions() with
QEMU's messages; ``Qcow2Header.pack`` produces the whole header cluster the way
qcow2_update_header() writes it.  Spec: docs/interop/qcow2.txt "Header", "Header extensions".
"""
from __future__ import annotations

import dataclasses
import errno
import struct
from typing import ClassVar

from qblock.errors import InvalidArgument, NotSupported, QBlockError

QCOW_MAGIC = 0x514649FB

# qcow2.txt "Header": cluster_bits >= 9; QEMU supports up to 2 MiB clusters.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# Limits QEMU enforces on open (block/qcow2.h).
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW_MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40  # sizeof(QCowSnapshotHeader)
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BACKING_FORMAT_MAX = 16  # sizeof(bs->backing_format): the name must be shorter
BACKING_FILE_MAX = 1023

# qcow2.txt "Header": incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

# qcow2.txt "Feature name table": feature types
FEAT_TYPE_INCOMPATIBLE = 0
FEAT_TYPE_COMPATIBLE = 1
FEAT_TYPE_AUTOCLEAR = 2

# qcow2.txt "Header extensions": magics
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

EXTL2_SUBCLUSTERS = 32

# The feature name table QEMU writes (qcow2_update_header), in its order.
QEMU_FEATURES: tuple[tuple[int, int, str], ...] = (
    (FEAT_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEAT_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEAT_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEAT_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEAT_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEAT_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEAT_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEAT_TYPE_AUTOCLEAR, 1, "raw external data"),
)

# Declarative header layout (qcow2.txt "Header"): (field name, struct code).
V2_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic", "I"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("cluster_bits", "I"),
    ("size", "Q"),
    ("crypt_method", "I"),
    ("l1_size", "I"),
    ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"),
    ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"),
    ("snapshots_offset", "Q"),
)
V3_FIELDS: tuple[tuple[str, str], ...] = (
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("autoclear_features", "Q"),
    ("refcount_order", "I"),
    ("header_length", "I"),
    ("compression_type", "B"),
)
_V2 = struct.Struct(">" + "".join(code for _, code in V2_FIELDS))
_V3 = struct.Struct(">" + "".join(code for _, code in V3_FIELDS) + "7x")
V2_HEADER_SIZE = _V2.size  # 72
V3_HEADER_SIZE = _V2.size + _V3.size  # 112, sizeof(QCowHeader)
V3_MIN_HEADER_LENGTH = 104
COMPRESSION_TYPE_OFFSET = 104

_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")

INT64_MAX = (1 << 63) - 1


@dataclasses.dataclass
class HeaderExtension:
    """One header extension kept as bytes (qcow2.txt "Header extensions")."""

    type: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class BitmapsExt:
    """The bitmaps extension (qcow2.txt "Bitmaps extension")."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclasses.dataclass
class Qcow2Header:
    """The header cluster of a qcow2 image.

    ``extensions`` holds, in file order, the extensions that are not modelled by their own
    field: data file name, FDE pointer, bitmaps and unknown ones.  The backing format and
    backing file name are ``backing_format``/``backing_file``; the feature name table read from
    the image is ``feature_table`` (it is regenerated on pack, as QEMU does).
    """

    magic: int = QCOW_MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB
    unknown_header_fields: bytes = b""
    extensions: list[HeaderExtension] = dataclasses.field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    feature_table: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    FIELDS: ClassVar[tuple[str, ...]] = tuple(n for n, _ in V2_FIELDS + V3_FIELDS)

    # -- derived geometry -------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def subclusters_per_cluster(self) -> int:
        return EXTL2_SUBCLUSTERS if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def refcount_block_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES.get(self.compression_type, str(self.compression_type))

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def size_to_l1(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes (qcow2.h size_to_l1)."""
        shift = self.cluster_bits + (self.l2_entries.bit_length() - 1)
        return (size + (1 << shift) - 1) >> shift

    # -- extensions --------------------------------------------------------------------------

    def get_extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace, add (``data``) or remove (``None``) the extension of ``ext_type``."""
        for i, ext in enumerate(self.extensions):
            if ext.type == ext_type:
                if data is None:
                    del self.extensions[i]
                else:
                    ext.data = data
                return
        if data is not None:
            self.extensions.append(HeaderExtension(ext_type, data))

    @property
    def bitmaps(self) -> BitmapsExt | None:
        ext = self.get_extension(EXT_BITMAPS)
        if ext is None:
            return None
        nb, _, dir_size, dir_offset = _BITMAPS_EXT.unpack(ext.data)
        return BitmapsExt(nb, dir_size, dir_offset)

    @bitmaps.setter
    def bitmaps(self, value: BitmapsExt | None) -> None:
        data = None if value is None or value.nb_bitmaps == 0 else _BITMAPS_EXT.pack(
            value.nb_bitmaps, 0, value.bitmap_directory_size, value.bitmap_directory_offset)
        self.set_extension(EXT_BITMAPS, data)

    @property
    def data_file(self) -> str | None:
        ext = self.get_extension(EXT_DATA_FILE)
        return None if ext is None else ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def crypto_header(self) -> tuple[int, int] | None:
        """(offset, length) of the LUKS header area, from the FDE extension."""
        ext = self.get_extension(EXT_CRYPTO_HEADER)
        return None if ext is None else _CRYPTO_EXT.unpack(ext.data)

    # -- parse -------------------------------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes, *, check: bool = False) -> Qcow2Header:
        """Decode and validate the header cluster ``buf`` (qcow2_do_open's header part).

        ``check`` relaxes what QEMU skips for a BDRV_O_CHECK open (missing refcount table,
        snapshot table limits).  Bytes past the end of a short ``buf`` read as zero, as reads
        past EOF do.  Raises InvalidArgument/NotSupported with QEMU's messages.
        """
        buf = bytes(buf)
        if len(buf) < V3_HEADER_SIZE:
            buf = buf + bytes(V3_HEADER_SIZE - len(buf))
        h = cls(**dict(zip((n for n, _ in V2_FIELDS), _V2.unpack_from(buf, 0))))
        if h.magic != QCOW_MAGIC:
            raise InvalidArgument("Image is not in qcow2 format")
        if h.version < 2 or h.version > 3:
            raise NotSupported(f"Unsupported qcow2 version {h.version}")
        if h.cluster_bits < MIN_CLUSTER_BITS or h.cluster_bits > MAX_CLUSTER_BITS:
            raise InvalidArgument(f"Unsupported cluster size: 2^{h.cluster_bits}")
        cs = h.cluster_size
        if len(buf) < cs:
            buf = buf + bytes(cs - len(buf))
        buf = buf[:cs]
        if h.version == 2:
            h.refcount_order = 4
            h.header_length = V2_HEADER_SIZE
        else:
            values = dict(zip((n for n, _ in V3_FIELDS), _V3.unpack_from(buf, V2_HEADER_SIZE)))
            for name, value in values.items():
                setattr(h, name, value)
            if h.header_length < V3_MIN_HEADER_LENGTH:
                raise InvalidArgument("qcow2 header too short")
            # qcow2.txt: fields at or past header_length are absent (compression_type -> zlib).
            if h.header_length <= COMPRESSION_TYPE_OFFSET:
                h.compression_type = COMPRESSION_ZLIB
        if h.header_length > cs:
            raise InvalidArgument("qcow2 header exceeds cluster size")
        if h.header_length > V3_HEADER_SIZE:
            h.unknown_header_fields = buf[V3_HEADER_SIZE:h.header_length]
        if h.backing_file_offset > cs:
            raise InvalidArgument("Invalid backing file offset")
        ext_end = h.backing_file_offset or cs

        h._validate_compression_type()
        unknown = h.incompatible_features & ~INCOMPAT_MASK
        if unknown:
            h._read_extensions(buf, ext_end, features_only=True)
            raise NotSupported(_unsupported_features(h.feature_table, unknown))
        if h.subcluster_size < (1 << MIN_CLUSTER_BITS):
            raise InvalidArgument(f"Unsupported subcluster size: {h.subcluster_size}")
        if h.refcount_order > 6:
            raise InvalidArgument("Reference count entry width too large; may not exceed 64 bits")
        if h.refcount_table_clusters == 0 and not check:
            raise InvalidArgument("Image does not contain a reference count table")
        h._validate_table(h.refcount_table_offset, h.refcount_table_clusters, cs,
                          QCOW_MAX_REFTABLE_SIZE, "Reference count table")
        if not check:
            h._validate_table(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                              SNAPSHOT_HEADER_SIZE * QCOW_MAX_SNAPSHOTS, "Snapshot table")
        h._validate_table(h.l1_table_offset, h.l1_size, 8, QCOW_MAX_L1_SIZE, "Active L1 table")
        l1_vm_state_index = h.size_to_l1(h.size)
        if l1_vm_state_index > 0x7FFFFFFF:
            raise QBlockError("Image is too big", errno=errno.EFBIG)
        if h.l1_size < l1_vm_state_index:
            raise InvalidArgument("L1 table is too small")

        h._read_extensions(buf, ext_end, features_only=False)
        if h.backing_file_offset:
            length = h.backing_file_size
            if length > min(BACKING_FILE_MAX, cs - h.backing_file_offset):
                raise InvalidArgument("Backing file name too long")
            raw = buf[h.backing_file_offset:h.backing_file_offset + length]
            h.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return h

    def _validate_compression_type(self) -> None:
        """qcow2.c validate_compression_type()."""
        if self.compression_type not in COMPRESSION_NAMES:
            raise NotSupported(f"qcow2: unknown compression type: {self.compression_type}")
        has_bit = bool(self.incompatible_features & INCOMPAT_COMPRESSION)
        if self.compression_type == COMPRESSION_ZLIB and has_bit:
            raise InvalidArgument(
                "qcow2: Compression type incompatible feature bit must not be set")
        if self.compression_type != COMPRESSION_ZLIB and not has_bit:
            raise InvalidArgument("qcow2: Compression type incompatible feature bit must be set")

    def _validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                        name: str) -> None:
        """qcow2.c qcow2_validate_table()."""
        if entries > max_bytes // entry_len:
            raise QBlockError(f"{name} too large", errno=errno.EFBIG)
        if INT64_MAX - entries * entry_len < offset or offset % self.cluster_size:
            raise InvalidArgument(f"{name} offset invalid")

    def _read_extensions(self, buf: bytes, end: int, *, features_only: bool) -> None:
        """qcow2.c qcow2_read_extensions(): walk the extension area up to ``end``."""
        offset = self.header_length
        self.extensions = []
        while offset < end:
            ext_type, length = _EXT.unpack_from(buf, offset) if offset + 8 <= len(buf) else (0, 0)
            offset += 8
            if offset > end or length > end - offset:
                if features_only:
                    return
                raise InvalidArgument("Header extension too large")
            data = buf[offset:offset + length]
            if ext_type == EXT_END:
                return
            if ext_type == EXT_FEATURE_TABLE:
                self.feature_table = _parse_feature_table(data)
            elif features_only:
                pass
            elif ext_type == EXT_BACKING_FORMAT:
                if length >= BACKING_FORMAT_MAX:
                    raise InvalidArgument(f"ERROR: ext_backing_format: len={length} too large "
                                          f"(>={BACKING_FORMAT_MAX})")
                self.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif ext_type == EXT_CRYPTO_HEADER:
                self._check_crypto_ext(data)
                self.extensions.append(HeaderExtension(ext_type, data))
            elif ext_type == EXT_BITMAPS:
                if self._check_bitmaps_ext(data):
                    self.extensions.append(HeaderExtension(ext_type, data))
            else:
                self.extensions.append(HeaderExtension(ext_type, data))
            offset += (length + 7) & ~7

    def _check_crypto_ext(self, data: bytes) -> None:
        if self.crypt_method != CRYPT_LUKS:
            raise InvalidArgument(
                "CRYPTO header extension only expected with LUKS encryption method")
        if len(data) != _CRYPTO_EXT.size:
            raise InvalidArgument(f"CRYPTO header extension size {len(data)}, "
                                  f"but expected size {_CRYPTO_EXT.size}")
        offset, _ = _CRYPTO_EXT.unpack(data)
        if offset % self.cluster_size:
            raise InvalidArgument(f"Encryption header offset '{offset}' is not a multiple of "
                                  f"cluster size '{self.cluster_size}'")

    def _check_bitmaps_ext(self, data: bytes) -> bool:
        """Validate the bitmaps extension; False if it must be dropped (autoclear bit clear)."""
        if len(data) != _BITMAPS_EXT.size:
            raise InvalidArgument("bitmaps_ext: Invalid extension length")
        if not self.autoclear_features & AUTOCLEAR_BITMAPS:
            # qcow2.txt "Bitmaps extension": without the autoclear bit the bitmaps are stale.
            if self.version < 3:
                self.warnings.append(
                    "This qcow2 v2 image contains bitmaps, but they may have been modified by "
                    "a program without persistent bitmap support; so now they must all be "
                    "considered inconsistent")
            else:
                self.warnings.append("a program lacking bitmap support modified this file, so "
                                     "all bitmaps are now considered inconsistent")
            return False
        nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
        if reserved:
            raise InvalidArgument("bitmaps_ext: Reserved field is not zero")
        if nb > QCOW2_MAX_BITMAPS:
            raise InvalidArgument(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                                  f"supported maximum of {QCOW2_MAX_BITMAPS}")
        if nb == 0:
            raise InvalidArgument("found bitmaps extension with zero bitmaps")
        if dir_offset % self.cluster_size:
            raise InvalidArgument("bitmaps_ext: invalid bitmap directory offset")
        if dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise InvalidArgument(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds "
                                  f"the maximum supported size "
                                  f"({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})")
        return True

    # -- pack --------------------------------------------------------------------------------

    def pack(self) -> bytes:
        """The whole header cluster as qcow2_update_header() writes it.

        Order: header, unknown header fields, backing format, data file name (only with the
        external data file bit), FDE pointer, feature table (v3 and clusters > 4 KiB only),
        bitmaps, unknown extensions (in reverse order, like QEMU's list), end marker, backing
        file name.  Updates ``header_length``, ``backing_file_offset``/``_size``.
        Raises QBlockError (ENOSPC) if it does not fit in one cluster.
        """
        cs = self.cluster_size
        if self.version == 2:
            self.header_length = V2_HEADER_SIZE
        else:
            self.header_length = V3_HEADER_SIZE + len(self.unknown_header_fields)
        out = bytearray()
        exts: list[tuple[int, bytes]] = []
        if self.backing_format:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        ext = self.get_extension(EXT_DATA_FILE)
        if ext is not None and self.incompatible_features & INCOMPAT_DATA_FILE:
            exts.append((EXT_DATA_FILE, ext.data))
        ext = self.get_extension(EXT_CRYPTO_HEADER)
        if ext is not None and _CRYPTO_EXT.unpack(ext.data)[0] != 0:
            exts.append((EXT_CRYPTO_HEADER, ext.data))
        if self.version >= 3 and cs > 4096:
            exts.append((EXT_FEATURE_TABLE, b"".join(
                _FEATURE.pack(t, bit, name.encode()) for t, bit, name in QEMU_FEATURES)))
        ext = self.get_extension(EXT_BITMAPS)
        if ext is not None:
            exts.append((EXT_BITMAPS, ext.data))
        known = (EXT_DATA_FILE, EXT_CRYPTO_HEADER, EXT_BITMAPS)
        exts += [(e.type, e.data) for e in reversed(self.extensions) if e.type not in known]
        exts.append((EXT_END, b""))
        for ext_type, data in exts:
            out += _EXT.pack(ext_type, len(data)) + data + bytes(-len(data) % 8)
        name = b""
        if self.backing_file:
            name = self.backing_file.encode("utf-8", "surrogateescape")
            self.backing_file_offset = self.header_length + len(out)
            self.backing_file_size = len(name)
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        head = _V2.pack(*(getattr(self, n) for n, _ in V2_FIELDS))
        if self.version >= 3:
            head += _V3.pack(*(getattr(self, n) for n, _ in V3_FIELDS))
            head += self.unknown_header_fields
        result = head + out + name
        if len(result) > cs:
            raise QBlockError("Could not update qcow2 header: No space left on device",
                              errno=errno.ENOSPC)
        return bytes(result) + bytes(cs - len(result))


def _parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    """Entries of a feature name table extension (qcow2.txt "Feature name table")."""
    table = []
    for off in range(0, len(data) - _FEATURE.size + 1, _FEATURE.size):
        ftype, bit, name = _FEATURE.unpack_from(data, off)
        if not name or name[0] == 0:
            break
        table.append((ftype, bit, name.split(b"\0", 1)[0].decode("utf-8", "replace")))
    return table


def _unsupported_features(table: list[tuple[int, int, str]], mask: int) -> str:
    """qcow2.c report_unsupported_feature()."""
    names = []
    for ftype, bit, name in table:
        if ftype == FEAT_TYPE_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
            names.append(name)
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)
