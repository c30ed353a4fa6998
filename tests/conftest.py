"""Shared fixtures: real Redis, a real worker, the real shim, a real callback receiver, a moto server.

Everything is started by the tests themselves on free loopback ports and torn
down at the end. Paths come from ``__file__``, never the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from ecg_audio.settings import Settings
from tests.helpers import REGION, aws_settings, reset_moto, wait_for

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The whole-fleet runs (tests/system) last: they start the session's worker, shim and callback
    dispatcher, which then run beside every later test on the session's Redis. The package tests
    before them see a Redis that only they use (as they did when the tests were flat files), and
    the quick failures come first."""
    system = REPO / "tests" / "system"
    items.sort(key=lambda item: item.path.is_relative_to(system))


@pytest.fixture(autouse=True)
def _celery_current_app() -> Iterator[None]:
    """Each test gets back the Celery app that was current before it. ``Celery(...)`` makes itself
    the current app, and the stage tasks (shared tasks) resolve through it: a test's probe app
    without them, left current, made every later in-process stage call fail with NotRegistered."""
    from celery import _state

    before = _state.get_current_app()
    yield
    before.set_current()


def pytest_report_header(config: pytest.Config) -> str:
    return f"shared material: {SHARED if SHARED.is_dir() else 'ABSENT (tests that need it are skipped)'}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "audio").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): this test needs its recordings and scorer")
    return SHARED


@pytest.fixture(scope="session")
def sample_wav() -> Path:
    import pyannote.audio

    return Path(pyannote.audio.__file__).parent / "sample" / "sample.wav"


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    from pipeline.media import ffmpeg_exe

    return ffmpeg_exe()


def make_media(ffmpeg: str, src: Path | None, dest: Path, *extra: str, video: bool = False, seconds: float = 3) -> Path:
    """Make a test file with ffmpeg (a video track is a synthetic test pattern)."""
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        cmd += ["-f", "lavfi", "-i", f"testsrc=size=160x120:rate=10:duration={seconds}"]
    if src is not None:
        cmd += ["-i", str(src)]
    cmd += [*extra, str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


# --- services -----------------------------------------------------------------


def free_port() -> int:
    from ops.stack import free_port as fp

    return fp()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ops.stack import start_redis

    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port, appendonly=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


# A database of the session's Redis that no worker or shim of the session uses: tests that need
# a keyspace of their own (and flush it) use this one, never database 0.
SCRATCH_DB = 12


# A database that no worker, shim or callback dispatcher of the session serves: tests that run a
# stage in their own process (its lease, delivery count and published successor) use it, so the
# session's worker (started by whichever test needs it first) neither takes their messages nor
# reaps their deliveries.
STAGE_DB = 13

# A database for the live stream tests (tests/api_shim/test_stream_route.py): their stream worker,
# shim and the jobs their streams become, which no Celery worker of the session takes.
LIVE_DB = 15


@pytest.fixture(scope="session")
def stage_redis_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{STAGE_DB}"


@pytest.fixture(scope="session")
def scratch_redis_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{SCRATCH_DB}"


@pytest.fixture
def redis_client(scratch_redis_url: str) -> Iterator[Any]:
    """A client of the scratch database, emptied before the test."""
    import redis

    client = redis.Redis.from_url(scratch_redis_url)
    client.flushdb()
    yield client
    client.close()


# --- AWS: one moto server ----------------------------------------------------------


_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # Never reach a real instance metadata service from a test.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the session; ``aws`` resets its state before each test."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _FAKE_AWS_ENV}
    os.environ.update(_FAKE_AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def aws(moto_endpoint: str) -> str:
    reset_moto(moto_endpoint)
    return moto_endpoint


@pytest.fixture
def settings(aws: str) -> Settings:
    return aws_settings(aws)


@pytest.fixture
def worker_group(settings: Settings) -> Callable[[int], list[str]]:
    """Makes the moto group ``settings.worker_asg_name`` with n instances; returns their ids."""
    return lambda desired: _create_worker_group(settings, desired)


def _create_worker_group(settings: Settings, desired: int) -> list[str]:
    from ops import aws

    ec2 = aws.client("ec2", settings)
    image_id = "ami-12c6146b"  # any id: moto does not check it, and listing images is slow
    ec2.create_launch_template(
        LaunchTemplateName="ecg-worker-test",
        LaunchTemplateData={"ImageId": image_id, "InstanceType": "g4dn.xlarge"},
    )
    aws.client("autoscaling", settings).create_auto_scaling_group(
        AutoScalingGroupName=settings.worker_asg_name,
        LaunchTemplate={"LaunchTemplateName": "ecg-worker-test", "Version": "$Latest"},
        MinSize=0,
        MaxSize=5,
        DesiredCapacity=desired,
        AvailabilityZones=[f"{REGION}a"],
    )
    groups = aws.client("autoscaling", settings).describe_auto_scaling_groups(
        AutoScalingGroupNames=[settings.worker_asg_name]
    )["AutoScalingGroups"]
    return [i["InstanceId"] for i in groups[0]["Instances"]]


class Receiver:
    """A real HTTP server that records every callback POST."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: int | None = None
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.fail_with:
                    self.send_response(receiver.fail_with)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.events.append(json.loads(body))
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()} | {"_body": body.decode()})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/cb") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("job_id") == job_id]

    def wait_status(self, job_id: str, status: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Wait until a callback of ``job_id`` with ``status`` (e.g. its final) has arrived; its events."""
        wait_for(lambda: any(e["status"] == status for e in self.for_job(job_id)), timeout, interval=0.2,
                 what=f"a {status!r} callback of {job_id}")
        return self.for_job(job_id)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="session")
def stack_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    var = tmp_path_factory.mktemp("var")
    env = dict(os.environ)
    env.update(
        {
            "ECG_REDIS_URL": redis_url,
            "ECG_API_KEYS": json.dumps([API_KEY]),
            "ECG_VAR_DIR": str(var),
            "ECG_WORKSPACE_ROOT": str(var / "workspaces"),
            "ECG_OUTPUT_ROOT": str(var / "output"),
            "ECG_URL_ALLOWLIST": json.dumps(["127.0.0.1"]),
            "ECG_CALLBACK_SIGNING_KEY": "test-signing-key-for-callbacks",
            "ECG_LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "PYANNOTE_METRICS_ENABLED": "false",
        }
    )
    # The fake AWS credentials, whether or not a test started moto before this fixture was built:
    # the stack never reaches a real AWS or instance metadata service.
    env.update(_FAKE_AWS_ENV)
    return env


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        self.popen = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON lines of its log so far (the stack logs JSON: ECG_LOG_JSON=true)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited (waiting for it would be in vain)."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n" + self.tail())

    def answers(self, url: str) -> bool:
        """Whether ``url`` answers at all (any status): for ``wait_for`` while the process starts."""
        self.check_alive()
        try:
            httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return False
        return True

    def stop(self, timeout: float = 20) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_worker(env: dict[str, str], log: Path, name: str = "w1", queues: str = "model,cpu") -> Proc:
    from ops.stack import worker_command

    cmd = worker_command(name, queues, quiet_cluster=True, extra_args=("--without-heartbeat",))
    return Proc(name, cmd, env, log)


