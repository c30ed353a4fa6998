"""Server-side request forgery through the real shim and the real worker.

At submission: a shim with the production URL policy (no allow-list) refuses media and
callback URLs aimed at loopback, private, link-local and unspecified addresses, and at
host names that resolve to loopback, with a 4xx, creates no job, and makes no
connection: TCP listeners on the loopback addresses count every accepted connection
and must count 0.

At fetch time: the session's stack allow-lists 127.0.0.1 (its test servers live there),
so a job may name a server on 127.0.0.1; when that server redirects to a loopback
address that is *not* allow-listed (127.0.0.2, [::1]) or to the metadata service, the
worker refuses the redirect before connecting: the job fails with DOWNLOAD_ERROR and
the listener on the target counts 0.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Proc, free_port, wait_for_worker, wait_job
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROCESS = "/api/upload-video/process-video"


class CountingListener:
    """A TCP listener that accepts, counts and closes every connection."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.controls = 0  # connections made on purpose by prove_it_counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def prove_it_counts(self) -> None:
        """Positive control: a connection made on purpose is counted. Connections are accepted in
        the order they were made, so once this one is counted, any made before it has been too."""
        before = self.accepted
        socket.create_connection((self.host, self.port), timeout=5).close()
        wait_for(lambda: self.accepted > before, what=f"the control connection to {self.netloc} counted")
        assert self.accepted == before + 1
        self.controls += 1

    @property
    def unexpected(self) -> int:
        """Connections that were not the positive controls."""
        return self.accepted - self.controls

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def v4() -> Iterator[CountingListener]:
    listener = CountingListener("127.0.0.1")
    yield listener
    listener.close()


