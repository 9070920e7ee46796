"""The job core: every verb in every state, through the QMP commands (REFERENCE 4.4).

A test block job on a null-co node is brought into each state QMP can see (created, running,
paused, ready, standby, pending, concluded); then one verb is applied.  Verbs the state
accepts must work (and have their effect); the others fail with QEMU's message.  Lifecycle
event order and the speed limit are checked on the same job type.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import qblock
from qblock.block.node import BlockNode, close_node
from qblock.block.open import open_node
from qblock.block.perm import PERM_ALL, PERM_NONE
from qblock.jobs.blockjob import BlockJob
from qblock.jobs.job import TRANSITIONS, VERBS, JobStatus
from qblock.monitor.context import BlockState
from qmp_inprocess import execute


class StepJob(BlockJob):
    """Runs until told: ``go_ready`` makes it READY, ``finish`` ends it."""

    job_type = "test"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.go_ready = False
        self.finish = False

    def supports_complete(self) -> bool:
        return True

    async def run(self) -> None:
        while True:
            await self.pause_point()
            if self.go_ready and not self.is_ready():
                self.set_ready()
            if self.finish or self.should_complete or self.cancelled:
                return
            await self.sleep(1.0)


async def q(state: BlockState, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return await execute(state, name, args)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def make_job(state: BlockState, node: BlockNode, status: str) -> StepJob:
    """A job brought into ``status``."""
    job = StepJob("job0", state.jobs, state.events, node, PERM_NONE, PERM_ALL,
                  auto_finalize=status != "pending", auto_dismiss=status != "concluded")
    if status == "created":
        return job
    job.start()
    await settle()
    if status in ("ready", "standby"):
        job.go_ready = True
        job.kick()
        await settle()
    if status in ("paused", "standby"):
        job.user_pause()
    if status in ("pending", "concluded"):
        job.finish = True
        job.kick()
        await job.wait() if status == "concluded" else await settle()
    assert job.status.value == status
    return job


VERB_COMMANDS = {"cancel": ("job-cancel", {}), "pause": ("job-pause", {}),
                 "resume": ("job-resume", {}), "complete": ("job-complete", {}),
                 "finalize": ("job-finalize", {}), "dismiss": ("job-dismiss", {}),
                 "set-speed": ("block-job-set-speed", {"speed": 1 << 20})}
STATES = ["created", "running", "paused", "ready", "standby", "pending", "concluded"]


async def verb_case(status: str, verb: str) -> None:
    state = BlockState()
    node = await open_node({"driver": "null-co", "node-name": "null0", "size": 1 << 20})
    try:
        job = await make_job(state, node, status)
        name, extra = VERB_COMMANDS[verb]
        key = "device" if name.startswith("block-job") else "id"
        reply = await q(state, name, {key: "job0", **extra})
        allowed = JobStatus(status) in VERBS[verb]
        if verb == "resume" and status not in ("paused", "standby"):
            assert reply["error"]["desc"] == "Can't resume a job that was not paused"
        elif verb == "pause" and status in ("paused", "standby"):
            assert reply["error"]["desc"] == "Job is already paused"
        elif allowed:
            assert reply == {"return": {}}, reply
            await settle()
            expect = {"cancel": None, "pause": {"created": "created", "running": "paused",
                                                 "ready": "standby"}.get(status),
                      "resume": {"paused": "running", "standby": "ready"}.get(status),
                      # a completed job in standby stays paused until resumed
                      "complete": "standby" if status == "standby" else None,
                      "finalize": None, "dismiss": None,
                      "set-speed": status}[verb]
            if expect is None:  # the verb ends the job (auto-dismissed, or dismissed)
                await asyncio.wait_for(job.wait(), 5)
                assert "job0" not in state.jobs
            else:
                assert job.status.value == expect
            if verb == "set-speed":
                assert job.speed == 1 << 20
            if verb == "complete":
                assert job.should_complete
        else:
            assert reply["error"] == {
                "class": "GenericError",
                "desc": f"Job 'job0' in state '{status}' cannot accept command verb '{verb}'"}
        if "job0" in state.jobs and not job.is_completed():
            await job.cancel(True)
            await asyncio.wait_for(job.wait(), 5)
    finally:
        for blk_job in list(state.jobs.values()):
            blk_job.remove_nodes()
        await close_node(node)


@pytest.mark.parametrize("verb", sorted(VERB_COMMANDS))
@pytest.mark.parametrize("status", STATES)
def test_verb_in_state(status: str, verb: str) -> None:
    qblock.run(verb_case(status, verb))


def test_transition_table_is_qemus() -> None:
    """REFERENCE 4.4: U->C; C->R,X,N; R->P,Y,W,X; P->R; Y->S,W,X; S->Y; W->D,X; D->X,E;
    X->X,E; E->N."""
    letters = {"undefined": "U", "created": "C", "running": "R", "paused": "P", "ready": "Y",
               "standby": "S", "waiting": "W", "pending": "D", "aborting": "X",
               "concluded": "E", "null": "N"}
    got = {letters[k.value]: "".join(sorted(letters[s.value] for s in v))
           for k, v in TRANSITIONS.items()}
    assert got == {"U": "C", "C": "NRX", "R": "PWXY", "P": "R", "Y": "SWX", "S": "Y",
                   "W": "DX", "D": "EX", "X": "EX", "E": "N", "N": ""}


def run_events(auto_finalize: bool, action: str) -> list[tuple[str, Any]]:
    """Events of one job, reduced to (event, status or data keys)."""
    async def scenario() -> list[tuple[str, Any]]:
        state = BlockState()
        seen: list[dict[str, Any]] = []
        state.events.subscribe(seen.append)
        node = await open_node({"driver": "null-co", "node-name": "null0", "size": 1 << 20})
        try:
            job = StepJob("j", state.jobs, state.events, node, PERM_NONE, PERM_ALL,
                          auto_finalize=auto_finalize)
            job.start()
            await settle()
            if action == "finish":
                job.finish = True
                job.kick()
                await settle()
                if not auto_finalize:
                    assert (await q(state, "query-jobs"))["return"][0]["status"] == "pending"
                    assert (await q(state, "job-finalize", {"id": "j"})) == {"return": {}}
            elif action == "cancel":
                assert (await q(state, "block-job-cancel", {"device": "j"})) == {"return": {}}
            elif action == "soft-cancel-ready":
                job.go_ready = True
                job.kick()
                await settle()
                assert (await q(state, "block-job-cancel", {"device": "j"})) == {"return": {}}
            await asyncio.wait_for(job.wait(), 5)
        finally:
            await close_node(node)
        return [(e["event"], e["data"].get("status") or sorted(e["data"])) for e in seen]
    return qblock.run(scenario())


BLOCK_KEYS = ["device", "len", "offset", "speed", "type"]


def test_events_success_auto_finalize() -> None:
    assert run_events(True, "finish") == [
        ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
        ("JOB_STATUS_CHANGE", "waiting"), ("JOB_STATUS_CHANGE", "pending"),
        ("BLOCK_JOB_COMPLETED", BLOCK_KEYS), ("JOB_STATUS_CHANGE", "concluded"),
        ("JOB_STATUS_CHANGE", "null")]


def test_events_manual_finalize_emit_pending() -> None:
    assert run_events(False, "finish") == [
        ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
        ("JOB_STATUS_CHANGE", "waiting"), ("JOB_STATUS_CHANGE", "pending"),
        ("BLOCK_JOB_PENDING", ["id", "type"]), ("BLOCK_JOB_COMPLETED", BLOCK_KEYS),
        ("JOB_STATUS_CHANGE", "concluded"), ("JOB_STATUS_CHANGE", "null")]


def test_events_cancel() -> None:
    assert run_events(True, "cancel") == [
        ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
        ("JOB_STATUS_CHANGE", "aborting"), ("BLOCK_JOB_CANCELLED", BLOCK_KEYS),
        ("JOB_STATUS_CHANGE", "concluded"), ("JOB_STATUS_CHANGE", "null")]


def test_soft_cancel_of_ready_job_completes() -> None:
    assert run_events(True, "soft-cancel-ready") == [
        ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
        ("JOB_STATUS_CHANGE", "ready"), ("BLOCK_JOB_READY", BLOCK_KEYS),
        ("JOB_STATUS_CHANGE", "waiting"), ("JOB_STATUS_CHANGE", "pending"),
        ("BLOCK_JOB_COMPLETED", BLOCK_KEYS), ("JOB_STATUS_CHANGE", "concluded"),
        ("JOB_STATUS_CHANGE", "null")]


def test_lookup_errors_and_paused_cancel() -> None:
    async def scenario() -> None:
        state = BlockState()
        assert (await q(state, "job-pause", {"id": "nope"}))["error"] == {
            "class": "GenericError", "desc": "Job not found"}
        assert (await q(state, "block-job-pause", {"device": "nope"}))["error"] == {
            "class": "DeviceNotActive", "desc": "Block job 'nope' not found"}
        node = await open_node({"driver": "null-co", "node-name": "null0", "size": 1 << 20})
        try:
            with pytest.raises(Exception, match="Invalid job ID '1x'"):
                StepJob("1x", state.jobs, None, node, PERM_NONE, PERM_ALL)
            job = StepJob("j", state.jobs, None, node, PERM_NONE, PERM_ALL)
            with pytest.raises(Exception, match="Job ID 'j' already in use"):
                StepJob("j", state.jobs, None, node, PERM_NONE, PERM_ALL)
            job.start()
            await settle()
            assert (await q(state, "block-job-pause", {"device": "j"})) == {"return": {}}
            reply = await q(state, "block-job-cancel", {"device": "j"})
            assert reply["error"]["desc"] == "The block job for device 'j' is currently paused"
            info = (await q(state, "query-block-jobs"))["return"][0]
            assert (info["paused"], info["status"]) == (True, "paused")
            assert (await q(state, "block-job-cancel", {"device": "j", "force": True})) == {
                "return": {}}
            await asyncio.wait_for(job.wait(), 5)
        finally:
            await close_node(node)
    qblock.run(scenario())


class CopyJob(BlockJob):
    """Accounts ``total`` bytes in 64 KiB steps through the rate limiter."""

    job_type = "test"

    async def run(self) -> None:
        self.progress_total = 1 << 20
        while self.progress_current < self.progress_total:
            self.progress_current += 65536
            await self.ratelimit(65536)


def test_speed_limit_slows_the_job() -> None:
    async def scenario() -> float:
        node = await open_node({"driver": "null-co", "node-name": "null0", "size": 1 << 20})
        try:
            job = CopyJob("c", {}, None, node, PERM_NONE, PERM_ALL, speed=4 << 20)
            start = time.monotonic()
            job.start()
            await asyncio.wait_for(job.wait(), 5)
            return time.monotonic() - start
        finally:
            await close_node(node)
    # 1 MiB at 4 MiB/s: at least two 100 ms slices spent waiting, far less than a second
    assert 0.15 <= qblock.run(scenario()) < 1.0
