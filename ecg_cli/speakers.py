"""``ecg-audio speakers add|list|remove``: the API key's speaker library, through the shim."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _client(a: argparse.Namespace) -> Any:
    import httpx

    url, key = a.client_config(Path(a.var_dir))
    # enrolling a file waits for a worker to embed it (ECG_SPEAKER_ENROLL_WAIT_S on the shim)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _refused(r: Any) -> int:
    body = r.json() if r.headers.get("content-type", "").endswith("json") else {}
    print(f"refused ({r.status_code} {body.get('code', '')}): {body.get('detail', r.text)}", file=sys.stderr)
    return 2


def cmd_add(a: argparse.Namespace) -> int:
    with _client(a) as client:
        if a.sample:
            path = Path(a.sample)
            with open(path, "rb") as fh:
                r = client.post("/speakers", data={"name": a.name}, files={"file": (path.name, fh)})
        elif a.from_job and a.speaker:
            r = client.post("/speakers", json={"name": a.name, "from_job": a.from_job, "speaker": a.speaker})
        else:
            print("give a sample file, or --from-job and --speaker", file=sys.stderr)
            return 2
    if r.status_code != 201:
        return _refused(r)
    s = r.json()
    print(f"{s['id']}  {s['name']}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    with _client(a) as client:
        r = client.get("/speakers")
    if r.status_code != 200:
        return _refused(r)
    for s in r.json()["speakers"]:
        print(f"{s['id']}  {s['name']}  ({len(s['samples'])} sample{'s' if len(s['samples']) != 1 else ''})")
    return 0


def cmd_remove(a: argparse.Namespace) -> int:
    with _client(a) as client:
        r = client.delete(f"/speakers/{a.id}")
    if r.status_code != 204:
        return _refused(r)
    print(f"removed {a.id} (its voiceprint is erased)")
    return 0


def add_parser(sub: Any, var_default: str, client_config: Callable[[Path], tuple[str, str]]) -> None:
    """The ``speakers`` command; ``client_config(var_dir)`` gives the shim's URL and API key."""
    sp = sub.add_parser("speakers", help="this API key's enrolled voices (through the shim)")
    ssub = sp.add_subparsers(dest="speakers_cmd", required=True)
    add = ssub.add_parser("add", help="enroll a voice: a 5-60 s sample of it, or a speaker of a finished job")
    add.add_argument("name")
    add.add_argument("sample", nargs="?", help="a media file of that one voice")
    add.add_argument("--from-job", help="a finished job of this API key")
    add.add_argument("--speaker", help="its speaker label, e.g. SPEAKER_01")
    add.set_defaults(func=cmd_add)
    ls = ssub.add_parser("list", help="the enrolled voices")
    ls.set_defaults(func=cmd_list)
    rm = ssub.add_parser("remove", help="erase a voice for good")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_remove)
    for p in (add, ls, rm):
        p.add_argument("--var-dir", default=var_default)
        p.set_defaults(client_config=client_config)
