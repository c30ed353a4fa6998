"""What the benches share: a fleet of real processes (Redis, workers, the shim) on this machine,
test clips cut with ffmpeg, the load average beside every timing, and the one JSON line each
bench prints.

Run every bench from the repository root as a module: ``python -m bench.<name> --help``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ecg_audio.jobs import is_terminal
from ops.stack import start_worker, worker_allocator_env

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def emit(result: dict[str, Any], load_before: list[float] | None = None, load_after: list[float] | None = None) -> None:
    """The bench's one line on stdout: its result as JSON, ending with the load averages
    before and after the run when they are given (the machine may be shared)."""
    if load_before is not None:
        result = {**result, "loadavg_before": load_before, "loadavg_after": load_after}
    print(json.dumps(result), flush=True)


# --- clips and the machine -----------------------------------------------------------------


def shared_audio(name: str) -> Path:
    """A recording from ../shared/audio, or exit 2 with a clear message."""
    path = SHARED / "audio" / name
    if not path.is_file():
        print(f"bench: {path} is absent: this bench needs the shared recordings in {SHARED}", file=sys.stderr)
        raise SystemExit(2)
    return path


def cut(src: Path, seconds: float, dest_dir: Path) -> Path:
    """The first ``seconds`` of ``src`` as a 16 kHz mono WAV in ``dest_dir``."""
    import subprocess

    from pipeline.media import ffmpeg_exe

    dest = dest_dir / f"{src.stem}-{int(seconds)}s.wav"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-loglevel",
            "error",
            "-y",
            "-t",
            str(seconds),
            "-i",
            str(src),
            "-ac",
            "1",
            "-ar",
            "16000",
            str(dest),
        ],
        check=True,
    )
    return dest


def concat_wav(sources: list[Path], seconds: float, dest: Path) -> Path:
    """``sources`` one after the other, cut to ``seconds``, as a 16 kHz mono PCM WAV ``dest``
    (ffmpeg's concat demuxer; its listing is written beside ``dest``)."""
    import subprocess

    from pipeline.media import ffmpeg_exe

    listing = dest.parent / "concat.txt"
    listing.write_text("".join(f"file '{src}'\n" for src in sources))
    subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing)]
        + ["-t", f"{seconds:.1f}", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(dest)],
        check=True,
    )
    return dest


def place_clip(src: Path, uploads: Path, start: float, seconds: float) -> str:
    """``seconds`` of ``src`` from ``start`` as a WAV where ``POST /api/uploads`` would put it;
    returns its ``upload://`` URL."""
    from pipeline.media import ffmpeg_exe

    upload_id = uuid.uuid4().hex
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-y", "-ss", f"{start:.2f}", "-t", str(seconds), "-i", str(src)]
    subprocess.run([*cmd, "-f", "wav", str(uploads / upload_id)], check=True)
    return f"upload://{upload_id}"


def process_tree(pid: int) -> list[Any]:
    """A process and its live descendants (psutil), [] when it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_for(cond: Any, timeout: float) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False); errors count as no."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # Redis restarting
            pass
        time.sleep(0.3)
    return False


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (noted beside every timing: the machine is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_now() -> float:
    """CPU seconds of this process and its waited-for children (ffmpeg), all threads."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- a fleet of real processes ---------------------------------------------------------


