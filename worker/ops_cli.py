"""Operator commands on the celery CLI: ``celery -A worker.app jobs list|show|requeue|cancel|purge-failed|replay``.

Registered through the ``celery.commands`` entry point (pyproject.toml), so they
run wherever the celery CLI runs, against the same broker and job records.
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ecg_audio import keys
from ecg_audio.chain import send_chain
from ecg_audio.jobs import FAILED_SET, JobStatus, JobStore, is_terminal
from ecg_audio.settings import get_settings
from ecg_audio.stage_table import STAGE_BY_NAME
from pipeline.errors import CancelledError


def _store(app: Any) -> JobStore:
    s = get_settings()
    return JobStore.from_url(app.conf.broker_url or s.redis_url, s.job_ttl_s)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


@click.group(name="jobs", help="Inspect and steer jobs: list, show, requeue, cancel, purge-failed, replay.")
def jobs() -> None:
    pass


@jobs.command(cls=CeleryCommand, name="list")
@click.option("--failed", is_flag=True, help="only failed jobs (the dead-letter list)")
@click.option("--limit", default=50, show_default=True)
@click.pass_context
def list_jobs(ctx: click.Context, failed: bool, limit: int) -> None:
    """One line per job, newest first."""
    app = ctx.obj.app
    store = _store(app)
    ids = store.failed_ids(limit) if failed else [str(i) for i in store.r.zrevrange(keys.JOBS_ALL, 0, limit - 1)]
    for job_id in ids:
        rec = store.get(job_id)
        if rec is None:
            continue
        err = f" {rec.error_code}: {rec.error_message}" if rec.error_code else ""
        click.echo(
            f"{rec.job_id}\t{rec.status}\t{rec.progress:3d}%\t{rec.stage or '-'}\t{_fmt_time(rec.updated_at)}{err}"
        )


@jobs.command(cls=CeleryCommand)
@click.argument("job_id")
@click.pass_context
def show(ctx: click.Context, job_id: str) -> None:
    """The whole job record (and whether a result is stored)."""
    store = _store(ctx.obj.app)
    rec = store.get(job_id)
    if rec is None:
        raise click.ClickException(f"no job {job_id!r}")
    doc = dict(rec.__dict__)
    doc["result_stored"] = store.get_result(job_id) is not None
    click.echo(json.dumps(doc, indent=1, default=str))


@jobs.command(cls=CeleryCommand)
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--priority", type=click.IntRange(0, 9), default=None)
@click.option("--force", is_flag=True, help="also requeue a job that is not finished (it may still be running)")
@click.pass_context
def requeue(ctx: click.Context, job_ids: tuple[str, ...], priority: int | None, force: bool) -> None:
    """Send finished (failed) jobs again as a new run; finished stages are skipped (checkpoints).

    A job that is queued or processing is refused: its chain is still alive, and a second one
    would run beside it. ``--force`` is for a job known to be stuck."""
    app = ctx.obj.app
    store = _store(app)
    refused = 0
    for job_id in job_ids:
        rec = store.get(job_id)
        if rec is None:
            click.echo(f"{job_id}: no such job", err=True)
            refused += 1
            continue
        if rec.status == JobStatus.COMPLETED and not force:
            click.echo(f"{job_id}: already completed, nothing to do")
            continue
        run = store.requeue(job_id, force=force)
        if run is None:
            click.echo(
                f"{job_id}: not finished ({rec.status}): its chain may still be running; "
                "requeue it with --force only if it is stuck",
                err=True,
            )
            refused += 1
            continue
        if rec.status == JobStatus.COMPLETED:
            # the stored result went with the requeue; a kept workspace's merge checkpoint goes too, so
            # that merge computes the result again instead of reporting the old one
            merged = get_settings().workspace_root / job_id / STAGE_BY_NAME["merge"].artifact
            merged.unlink(missing_ok=True)
        send_chain(app, {"job_id": job_id}, priority=priority)  # the stages read the request from the record
        click.echo(f"{job_id}: requeued as run {run} (resumes after the last finished stage)")
    if refused:
        ctx.exit(1)


@jobs.command(cls=CeleryCommand)
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_context
def cancel(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Cancel queued or running jobs: the next stage boundary stops the chain."""
    store = _store(ctx.obj.app)
    for job_id in job_ids:
        rec = store.get(job_id)
        if rec is None or is_terminal(rec.status):
            click.echo(f"{job_id}: nothing to cancel ({rec.status if rec else 'unknown'})")
            continue
        store.mark_failed(job_id, CancelledError.code, "cancelled by an operator", rec.stage)
        click.echo(f"{job_id}: cancelled")


@jobs.command(name="purge-failed", cls=CeleryCommand)
@click.option("--older-than", default=0.0, show_default=True, help="only failures older than this many hours")
@click.option("--yes", is_flag=True, help="do not ask")
@click.pass_context
def purge_failed(ctx: click.Context, older_than: float, yes: bool) -> None:
    """Forget failed jobs: everything each owns (record, result, event log, callbacks, index entries,
    leases; its workspace and result files). A job later created under the same id starts afresh: it
    replays none of these events, and its event ids (the final's included) are new."""
    store = _store(ctx.obj.app)
    cutoff = time.time() - older_than * 3600
    ids = [str(i) for i in store.r.zrangebyscore(FAILED_SET, 0, cutoff)]
    if not ids:
        click.echo("no failed jobs to purge")
        return
    if not yes:
        click.confirm(f"purge {len(ids)} failed jobs?", abort=True)
    settings = get_settings()
    for job_id in ids:
        store.purge(job_id)
        _remove_files(settings.workspace_root, settings.output_root, job_id)
    click.echo(f"purged {len(ids)} failed jobs")


def _remove_files(workspace_root: Path, output_root: Path, job_id: str) -> None:
    import shutil

    shutil.rmtree(workspace_root / job_id, ignore_errors=True)
    # <job_id>.<format> (json, srt, ...), not <job_id>.<more>.<format>: another job's, whose id has a dot
    for path in output_root.glob(f"{glob.escape(job_id)}.*"):
        if "." not in path.name[len(job_id) + 1 :]:
            path.unlink(missing_ok=True)


@jobs.command(cls=CeleryCommand)
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--since", default=None, help="only events after this event id (of the job's event log)")
@click.pass_context
def replay(ctx: click.Context, job_ids: tuple[str, ...], since: str | None) -> None:
    """Send the jobs' dead-lettered callbacks again, in order, with their original webhook-id."""
    from ecg_audio.callbacks import CallbackOutbox, UnknownEvent

    outbox = CallbackOutbox(_store(ctx.obj.app).r)
    for job_id in job_ids:
        try:
            ids = outbox.replay(job_id, since)
        except UnknownEvent as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"{job_id}: {len(ids)} event(s) queued again" + "".join(f"\n  {i}" for i in ids))
