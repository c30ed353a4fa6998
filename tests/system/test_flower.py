"""Flower behind basic auth, driven by headless Chromium: the worker and a finished task are on the page."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Proc, free_port, wait_for_worker, wait_job
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARTIFACTS = REPO / "var" / "test-artifacts"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; `make system-deps` installs it)")
    return exe


def render(exe: str, url: str, tmp: Path, *, screenshot: Path | None = None) -> str:
    flags = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / ('chrome-' + uuid.uuid4().hex[:6])}",
        "--virtual-time-budget=8000",
        "--window-size=1400,900",
    ]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=False)
    out = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    return out.stdout


def test_flower_shows_worker_and_finished_task(
    stack_env: dict[str, str], api: httpx.Client, worker: Proc, sample_wav: Path, tmp_path: Path
) -> None:
    exe = chromium()
    port = free_port()
    flower = Proc(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--basic-auth=ops:flower-test-pw",
        ],
        stack_env,
        tmp_path / "flower.log",
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            flower.check_alive()
            try:
                return httpx.get(base + "/healthcheck", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, interval=0.5, what=lambda: "Flower's /healthcheck:\n" + flower.tail())
        assert httpx.get(base + "/", timeout=5).status_code == 401  # basic auth is on
        wait_for_worker(api, worker)
        with open(sample_wav, "rb") as fh:
            url = api.post("/api/uploads", content=fh.read()).json()["video_url"]
        job_id = f"flower-{uuid.uuid4().hex[:8]}"
        api.post("/api/upload-video/process-video", json={"job_id": job_id, "video_url": url})
        assert wait_job(api, job_id)["status"] == "completed"

        def merge_succeeded_in_flower() -> bool:  # the task events have reached Flower
            tasks = httpx.get(base + "/api/tasks", auth=("ops", "flower-test-pw"), timeout=10).json()
            return any(tid.startswith(f"{job_id}:merge") and t.get("state") == "SUCCESS" for tid, t in tasks.items())

        wait_for(merge_succeeded_in_flower, 120, interval=0.5, what=f"{job_id}'s merge as SUCCESS in Flower's API")
        authed = f"http://ops:flower-test-pw@127.0.0.1:{port}"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        workers_dom = render(exe, authed + "/workers", tmp_path, screenshot=ARTIFACTS / "flower-workers.png")
        tasks_dom = render(exe, authed + "/tasks", tmp_path, screenshot=ARTIFACTS / "flower-tasks.png")
        assert "w1@" in workers_dom, workers_dom[-2000:]
        assert f"{job_id}:merge" in tasks_dom and "ecg.merge" in tasks_dom, tasks_dom[-2000:]
        assert "SUCCESS" in tasks_dom
        for png in ("flower-workers.png", "flower-tasks.png"):
            assert (ARTIFACTS / png).stat().st_size > 10_000
    finally:
        flower.stop()