class Fleet:
    def __init__(self, var: Path, *, extra_env: dict[str, str] | None = None) -> None:
        from ops.stack import free_port

        self.var = var
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ)
        self.env.update(
            {
                "ECG_REDIS_URL": self.redis_url,
                "ECG_WORKSPACE_ROOT": str(var / "workspaces"),
                "ECG_OUTPUT_ROOT": str(var / "output"),
                "ECG_VAR_DIR": str(var),
                "ECG_URL_ALLOWLIST": '["127.0.0.1"]',
                "ECG_WORKER_DEAD_AFTER_S": "10",
                "ECG_WORKER_HEARTBEAT_S": "2",
                "ECG_LOG_LEVEL": "WARNING",
                "HF_HUB_OFFLINE": "1",
                "PYANNOTE_METRICS_ENABLED": "false",
                **(extra_env or {}),
            }
        )
        self.start_redis()
        from celery import Celery

        import celeryconfig
        from ecg_audio.jobs import JobStore

        self.app = Celery("chaos")
        self.app.config_from_object(celeryconfig)
        self.app.conf.broker_url = self.app.conf.result_backend = self.redis_url
        self.store = JobStore.from_url(self.redis_url)

    def start_redis(self) -> None:
        from ops.stack import start_redis

        self.redis = start_redis(self.var / "redis", self.redis_port, appendonly=True, log=self.var / "redis.log")

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.terminate()  # SIGTERM: Redis fsyncs the AOF and exits
        self.redis.wait(20)
        self.start_redis()

    def start_worker(self, name: str) -> None:
        self.workers[name] = start_worker(
            name, self.env, self.var / f"{name}.log", log_level="WARNING", quiet_cluster=True, cwd=REPO
        )

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.workers[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def wait_workers(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.app.control.ping(timeout=1.0) or []) >= n:
                    return
            except Exception:
                pass
            time.sleep(1)
        raise RuntimeError(f"{n} workers not ready in {timeout} s")

    def submit(self, source: str, callback: str | None = None, options: dict[str, Any] | None = None) -> str:
        return self.submit_as(f"chaos-{uuid.uuid4().hex[:10]}", source, callback, options)

    def submit_as(
        self, job_id: str, source: str, callback: str | None = None, options: dict[str, Any] | None = None
    ) -> str:
        """``submit`` under a chosen id (fault injection rules can name a job id prefix)."""
        from ecg_audio.chain import send_chain

        req = {"job_id": job_id, "video_url": source, "callback_url": callback, "options": options or {}}
        assert self.store.create(job_id, req)
        send_chain(self.app, {"job_id": job_id})  # the stages read the job from its record
        return job_id

    def blip_redis(self, down_s: float) -> None:
        """Redis stopped (SIGTERM: AOF synced) for ``down_s`` seconds, then started again on the same port."""
        assert self.redis is not None
        self.redis.terminate()
        self.redis.wait(20)
        time.sleep(down_s)
        self.start_redis()

    def counter(self, key: str) -> int:
        return int(self.store.r.get(key) or 0)

    def wait_all(self, job_ids: list[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            for j in job_ids:
                if is_terminal(status.get(j)):
                    continue
                try:
                    rec = self.store.get(j)
                except Exception:
                    continue  # Redis restarting
                status[j] = rec.status if rec else "missing"
            if all(is_terminal(status.get(j)) for j in job_ids):
                break
            time.sleep(0.5)
        return status

    def stage_runs(self, job_id: str) -> dict[str, int]:
        h = self.store.r.hgetall(f"ecg:job:{job_id}")
        return {k.split(":", 1)[1]: int(v) for k, v in h.items() if k.startswith("runs:")}

    def signature(self, job_id: str) -> Any:
        """What must not change under chaos: words and speakers (timings may jitter in the last digit)."""
        env = self.store.get_result(job_id) or {}
        segs = (env.get("result") or {}).get("segments", [])
        return [(s["speaker"], s["text"]) for s in segs]

    def close(self) -> None:
        for name in list(self.workers):
            self.kill_worker(name, signal.SIGTERM)
        for p in self.workers.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if self.redis:
            self.redis.terminate()
            self.redis.wait(10)


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
        worker_env = {**self.env, "ECG_LOG_LEVEL": log_level, **(env or {})}
        log = self.var / f"{name}.log"
        self.workers[name] = start_worker(
            name, worker_env, log, queues, log_level=log_level, quiet_cluster=True, cwd=REPO
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
        total = 0
        for p in process_tree(self.pid):
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
        # the command as it was given (``python -m bench.overhead ...``)
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **alloc})


def reexec_as_avx2_machine() -> None:
    """``--avx2``: run this bench (and every process it starts, which inherit the environment)
    with the kernels of an AVX2-only CPU (:data:`worker.cpu.AVX2_ONLY_ENV`). The libraries read
    these variables when they load, so the process re-executes itself with them first."""
    from worker.cpu import AVX2_ONLY_ENV

    if any(os.environ.get(k) != v for k, v in AVX2_ONLY_ENV.items()):
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **AVX2_ONLY_ENV})


AVX2_HELP = (
    "compute as an AVX2-only CPU would (oneDNN, MKL and torch capped at AVX2, CTranslate2 off MKL; "
    "ONNX Runtime keeps this CPU's kernels): worker.cpu.AVX2_ONLY_ENV"
)


# --- chaos helpers: a callback receiver, short clips to run --------------------------


class Receiver:
    """Callback receiver that can be taken down and brought back on the same port; ``delay_s``
    makes every answer that slow (a trickling backend)."""

    def __init__(self, port: int = 0, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.events: list[dict[str, Any]] = []
        self.arrived: dict[str, float] = {}  # event id -> when it (first) arrived, unix time
        self.lock = threading.Lock()
        self.port = port
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(rcv.delay_s)
                event = json.loads(body)
                with rcv.lock:
                    rcv.events.append(event)
                    rcv.arrived.setdefault(str(event.get("event_id")), time.time())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cb"

    def finals(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("job_id") == job_id and e.get("status") in ("completed", "failed")]

    def final_event_ids(self) -> list[str]:
        with self.lock:
            return [e["event_id"] for e in self.events if e.get("status") in ("completed", "failed")]


def make_clips(var: Path, n: int, seconds: float) -> list[str]:
    """Short clips cut from pyannote's bundled sample call (and ../shared when present)."""
    from pipeline.diarize import bundled_sample

    sources = [bundled_sample()]
    conv = REPO.parent / "shared" / "audio" / "conv_2spk_10min.wav"
    if conv.exists():
        sources.append(conv)
    clips = []
    uploads = var / "uploads"  # what the shim's /api/uploads writes; jobs name them upload://<id>
    uploads.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        start = 5.0 + 7.0 * (i // len(sources))
        clips.append(place_clip(src, uploads, start, seconds))
    return clips
