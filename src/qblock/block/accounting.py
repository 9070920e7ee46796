"""I/O accounting with QEMU's BlockDeviceStats fields (block/accounting.c, qapi BlockDeviceStats)."""
from __future__ import annotations

import enum
import time
from typing import Any


class AcctType(enum.Enum):
    """BlockAcctType: which family of counters a request updates."""

    READ = "rd"
    WRITE = "wr"
    FLUSH = "flush"
    UNMAP = "unmap"


class BlockAcctStats:
    """Counters of one BlockBackend; every request is counted once as done, failed or invalid."""

    def __init__(self, *, account_invalid: bool = True, account_failed: bool = True) -> None:
        self.account_invalid = account_invalid
        self.account_failed = account_failed
        self.nr_bytes = dict.fromkeys(AcctType, 0)
        self.nr_ops = dict.fromkeys(AcctType, 0)
        self.total_time_ns = dict.fromkeys(AcctType, 0)
        self.failed_ops = dict.fromkeys(AcctType, 0)
        self.invalid_ops = dict.fromkeys(AcctType, 0)
        self.merged = dict.fromkeys(AcctType, 0)
        self.last_access_ns: int | None = None
        self.wr_highest_offset = 0

    @staticmethod
    def start() -> int:
        """The start time of a request, to pass to ``done`` or ``failed``."""
        return time.monotonic_ns()

    def done(self, kind: AcctType, nbytes: int, start_ns: int) -> None:
        now = time.monotonic_ns()
        self.nr_bytes[kind] += nbytes
        self.nr_ops[kind] += 1
        self.total_time_ns[kind] += now - start_ns
        self.last_access_ns = now

    def failed(self, kind: AcctType, start_ns: int) -> None:
        now = time.monotonic_ns()
        self.failed_ops[kind] += 1
        if self.account_failed:
            self.total_time_ns[kind] += now - start_ns
            self.last_access_ns = now

    def invalid(self, kind: AcctType) -> None:
        self.invalid_ops[kind] += 1
        if self.account_invalid:
            self.last_access_ns = time.monotonic_ns()

    def to_qmp(self, wr_highest_offset: int) -> dict[str, Any]:
        """The BlockDeviceStats object of query-blockstats (QEMU 7.2 members)."""
        out: dict[str, Any] = {}
        for kind in AcctType:
            k = kind.value
            if kind is not AcctType.FLUSH:
                out[f"{k}_bytes"] = self.nr_bytes[kind]
            out[f"{k}_operations"] = self.nr_ops[kind]
            out[f"{k}_total_time_ns"] = self.total_time_ns[kind]
            if kind is not AcctType.FLUSH:
                out[f"{k}_merged"] = self.merged[kind]
            out[f"failed_{k}_operations"] = self.failed_ops[kind]
            out[f"invalid_{k}_operations"] = self.invalid_ops[kind]
        out["wr_highest_offset"] = wr_highest_offset
        if self.last_access_ns is not None:
            out["idle_time_ns"] = time.monotonic_ns() - self.last_access_ns
        out["account_invalid"] = self.account_invalid
        out["account_failed"] = self.account_failed
        out["timed_stats"] = []
        return out


def node_stats_qmp(wr_highest_offset: int) -> dict[str, Any]:
    """Stats of a node without a BlockBackend: zero counters but ``wr_highest_offset``."""
    return BlockAcctStats(account_invalid=False, account_failed=False).to_qmp(wr_highest_offset)
