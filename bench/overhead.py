#!/usr/bin/env python3
"""The overhead budget: in-process pipeline vs shim -> Redis -> chained tasks on a warm worker.

Same file, same models, same machine, measured in one run:

* **in-process**: ``ecg_cli.runner.analyze`` in this process (models loaded once, before
  the clock; a short warm-up job first).
* **fleet**: this bench starts its own Redis (AOF on), ONE worker
  (``celery -A worker.app worker -Q model,cpu --concurrency 1``) and the shim (uvicorn, one
  process). The recording is placed in ``<var>/uploads/`` beforehand (what ``POST
  /api/uploads`` does) and the job names it ``upload://<id>``. The clock runs from the
  ``POST /api/upload-video/process-video`` to the first ``GET /jobs/{id}`` (polled every
  0.2 s) that says ``completed``. The worker is warmed with one short job first.

The two paths alternate (in-process, fleet, in-process, ...) so that a change in the
machine's load hits both alike. Prints the medians and the ratio of medians; the
acceptance figure is ``ratio <= 1.05``.

Both paths run on the same C allocator: the bench re-executes itself with the worker's
``LD_PRELOAD`` / ``MALLOC_CONF`` (jemalloc when installed, see
``ops.stack.worker_allocator_env``), so what differs is the shim, Redis and the
chain; the JSON line names the allocator.

On a loaded machine the stage bodies' own times swing by more than 5 % from run to run,
whichever path runs them. So the bench also reports, per path, the time spent outside the
stage bodies (wall - sum of ``metadata.stage_times``: model-free orchestration: Redis
round trips, chain hops, the 0.2 s polling) and ``ratio_stage_free`` = (median in-process
wall + median fleet time outside stages) / (median in-process wall + median in-process time
outside stages): the ratio that the same stage work would give without the noise.

The helpers here (``BenchFleet``: Redis + workers on chosen queues + the shim; process-tree
RSS sampling) are shared with ``long.py``, ``pipelining.py`` and ``shim_load.py``.

usage: bench/overhead.py [--reps 3] [--file conv_2spk_10min.wav] [--seconds N] [--keep DIR]

``--seconds N`` uses only the first N seconds (smoke test). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from chaos import Fleet  # noqa: E402  (bench/chaos.py: Redis + real workers)
from stages import cut, loadavg, shared_audio  # noqa: E402

from ops.stack import worker_allocator_env  # noqa: E402

ACCEPT_RATIO = 1.05
API_KEY = "bench-" + uuid.uuid4().hex


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


class BenchFleet(Fleet):
    """chaos.Fleet plus: workers on chosen queues with chosen log levels, and the shim."""

    def __init__(self, var: Path, *, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(var, extra_env={"ECG_API_KEYS": json.dumps([API_KEY]), **(extra_env or {})})
        self.shim: subprocess.Popen[bytes] | None = None
        self.shim_url = ""
        self.uploads = var / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)

    def start_worker(  # type: ignore[override]
        self, name: str, queues: str = "model,cpu", *, log_level: str = "WARNING", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.var / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.workers[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "-Q",
                queues,
                "--concurrency",
                "1",
                "-n",
                f"{name}@%h",
                "--loglevel",
                log_level,
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=REPO,
            env={**self.env, **worker_allocator_env(), "ECG_LOG_LEVEL": log_level, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.workers[name]

    def start_shim(self, processes: int = 1, *, extra_args: tuple[str, ...] = ()) -> str:
        from ops.stack import free_port

        port = free_port()
        log = open(self.var / "shim.log", "ab")  # noqa: SIM115
        self.shim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api_shim.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(processes),
                "--no-access-log",
                "--log-level",
                "warning",
                *extra_args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.shim_url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.shim.poll() is not None:
                raise RuntimeError(f"the shim exited with {self.shim.returncode}; see {self.var / 'shim.log'}")
            try:
                if httpx.get(self.shim_url + "/health", timeout=2).status_code == 200:
                    return self.shim_url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the shim did not answer /health within 60 s")

    def place_upload(self, path: Path) -> str:
        """Put a file where ``POST /api/uploads`` would, and return its ``upload://`` URL."""
        upload_id = uuid.uuid4().hex
        try:
            os.link(path, self.uploads / upload_id)
        except OSError:
            shutil.copyfile(path, self.uploads / upload_id)
        return f"upload://{upload_id}"

    def close(self) -> None:
        if self.shim is not None:
            try:
                os.killpg(self.shim.pid, signal.SIGTERM)
                self.shim.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.shim.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        super().close()


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM runs the ``finally`` blocks (workers, shim and Redis stopped), as Ctrl-C does."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def submit_and_wait(
    client: Any, source: str, *, poll_s: float = 0.2, timeout_s: float = 3600.0, on_poll: Any = None
) -> tuple[float, dict[str, Any]]:
    """POST a job to the shim and poll ``GET /jobs/{id}`` until it ends; (seconds, final state)."""
    job_id = f"bench-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    resp = client.post(
        "/api/upload-video/process-video", json={"job_id": job_id, "video_url": source}, headers=headers()
    )
    if resp.status_code != 202:
        raise RuntimeError(f"submission refused: {resp.status_code} {resp.text[:300]}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/jobs/{job_id}", headers=headers()).json()
        if on_poll:
            on_poll(state)
        if state["status"] in ("completed", "failed"):
            elapsed = time.perf_counter() - t0
            if state["status"] != "completed":
                raise RuntimeError(f"job {job_id} failed: {state.get('error_code')} {state.get('error_message')}")
            return elapsed, state
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} did not end within {timeout_s} s")