class Unlistened(CountingListener):
    """Stands in for [::1] where the host has no IPv6: the URLs are still refused, nothing can count."""

    def __init__(self) -> None:
        self.host, self.port, self.accepted, self.controls = "::1", 9, 0, 0

    def prove_it_counts(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def v6() -> Iterator[CountingListener]:
    listener = CountingListener("::1") if _ipv6_loopback() else Unlistened()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def strict_shim(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shim with the production URL policy: the test stack's 127.0.0.1 allow-list removed."""
    var = tmp_path_factory.mktemp("strict-var")
    env = {k: v for k, v in stack_env.items() if k != "ECG_URL_ALLOWLIST"}
    env.update({"ECG_VAR_DIR": str(var), "ECG_WORKSPACE_ROOT": str(var / "ws"), "ECG_OUTPUT_ROOT": str(var / "out")})
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "strict-shim.log"
    proc = Proc(
        "strict-shim",
        [sys.executable, "-m", "uvicorn", "api_shim.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.answers(url + "/health"), 120, interval=0.3, what=lambda: "strict shim:\n" + proc.tail())
    yield url
    proc.stop()


def _loopback_names() -> list[str]:
    """Host names that resolve (here, offline) to loopback only: localhost, and /etc/hosts aliases."""
    names = []
    for name in ("localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()):
        try:
            infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        addresses = {ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos}
        if addresses and all(a.is_loopback for a in addresses) and name not in names:
            names.append(name)
    return names


# (video_url template, phrase the refusal must hold); {v4} and {v6} are the listeners' host:port
SUBMISSION_ROWS = [
    ("http://{v4}/a.mp4", "loopback"),
    ("https://{v4}/a.mp4", "loopback"),
    ("http://127.1:{v4port}/a.mp4", "loopback"),  # short form, resolved by inet_aton
    ("http://2130706433:{v4port}/a.mp4", "loopback"),  # decimal form
    ("http://0x7f.0.0.1:{v4port}/a.mp4", "loopback"),  # hex form
    ("http://0.0.0.0:{v4port}/a.mp4", "unspecified"),  # Linux connects 0.0.0.0 to the local host
    ("http://[::ffff:127.0.0.1]:{v4port}/a.mp4", "loopback"),  # IPv4-mapped IPv6
    ("http://{v6}/a.mp4", "loopback"),
    ("http://10.0.0.1/a.mp4", "private"),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
    ("http://[fd00::1]/a.mp4", "private"),
]


def test_loopback_and_private_urls_are_refused_at_submission_without_a_connection(
    strict_shim: str, v4: CountingListener, v6: CountingListener
) -> None:
    names = _loopback_names()
    assert "localhost" in names, "localhost does not resolve to loopback here"
    rows = [(u.format(v4=v4.netloc, v6=v6.netloc, v4port=v4.port), phrase) for u, phrase in SUBMISSION_ROWS]
    rows += [(f"http://{name}:{v4.port}/a.mp4", "resolves to") for name in names]
    seen: list[str] = []
    with httpx.Client(base_url=strict_shim, headers=AUTH, timeout=30) as api:
        for video_url, phrase in rows:
            for route in (PROCESS, "/transcribe"):
                job_id = f"ssrf-{uuid.uuid4().hex[:12]}"
                r = api.post(route, json={"job_id": job_id, "video_url": video_url})
                assert r.status_code == 422, (video_url, route, r.status_code, r.text)
                detail = r.json()["detail"]
                assert detail.startswith("video_url: ") and phrase in detail, (video_url, detail)
                assert api.get(f"/jobs/{job_id}").status_code == 404, f"{video_url}: a job was created"
            # the same target as a callback, with an acceptable media source
            job_id = f"ssrf-{uuid.uuid4().hex[:12]}"
            body = {"job_id": job_id, "video_url": "upload://" + uuid.uuid4().hex, "callback_url": video_url}
            r = api.post(PROCESS, json=body)
            assert r.status_code == 422 and r.json()["detail"].startswith("callback_url: "), (video_url, r.text)
            assert api.get(f"/jobs/{job_id}").status_code == 404
            seen.append(f"{video_url} -> {detail}")
    sys.stderr.write("\nrefused at submission:\n  " + "\n  ".join(seen) + "\n")
    # a connection made after every submission is counted: one made during them would be counted too
    v4.prove_it_counts()
    v6.prove_it_counts()
    assert (v4.unexpected, v6.unexpected) == (0, 0), seen


class RedirectServer:
    """On 127.0.0.1 (allow-listed in the test stack): /go/<n> answers 302 to targets[n]."""

    def __init__(self, targets: list[str]) -> None:
        self.hits = 0
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server_self.hits += 1
                n = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", targets[n])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_redirect_to_loopback_is_refused_at_fetch_time_before_any_byte(
    api: httpx.Client, worker: Proc, v6: CountingListener, tmp_path: Path
) -> None:
    other_loopback = CountingListener("127.0.0.2")  # loopback, but not the allow-listed 127.0.0.1
    targets = [
        f"http://{other_loopback.netloc}/media.wav",
        f"http://{v6.netloc}/media.wav",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::ffff:127.0.0.2]:{other_loopback.port}/media.wav",  # IPv4-mapped spelling
    ]
    v6_before = v6.unexpected
    redirects = RedirectServer(targets)
    try:
        wait_for_worker(api, worker)
        jobs = {}
        for n, target in enumerate(targets):
            job_id = f"ssrf-redirect-{uuid.uuid4().hex[:10]}"
            r = api.post(PROCESS, json={"job_id": job_id, "video_url": f"{redirects.url}/go/{n}"})
            assert r.status_code == 202, r.text  # the first hop is allow-listed: accepted
            jobs[target] = job_id
        for target, job_id in jobs.items():
            st = wait_job(api, job_id, timeout=300)
            assert st["status"] == "failed" and st["error_code"] == "DOWNLOAD_ERROR", (target, st)
            assert "redirect from" in st["error_message"] and "refused" in st["error_message"], (target, st)
            sys.stderr.write(f"\nredirect to {target}: {st['error_code']}: {st['error_message']}")
        assert redirects.hits >= len(targets), "the worker never fetched the first hop"
        other_loopback.prove_it_counts()  # made after the jobs ended: one made by them is counted first
        v6.prove_it_counts()
        assert (other_loopback.unexpected, v6.unexpected - v6_before) == (0, 0), "a redirect target was connected to"
    finally:
        redirects.close()
        other_loopback.close()
