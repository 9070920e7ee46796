"""Block jobs: a job that holds edges on nodes, a speed limit and BLOCK_JOB_* events.

blockjob.c: the job is a parent in the block graph (its edges appear in
x-debug-query-block-graph as a "block-job" node); ``speed`` limits the bytes copied per second.
"""
from __future__ import annotations

import errno
import time
from typing import Any

from qblock.block.backend import BlockBackend
from qblock.block.graph import BdrvChild, attach_child, detach_child
from qblock.block.node import BlockNode, unref_if_unused
from qblock.block.perm import Perm, Role
from qblock.errors import InvalidArgument, QBlockError
from qblock.jobs.job import Job

SLICE_TIME = 0.1  # blockjob.c BLOCK_JOB_SLICE_TIME: 100 ms


class DeviceNotActive(QBlockError):
    """QMP DeviceNotActive: no block job with that name (blockdev.c find_block_job)."""

    qmp_class = "DeviceNotActive"


class BlockJob(Job):
    """A job on block nodes; ``nodes`` are its graph edges (block_job_add_bdrv)."""

    def __init__(self, job_id: str, jobs: dict[str, Job], events: Any, main: BlockNode,
                 perm: Perm, shared: Perm, *, speed: int = 0, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        if speed < 0:
            raise InvalidArgument("Parameter 'speed' expects a non-negative value")
        super().__init__(job_id, jobs, events, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.nodes: list[BdrvChild] = []
        self.backends: list[BlockBackend] = []  # listed in x-debug-query-block-graph
        self.speed = speed
        self.iostatus = "ok"
        self._slice_start = time.monotonic()
        self._slice_bytes = 0
        try:
            self.add_node(main, "main node", perm, shared)
        except Exception:
            self.jobs.pop(self.id, None)
            raise

    # -- graph parent ------------------------------------------------------------------------
    def parent_desc(self) -> str:
        """blockjob.c child_job_get_parent_desc()."""
        return f"{self.job_type} job '{self.id}'"

    def child_perms(self, child: BdrvChild) -> tuple[Perm, Perm]:
        return child.perm, child.shared

    def add_node(self, node: BlockNode, name: str, perm: Perm, shared: Perm) -> BdrvChild:
        """block_job_add_bdrv(): an edge with explicit permissions."""
        edge = attach_child(self, node, name, Role(0), perm, shared)
        self.nodes.append(edge)
        return edge

    def remove_nodes(self) -> list[BlockNode]:
        """block_job_remove_all_bdrv(); returns the nodes the job held."""
        held = []
        while self.nodes:
            edge = self.nodes.pop()
            detach_child(edge)
            held.append(edge.node)
        return held

    async def clean(self) -> None:
        for node in self.remove_nodes():
            await unref_if_unused(node)

    # -- speed (blockjob.c block_job_set_speed, block_job_ratelimit_*) ------------------------
    def set_speed(self, speed: int) -> None:
        self.check_verb("set-speed")
        if speed < 0:
            raise InvalidArgument("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self.kick()

    async def ratelimit(self, nbytes: int) -> None:
        """Account ``nbytes`` copied; sleep when the current slice is over its quota."""
        if not self.speed:
            await self.pause_point()
            return
        self._slice_bytes += nbytes
        quota = self.speed * SLICE_TIME
        while True:
            now = time.monotonic()
            if now - self._slice_start >= SLICE_TIME:
                slices = int((now - self._slice_start) / SLICE_TIME)
                self._slice_start += slices * SLICE_TIME
                self._slice_bytes = max(0, self._slice_bytes - int(quota * slices))
            if self._slice_bytes <= quota or not self.speed:
                break
            await self.sleep(self._slice_start + SLICE_TIME - now)
        await self.pause_point()

    # -- errors (blockjob.c block_job_error_action, REFERENCE 4.3 BlockdevOnError) -----------
    def error_action(self, on_error: str, is_read: bool, error: Exception) -> str:
        """Decide ignore/report/stop for a failed request; announce it, pause on stop."""
        err = getattr(error, "errno", None) or errno.EIO
        if on_error in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        else:
            action = on_error
        if not self.is_cancelled():
            self._emit("BLOCK_JOB_ERROR", {"device": self.id,
                                           "operation": "read" if is_read else "write",
                                           "action": action})
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            if self.iostatus == "ok":  # block_job_iostatus_set_err()
                self.iostatus = "nospace" if err == errno.ENOSPC else "failed"
        return action

    def user_resume(self) -> None:
        """block_job_user_resume(): resuming also clears the I/O status."""
        super().user_resume()
        self.iostatus = "ok"

    # -- events and query --------------------------------------------------------------------
    def _event_data(self) -> dict[str, Any]:
        return {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.emit(name, data)

    def emit_ready(self) -> None:
        self._emit("BLOCK_JOB_READY", self._event_data())

    def emit_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def emit_completed(self) -> None:
        data = self._event_data()
        if self.error is not None:
            data["error"] = self.error
        self._emit("BLOCK_JOB_COMPLETED", data)

    def emit_cancelled(self) -> None:
        self._emit("BLOCK_JOB_CANCELLED", self._event_data())

    def block_info(self) -> dict[str, Any]:
        """BlockJobInfo for query-block-jobs (qapi/block-core.json member order)."""
        info: dict[str, Any] = {
            "type": self.job_type, "device": self.id, "len": self.progress_total,
            "offset": self.progress_current, "busy": self.busy, "paused": self.paused,
            "speed": self.speed, "io-status": self.iostatus, "ready": self.is_ready(),
            "status": self.status.value, "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss}
        if self.error is not None:
            info["error"] = self.error
        return info