class TreeRss:
    """Peak RSS of a process and its descendants, sampled every ``interval_s`` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._window_peak = 0

    def rss_now(self) -> int:
        try:
            import psutil
        except ImportError:  # /proc fallback
            return _proc_tree_rss(self.pid)
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = self.rss_now()
            self.peak = max(self.peak, rss)
            self._window_peak = max(self._window_peak, rss)
            self.samples.append((round(time.monotonic() - t0, 1), rss))
            self._stop.wait(self.interval_s)

    def start(self) -> TreeRss:
        self._thread.start()
        return self

    def reset_window(self) -> None:
        self._window_peak = self.rss_now()

    def window_peak(self) -> int:
        return self._window_peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _proc_tree_rss(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int((Path(f"/proc/{p}/statm")).read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(p, [])
    return total


def reexec_with_worker_allocator() -> None:
    """Run this process (the in-process path) on the C allocator the worker runs on.

    The worker is started with :func:`ops.stack.worker_allocator_env` (jemalloc when
    installed, as ``ecg-audio up`` and the image do); the bench re-executes itself with the
    same environment first, so that the two paths differ only by the shim, Redis and the
    chain, not by malloc. ``ECG_WORKER_MALLOC=system`` runs both on glibc.
    """
    alloc = worker_allocator_env()
    if alloc:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **alloc})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--file", default="conv_2spk_10min.wav", help="a file in ../shared/audio")
    ap.add_argument("--seconds", type=float, default=None, help="only the first N seconds (smoke test)")
    ap.add_argument("--keep", help="keep logs and workspaces in this directory")
    a = ap.parse_args()
    reexec_with_worker_allocator()
    from ecg_audio.logs import configure_logging

    configure_logging("INFO", json_output=False)  # to stderr: stdout carries only the JSON line
    exit_cleanly_on_sigterm()
    src = shared_audio(a.file)

    import httpx

    from ecg_audio.settings import get_settings
    from ecg_cli.runner import analyze
    from worker.models import get_registry

    with tempfile.TemporaryDirectory(prefix="ecg-bench-overhead-") as tmp:
        var = Path(a.keep or tmp)
        var.mkdir(parents=True, exist_ok=True)
        path = cut(src, a.seconds, var) if a.seconds else src
        warm_clip = cut(src, 5.0, var)
        fleet = BenchFleet(var / "fleet")
        try:
            fleet.start_worker("w1")
            fleet.start_shim(1)
            eprint("overhead: loading models in this process")
            settings = get_settings()
            registry = get_registry(settings)
            registry.preload()
            fleet.wait_workers(1)
            client = httpx.Client(base_url=fleet.shim_url, timeout=30)
            eprint("overhead: warm-up jobs")
            analyze(str(warm_clip), settings=settings, registry=registry)
            submit_and_wait(client, fleet.place_upload(warm_clip))
            inproc: list[float] = []
            shim: list[float] = []
            stage_sums: list[float] = []
            inproc_stage_sums: list[float] = []
            by_stage: dict[str, dict[str, list[float]]] = {"inprocess": {}, "fleet": {}}
            load_before = loadavg()
            for i in range(a.reps):
                t0 = time.perf_counter()
                env = analyze(str(path), settings=settings, registry=registry)
                inproc.append(time.perf_counter() - t0)
                inproc_stage_sums.append(sum(env["result"]["metadata"]["stage_times"].values()))
                for k, v in env["result"]["metadata"]["stage_times"].items():
                    by_stage["inprocess"].setdefault(k, []).append(v)
                eprint(f"overhead: rep {i + 1}: in-process {inproc[-1]:.2f} s  load {loadavg()}")
                secs, state = submit_and_wait(client, fleet.place_upload(path))
                shim.append(secs)
                stage_sums.append(sum(state["result"]["metadata"]["stage_times"].values()))
                for k, v in state["result"]["metadata"]["stage_times"].items():
                    by_stage["fleet"].setdefault(k, []).append(v)
                eprint(
                    f"overhead: rep {i + 1}: fleet {shim[-1]:.2f} s (stages {stage_sums[-1]:.2f} s)  load {loadavg()}"
                )
            load_after = loadavg()
        finally:
            fleet.close()
    med_in, med_shim = statistics.median(inproc), statistics.median(shim)
    ratio = med_shim / med_in
    print(
        json.dumps(
            {
                "bench": "overhead",
                "file": a.file,
                "seconds": a.seconds,
                "reps": a.reps,
                "inprocess_s": [round(x, 2) for x in inproc],
                "fleet_s": [round(x, 2) for x in shim],
                "fleet_stage_sum_s": [round(x, 2) for x in stage_sums],
                "inprocess_stage_sum_s": [round(x, 2) for x in inproc_stage_sums],
                # time outside the stage bodies: what the shim, Redis and the chain add (in process: ~0),
                # much less sensitive to the machine's load than the walls themselves
                "fleet_outside_stages_s": [round(w - st, 2) for w, st in zip(shim, stage_sums, strict=True)],
                "inprocess_outside_stages_s": [
                    round(w - st, 2) for w, st in zip(inproc, inproc_stage_sums, strict=True)
                ],
                # where a difference between the paths' stage sums comes from
                "stage_median_s": {
                    path: {k: round(statistics.median(v), 3) for k, v in stages.items()}
                    for path, stages in by_stage.items()
                },
                "ratio_stage_free": round(
                    (med_in + statistics.median(w - st for w, st in zip(shim, stage_sums, strict=True)))
                    / (med_in + statistics.median(w - st for w, st in zip(inproc, inproc_stage_sums, strict=True))),
                    4,
                ),
                "median_inprocess_s": round(med_in, 2),
                "median_fleet_s": round(med_shim, 2),
                "ratio_of_medians": round(ratio, 4),
                "accept_ratio_le": ACCEPT_RATIO,
                "meets_ratio": ratio <= ACCEPT_RATIO,
                "poll_interval_s": 0.2,
                # both paths run on this (the worker inherits the bench's environment)
                "allocator": os.environ.get("LD_PRELOAD") or "glibc",
                "malloc_conf": os.environ.get("MALLOC_CONF"),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
