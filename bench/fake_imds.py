"""A local stand-in for the EC2 instance metadata service (IMDSv2), for tests and the chaos bench.

Faithful to the parts the worker reads: a token from ``PUT /latest/api/token``
(with the TTL header), every GET refused (401) without a current token, and:

- ``/latest/meta-data/instance-id``
- ``/latest/meta-data/spot/instance-action``: 404 until a notice is given, then
  ``{"action": "terminate", "time": "2026-11-30T12:00:00Z"}`` as AWS sends it
- ``/latest/meta-data/autoscaling/target-lifecycle-state``: ``InService`` until the
  group starts terminating the instance, then ``Terminated``
"""

from __future__ import annotations

import json
import secrets
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeImds:
    def __init__(self, instance_id: str = "i-0fake") -> None:
        self.instance_id = instance_id
        self.spot_action: dict[str, str] | None = None
        self.lifecycle_state = "InService"
        self.tokens: set[str] = set()
        self.gets: list[str] = []
        self._lock = threading.Lock()
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._reply(400, "")
                    return
                token = secrets.token_hex(8)
                with imds._lock:
                    imds.tokens.add(token)
                self._reply(200, token)

            def do_GET(self) -> None:  # noqa: N802
                with imds._lock:
                    imds.gets.append(self.path)
                    authorised = self.headers.get("X-aws-ec2-metadata-token") in imds.tokens
                    body = imds._answer(self.path)
                if not authorised:
                    self._reply(401, "")
                elif body is None:
                    self._reply(404, "")
                else:
                    self._reply(200, body)

            def _reply(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, path: str) -> str | None:
        if path == "/latest/meta-data/instance-id":
            return self.instance_id
        if path == "/latest/meta-data/spot/instance-action":
            return json.dumps(self.spot_action) if self.spot_action else None
        if path == "/latest/meta-data/autoscaling/target-lifecycle-state":
            return self.lifecycle_state
        return None

    def interrupt(self, in_s: float = 120.0) -> None:
        """Give the two-minute spot notice (AWS: the action and its UTC time, to the second)."""
        when = (datetime.now(UTC) + timedelta(seconds=in_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self.spot_action = {"action": "terminate", "time": when}

    def terminate(self) -> None:
        """The Auto Scaling group starts terminating this instance (scale-in, instance refresh)."""
        with self._lock:
            self.lifecycle_state = "Terminated"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
