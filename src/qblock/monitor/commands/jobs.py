"""Job control commands (qapi/job.json, qapi/block-core.json; job-qmp.c, blockdev.c).

The job-* commands find a job by id ("Job not found"); the deprecated block-job-* commands find
a block job by device = job id ("Block job 'X' not found", DeviceNotActive).
"""
from __future__ import annotations

from typing import Any

from qblock.errors import QBlockError
from qblock.jobs.blockjob import BlockJob, DeviceNotActive
from qblock.jobs.job import Job
from qblock.monitor.context import CommandContext
from qblock.monitor.registry import command
from qblock.monitor.schema import BOOL, INT, STR, opt, req


def find_job(ctx: CommandContext, job_id: str) -> Job:
    """job-qmp.c find_job_locked()."""
    job = ctx.state.jobs.get(job_id)
    if job is None:
        raise QBlockError("Job not found")
    return job


def find_block_job(ctx: CommandContext, device: str) -> BlockJob:
    """blockdev.c find_block_job_locked()."""
    job = ctx.state.jobs.get(device)
    if not isinstance(job, BlockJob):
        raise DeviceNotActive(f"Block job '{device}' not found")
    return job


@command("query-jobs")
async def query_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    # job.c job_create() puts a new job at the head of the list: newest first
    return [job.info() for job in reversed(ctx.state.jobs.values())]


@command("query-block-jobs")
async def query_block_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[Any]:
    return [job.block_info() for job in reversed(ctx.state.jobs.values())
            if isinstance(job, BlockJob)]


# -- job-* ---------------------------------------------------------------------------------------
@command("job-pause", {"id": req(STR)})
async def job_pause(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_job(ctx, args["id"]).user_pause()
    return {}


@command("job-resume", {"id": req(STR)})
async def job_resume(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_job(ctx, args["id"]).user_resume()
    return {}


@command("job-cancel", {"id": req(STR)})
async def job_cancel(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """job-cancel is a forced cancel: a READY mirror does not complete."""
    await find_job(ctx, args["id"]).user_cancel(True)
    return {}


@command("job-complete", {"id": req(STR)})
async def job_complete(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_job(ctx, args["id"]).complete()
    return {}


@command("job-finalize", {"id": req(STR)})
async def job_finalize(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    await find_job(ctx, args["id"]).finalize()
    return {}


@command("job-dismiss", {"id": req(STR)})
async def job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_job(ctx, args["id"]).dismiss()
    return {}


# -- block-job-* (deprecated spellings, device = job id) ----------------------------------------
@command("block-job-set-speed", {"device": req(STR), "speed": req(INT)})
async def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_block_job(ctx, args["device"]).set_speed(args["speed"])
    return {}


@command("block-job-cancel", {"device": req(STR), "force": opt(BOOL)})
async def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """blockdev.c qmp_block_job_cancel(): a user-paused job needs force."""
    job = find_block_job(ctx, args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise QBlockError(f"The block job for device '{args['device']}' is currently paused")
    await job.user_cancel(force)
    return {}


@command("block-job-pause", {"device": req(STR)})
async def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_block_job(ctx, args["device"]).user_pause()
    return {}


@command("block-job-resume", {"device": req(STR)})
async def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_block_job(ctx, args["device"]).user_resume()
    return {}


@command("block-job-complete", {"device": req(STR)})
async def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_block_job(ctx, args["device"]).complete()
    return {}


@command("block-job-finalize", {"id": req(STR)})
async def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    await find_block_job(ctx, args["id"]).finalize()
    return {}


@command("block-job-dismiss", {"id": req(STR)})
async def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    find_block_job(ctx, args["id"]).dismiss()
    return {}