@pytest.fixture(scope="session")
def worker(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    w = start_worker(stack_env, log)
    yield w
    w.stop()


@pytest.fixture(scope="session")
def shim(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "shim.log"
    p = Proc("shim", [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(port)],
             stack_env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: p.answers(url + "/health"), 120, interval=0.3, what=lambda: "shim /health:\n" + p.tail())
    yield url
    p.stop()


@pytest.fixture(scope="session")
def api(shim: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shim, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


def wait_for_worker(api: httpx.Client, worker: Proc, timeout: float = 300) -> None:
    def ready() -> bool:
        worker.check_alive()
        return int(api.get("/health").json().get("workers", 0)) > 0

    wait_for(ready, timeout, interval=1, what=lambda: "worker ready:\n" + worker.tail())


def wait_job(api: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        st: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
        return st if st["status"] in ("completed", "failed") else None

    return wait_for(finished, timeout, interval=0.5, what=f"job {job_id} to finish")


@pytest.fixture(scope="session")
def score_py() -> Path | None:
    """The shared scorer when ../shared is there; None: :mod:`tests.scoring`, same definitions."""
    path = SHARED / "tools" / "score.py"
    return path if path.is_file() else None


def score(score_py: Path | None, result_json: Path, ref: Path, rttm: Path | None = None) -> dict[str, Any]:
    if score_py is None:
        from tests.scoring import score_result

        return score_result(result_json, ref, rttm)
    cmd = [sys.executable, str(score_py), str(result_json), str(ref)]
    if rttm:
        cmd += ["--rttm", str(rttm)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Call:
    """A recording with its reference: words (``ref``) and speaker turns (``rttm``)."""

    wav: Path
    ref: Path
    rttm: Path
    speakers: int
    der_max: float


@pytest.fixture(scope="session")
def scored_call(sample_wav: Path) -> Call:
    """The 3-minute three-speaker call of ../shared (overlapping speech) when it is there;
    otherwise pyannote's bundled two-speaker sample, so a fresh clone runs the whole path."""
    shared = SHARED / "audio" / "conv_3spk_overlap_3min.wav"
    if shared.is_file():
        return Call(shared, shared.with_suffix(".json"), shared.with_suffix(".rttm"), 3, 0.15)
    print(f"../shared is absent ({shared}): scoring pyannote's bundled sample instead")
    return Call(sample_wav, sample_wav.with_suffix(".stm"), sample_wav.with_suffix(".rttm"), 2, 0.10)


def which(name: str) -> str | None:
    return shutil.which(name)


# a name tiny.en does not know: it hears "Shivong" (the vocabulary tests prompt it with the spelling)
GUEST_NAME = "Siobhan Nakagawa"


@pytest.fixture(scope="session")
def guest_name_wav(tmp_path_factory: pytest.TempPathFactory, ffmpeg: str) -> Path:
    """An English sentence with GUEST_NAME in it, twice (espeak-ng's voice, 16 kHz mono)."""
    if which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps installs it): the vocabulary tests speak a name")
    folder = tmp_path_factory.mktemp("vocabulary")
    text = f"Good evening. Our guest tonight is {GUEST_NAME}. {GUEST_NAME.split()[0]}, welcome to the show."
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(folder / "raw.wav"), text], check=True)
    out = folder / "guest.wav"
    cmd = [ffmpeg, "-loglevel", "error", "-y", "-i", str(folder / "raw.wav"), "-ar", "16000", "-ac", "1", str(out)]
    subprocess.run(cmd, check=True)
    return out
