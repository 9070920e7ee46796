"""The generic job: QEMU's job.c state machine, verbs, progress and lifecycle events.

A job runs as an asyncio task.  Its status follows qapi/job.json JobStatus with the transition
table and the verb table of job.c (REFERENCE 4.4); every status change emits
JOB_STATUS_CHANGE.  Subclasses implement ``run`` and the completion hooks.
"""
from __future__ import annotations

import asyncio
import enum
import re
from typing import Any, ClassVar

from qblock.errors import InvalidArgument, QBlockError
from qblock.monitor.events import EventBus


class JobStatus(str, enum.Enum):
    """qapi/job.json JobStatus."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
# job.c JobSTT: allowed transitions (REFERENCE 4.4)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
# job.c JobVerbTable: the states in which each verb is accepted (REFERENCE 4.4)
VERBS: dict[str, frozenset[JobStatus]] = {
    "cancel": _ACTIVE | {S.WAITING, S.PENDING},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "change": _ACTIVE,
    "complete": frozenset({S.READY, S.STANDBY}),
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")  # util/id.c id_wellformed()


_DONE = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})  # job_is_completed


class JobCancelled(Exception):
    """Raised at a pause point of a job that was cancelled; ends ``run``."""


class JobTxn:
    """job.c JobTxn: jobs that finish together.  Every job has one; a transaction with
    completion-mode=grouped puts its backup jobs into a shared one (REFERENCE 4.4): none
    finalizes before all are done, and when one fails or is cancelled the others are
    cancelled."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False

    def add(self, job: Job) -> None:
        """job_txn_add_job(): newest first, like QEMU's QLIST_INSERT_HEAD (this is the
        order in which the jobs go pending and finalize)."""
        if job.txn is not None:
            job.txn.jobs.remove(job)
        self.jobs.insert(0, job)
        job.txn = self


