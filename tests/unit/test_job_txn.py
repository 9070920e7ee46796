"""Grouped transactions in-process, for the case the interop tests cannot compare: a grouped
transaction whose last action fails after two backup jobs were created.  QEMU 7.2's
qemu-storage-daemon hangs there (job_completed_txn_abort() waits with job_finish_sync() for a
job that never started); qblock aborts both jobs: each announces only aborting, concluded and
null (no BLOCK_JOB_* event: they never started), the filters go, and the same backups can be
started afterwards."""
from __future__ import annotations

import asyncio
from typing import Any

import qblock
from qblock.block.node import close_node, registry
from qmp_inprocess import Monitor

SIZE = 1 << 20


def backup(job: str, target: str) -> dict[str, Any]:
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": "src",
                                                 "target": target, "sync": "full"}}


def test_grouped_transaction_aborts_jobs_never_started() -> None:
    mon = Monitor()

    async def scenario() -> None:
        try:
            for name in ("src", "t1", "t2"):
                await mon.ok("blockdev-add", {"driver": "null-co", "node-name": name,
                                              "size": SIZE})
            grouped = {"completion-mode": "grouped"}
            reply = await mon.q("transaction", {"actions": [
                backup("a", "t1"), backup("b", "t2"), {"type": "abort", "data": {}}],
                "properties": grouped})
            assert reply["error"]["desc"] == "Transaction aborted using Abort action"
            assert [(e["event"], e["data"]) for e in mon.events] == [
                ("JOB_STATUS_CHANGE", {"id": job, "status": status})
                for job, status in (("a", "created"), ("b", "created"), ("b", "aborting"),
                                    ("b", "concluded"), ("b", "null"), ("a", "aborting"),
                                    ("a", "concluded"), ("a", "null"))]
            assert await mon.ok("query-jobs") == []
            nodes = {n["node-name"] for n in await mon.ok("query-named-block-nodes")}
            assert nodes == {"src", "t1", "t2"}
            mon.events.clear()
            await mon.ok("transaction", {"actions": [backup("a", "t1"), backup("b", "t2")],
                                         "properties": grouped})
            for _ in range(200):
                if not mon.state.jobs:
                    break
                await asyncio.sleep(0.01)
            done = [e["data"]["device"] for e in mon.events
                    if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert done == ["b", "a"]  # newest first, as QEMU's job list
        finally:
            for node in reversed(list(registry.nodes.values())):
                if not node.parents and not node.closed:
                    await close_node(node)

    qblock.run(scenario())

