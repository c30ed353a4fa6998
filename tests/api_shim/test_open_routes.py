"""The README's list of open routes is whole: every route a caller reaches without an API key
(no bearer security in the OpenAPI document, or outside it: docs, assets, WebSockets) is named
in its "Open routes" paragraph."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"


def _hidden_routes(routes: list[Any]) -> set[str]:
    """Paths served outside the OpenAPI document (docs pages, static assets, WebSockets)."""
    found: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found |= _hidden_routes(inner.routes)
        elif not getattr(route, "include_in_schema", True) or type(route).__name__ == "APIWebSocketRoute":
            found.add(route.path)
    return found


def test_every_route_open_without_a_key_is_in_the_readme() -> None:
    from api_shim.app import create_app
    from ecg_audio.settings import Settings

    app = create_app(Settings(api_keys=["readme-check-key-0123456789"]))
    spec = app.openapi()
    open_paths = {path for path, ops in spec["paths"].items() for op in ops.values() if not op.get("security")}
    token_paths = {
        path
        for path, ops in spec["paths"].items()
        for op in ops.values()
        if any(p["in"] == "query" and p["name"] == "token" for p in op.get("parameters", []))
    }
    every = open_paths | token_paths | _hidden_routes(app.routes)
    text = README.read_text()
    paragraph = text[text.index("**Open routes**") :].split("\n\n", 1)[0]
    named = set(re.findall(r"`(?:GET|POST|DELETE) ([^`]+)`", paragraph))
    assert "/health" in every and "/view-assets/{name}" in every and "/jobs/{job_id}/events/ws" in every
    assert every <= named, f"open routes missing from the README: {sorted(every - named)}"