class Job:
    """One job: status, progress, pause/cancel/complete handling and the lifecycle."""

    job_type: ClassVar[str] = ""

    def __init__(self, job_id: str, jobs: dict[str, Job], events: EventBus | None = None, *,
                 auto_finalize: bool = True, auto_dismiss: bool = True) -> None:
        if not _ID_RE.match(job_id):
            raise InvalidArgument(f"Invalid job ID '{job_id}'")
        if job_id in jobs:
            raise InvalidArgument(f"Job ID '{job_id}' already in use")
        self.id = job_id
        self.jobs = jobs
        self.events = events
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = S.UNDEFINED
        self.progress_current = 0
        self.progress_total = 0
        self.pause_count = 0
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.should_complete = False
        self.busy = False
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()
        self.txn: JobTxn | None = None
        JobTxn().add(self)
        jobs[job_id] = self
        self._set_status(S.CREATED)

    # -- state -------------------------------------------------------------------------------
    def _set_status(self, status: JobStatus) -> None:
        """job_state_transition(): only table transitions; announce each one."""
        if status not in TRANSITIONS[self.status]:
            raise AssertionError(f"job {self.id}: invalid transition {self.status.value} -> "
                                 f"{status.value}")
        self.status = status
        if self.events is not None:
            self.events.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status.value})

    def check_verb(self, verb: str) -> None:
        """job_apply_verb(): refuse a verb the current state does not accept."""
        if self.status not in VERBS[verb]:
            raise QBlockError(f"Job '{self.id}' in state '{self.status.value}' cannot accept "
                              f"command verb '{verb}'")

    @property
    def paused(self) -> bool:
        return self.pause_count > 0

    def is_cancelled(self) -> bool:
        """job_is_cancelled(): a soft cancel of a READY job is a completion, not a cancel."""
        return self.cancelled and self.force_cancel

    def is_ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    def is_completed(self) -> bool:
        return self.status in (S.CONCLUDED, S.NULL, S.ABORTING)

    # -- hooks for subclasses ----------------------------------------------------------------
    async def run(self) -> None:
        """The job's work; returns when done, raises on failure."""
        raise NotImplementedError

    def supports_complete(self) -> bool:
        return False

    async def prepare(self) -> None:
        """Graph changes of a successful job; an exception turns the job into a failure."""

    async def abort(self) -> None:
        """Undo after failure or cancel."""

    async def clean(self) -> None:
        """Release what the job holds, success or not."""

    def emit_completed(self) -> None:
        """Announce success or failure (BLOCK_JOB_COMPLETED for block jobs)."""

    def emit_cancelled(self) -> None:
        """Announce a cancel (BLOCK_JOB_CANCELLED for block jobs)."""

    def emit_pending(self) -> None:
        """Announce PENDING when the user must finalize (BLOCK_JOB_PENDING)."""

    def emit_ready(self) -> None:
        """Announce READY (BLOCK_JOB_READY)."""

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        """job_start(): created -> running and the task begins."""
        self._set_status(S.RUNNING)
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._main())

    async def _main(self) -> None:
        try:
            if self.paused:
                await self.pause_point()
            await self.run()
        except JobCancelled:
            pass
        except Exception as e:  # the job fails with the message QEMU would report
            self.error = str(e)
        self.busy = False
        await self._job_completed()

    async def pause_point(self) -> None:
        """job_pause_point(): stop here while paused; raise once cancelled."""
        if self.is_cancelled():
            raise JobCancelled
        while self.paused and not self.is_cancelled():
            self.busy = False
            self._wake.clear()
            await self._wake.wait()
        self.busy = True
        if self.is_cancelled():
            raise JobCancelled

    async def sleep(self, seconds: float) -> None:
        """job_sleep_ns(): a sleep that pause, resume, cancel and complete cut short.

        The wake-up event is cleared after the sleep, not before, so a verb that arrived just
        before the job went to sleep is not lost (at worst a sleep ends early).
        """
        if not self.is_cancelled():
            self.busy = False
            try:
                await asyncio.wait_for(self._wake.wait(), seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self.busy = True
        await self.pause_point()

    def kick(self) -> None:
        self._wake.set()

    def set_ready(self) -> None:
        """job_transition_to_ready()."""
        self._set_status(S.READY)
        self.emit_ready()

    # -- verbs -------------------------------------------------------------------------------
    def pause(self) -> None:
        """job_pause(): one more reason to stay paused."""
        self.pause_count += 1
        if self.pause_count == 1:
            if self.status == S.RUNNING:
                self._set_status(S.PAUSED)
            elif self.status == S.READY:
                self._set_status(S.STANDBY)

    def resume(self) -> None:
        """job_resume(): drop one reason; the last one lets the job continue."""
        if self.pause_count == 0:
            return
        self.pause_count -= 1
        if self.pause_count == 0:
            if self.status == S.PAUSED:
                self._set_status(S.RUNNING)
            elif self.status == S.STANDBY:
                self._set_status(S.READY)
            self.kick()

    def user_pause(self) -> None:
        """job_user_pause()."""
        self.check_verb("pause")
        if self.user_paused:
            raise QBlockError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        """job_user_resume()."""
        if not self.user_paused:
            raise QBlockError("Can't resume a job that was not paused")
        self.check_verb("resume")
        self.user_paused = False
        self.resume()

    async def user_cancel(self, force: bool) -> None:
        """job_user_cancel(): a soft cancel of a READY job completes it without pivot."""
        self.check_verb("cancel")
        await self.cancel(force)

    async def cancel(self, force: bool) -> None:
        """job_cancel(): a job not started completes at once, a job done running aborts its
        transaction, a running one stops at its next pause point."""
        if self.status == S.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if self.status == S.CREATED:
            await self._job_completed()
        elif self.status in (S.WAITING, S.PENDING) and self.is_cancelled():
            await self._txn_abort()

    def _cancel_async(self, force: bool) -> None:
        """job_cancel_async(): a soft cancel of a job that is not READY is a forced one; a
        forced cancel resumes the job; the job wakes to see it."""
        self.cancelled = True
        self.force_cancel = self.force_cancel or force or not self.is_ready()
        if self.is_cancelled():
            self.user_paused = False
            self.resume_all()
        self.kick()

    def complete(self) -> None:
        """job_complete()."""
        self.check_verb("complete")
        if not self.supports_complete() or self.cancelled:
            raise QBlockError(f"The active block job '{self.id}' cannot be completed")
        self.should_complete = True
        self.kick()

    async def finalize(self) -> None:
        """job_finalize(): the user lets a PENDING job make its graph changes."""
        self.check_verb("finalize")
        await self._do_finalize()

    def dismiss(self) -> None:
        """job_dismiss(): drop a CONCLUDED job."""
        self.check_verb("dismiss")
        self._do_dismiss()

    def _do_dismiss(self) -> None:
        self._set_status(S.NULL)
        self.jobs.pop(self.id, None)

    async def wait(self) -> None:
        """Until the job concluded (or is gone)."""
        await self._finished.wait()

    # -- completion (job.c job_completed, job_finalize_single, job_completed_txn_*) -----------
    async def _job_completed(self) -> None:
        """job_completed(): the job is done running (or was cancelled before it started)."""
        self._update_rc()
        if self.error is not None:
            await self._txn_abort()
        else:
            await self._txn_success()

    def _update_rc(self) -> None:
        """job_update_rc(): a cancel is a failure; a failing job is aborting."""
        if self.error is None and self.is_cancelled():
            self.error = "Operation canceled"
        if self.error is not None and self.status != S.ABORTING:
            self.resume_all()
            self._set_status(S.ABORTING)

    def resume_all(self) -> None:
        """Leave PAUSED/STANDBY whatever the pause count (the job is ending)."""
        self.pause_count = 0
        if self.status == S.PAUSED:
            self._set_status(S.RUNNING)
        elif self.status == S.STANDBY:
            self._set_status(S.READY)

    async def _txn_success(self) -> None:
        """job_completed_txn_success(): wait for the transaction; the last job done moves
        them all to PENDING and, unless one wants a manual finalize, finalizes them."""
        assert self.txn is not None
        self.resume_all()
        self._set_status(S.WAITING)
        jobs = self.txn.jobs
        if any(j.status not in _DONE for j in jobs):
            return
        for job in list(jobs):
            job._set_status(S.PENDING)
            if not job.auto_finalize:
                job.emit_pending()
        if all(j.auto_finalize for j in jobs):
            await self._do_finalize()

    async def _do_finalize(self) -> None:
        """job_do_finalize(): prepare every job of the transaction, then finalize each; a
        failed prepare aborts them all."""
        assert self.txn is not None
        for job in list(self.txn.jobs):
            if job.error is None:
                try:
                    await job.prepare()
                except QBlockError as e:
                    job.error = str(e)
                job._update_rc()
            if job.error is not None:
                await self._txn_abort()
                return
        while self.txn.jobs:
            await self.txn.jobs[0]._finalize_single()

    async def _txn_abort(self) -> None:
        """job_completed_txn_abort(): cancel the other jobs, let those still running stop,
        then finalize (abort) every job in transaction order."""
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return
        txn.aborting = True
        others = [j for j in txn.jobs if j is not self]
        for job in others:
            job._cancel_async(True)
        current = asyncio.current_task()
        for job in others:
            if job.task is not None and job.task is not current and not job.task.done():
                await asyncio.shield(job.task)
        while txn.jobs:
            await txn.jobs[0]._finalize_single()

    async def _finalize_single(self) -> None:
        """job_finalize_single(): abort a failed job, clean up, announce the end (only if
        the job started), leave the transaction, conclude."""
        assert self.txn is not None
        self._update_rc()
        if self.error is not None:
            await self.abort()
        await self.clean()
        if self.task is not None:
            if self.is_cancelled():
                self.emit_cancelled()
            else:
                self.emit_completed()
        self.txn.jobs.remove(self)
        await self._conclude()

    async def _conclude(self) -> None:
        self._set_status(S.CONCLUDED)
        self._finished.set()
        if self.auto_dismiss or self.task is None:  # a job never started is always dismissed
            self._do_dismiss()

    # -- QMP ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """JobInfo for query-jobs (qapi/job.json member order)."""
        info: dict[str, Any] = {"id": self.id, "type": self.job_type,
                                "status": self.status.value,
                                "current-progress": self.progress_current,
                                "total-progress": self.progress_total}
        if self.error is not None:
            info["error"] = self.error
        return info
