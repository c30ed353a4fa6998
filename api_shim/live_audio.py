"""A live stream's compressed audio decoded as it arrives: WebM or Ogg Opus, what a browser's
``MediaRecorder`` sends, into the stream's one format (pcm_s16le, 16 kHz mono).

One ffmpeg process per stream (the number of streams is bounded by the stream slots and the
per-key cap), fed the client's frames on stdin; its stdout is read as it comes. ffmpeg is told
not to probe ahead (a probe would wait for megabytes of input) and to flush every packet, so
decoded audio follows the input by well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pipeline.media import ffmpeg_exe

PCM = "pcm_s16le"
# encoding query value -> ffmpeg demuxer
CONTAINERS = {"webm_opus": "webm", "ogg_opus": "ogg"}
READ_BYTES = 3200  # 100 ms of 16 kHz pcm_s16le


class LiveDecoder:
    """``feed`` the client's bytes; iterate ``pcm()`` for the decoded audio; ``finish`` at stop;
    ``failure()`` says why ffmpeg gave up (None when it decoded to the end)."""

    def __init__(self, encoding: str) -> None:
        self.container = CONTAINERS[encoding]
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr = b""

    async def start(self) -> None:
        args = [
            ffmpeg_exe(),
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-fflags",
            "+nobuffer",
            "-probesize",
            "32",
            "-analyzeduration",
            "0",
            "-f",
            self.container,
            "-i",
            "pipe:0",
            "-threads",
            "1",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-flush_packets",
            "1",
            "pipe:1",
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def feed(self, data: bytes) -> bool:
        """False when ffmpeg no longer takes input (it gave up on the data)."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def finish(self) -> None:
        """No more input: ffmpeg decodes what it has, then its output ends."""
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.close()
            await self.proc.stdin.wait_closed()

    async def pcm(self) -> AsyncIterator[bytes]:
        """Decoded audio as it comes, whole samples only, until ffmpeg's output ends."""
        assert self.proc is not None and self.proc.stdout is not None
        odd = b""
        while chunk := await self.proc.stdout.read(READ_BYTES):
            chunk = odd + chunk
            cut = len(chunk) // 2 * 2
            odd = chunk[cut:]
            if cut:
                yield chunk[:cut]

    async def failure(self) -> str | None:
        """After the output ended: ffmpeg's complaint, or None when it decoded everything."""
        assert self.proc is not None and self.proc.stderr is not None
        self._stderr = await self.proc.stderr.read()
        code = await self.proc.wait()
        if code == 0:
            return None
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        return (lines[-1] if lines else f"ffmpeg exited with {code}")[:300]

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
