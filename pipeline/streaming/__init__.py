"""Live transcription: 16 kHz audio in as it arrives, words and speakers out while people talk.

The split follows ufal/whisper_streaming and diart: a pure streaming core that a test drives with
a file at any speed, with the transport (Redis, WebSocket) around it in ``worker.stream`` and
``api_shim.routes.stream``.

* ``types``: what a live session emits (``Partial``, ``Final``, ``SpeakerUpdate``) and its words;
* ``asr``: the Whisper backend (faster-whisper on the embedded models), words with times;
* ``agreement``: the LocalAgreement-2 policy (``HypothesisBuffer``, ``OnlineTranscriber``);
* ``speakers``: online speaker labels (CAM++ embeddings, diart's incremental clustering);
* ``session``: one live stream (``LiveSession``): audio in, messages out.

Importing the package stays cheap: the models load in ``asr.load_stream_models`` and
``speakers.load_embedder``.
"""

from __future__ import annotations

from pipeline.streaming.agreement import HypothesisBuffer, OnlineTranscriber
from pipeline.streaming.session import LiveOptions, LiveSession
from pipeline.streaming.speakers import OnlineSpeakers
from pipeline.streaming.types import Final, Partial, SpeakerUpdate, TimedWord

__all__ = [
    "Final",
    "HypothesisBuffer",
    "LiveOptions",
    "LiveSession",
    "OnlineSpeakers",
    "OnlineTranscriber",
    "Partial",
    "SpeakerUpdate",
    "TimedWord",
]
