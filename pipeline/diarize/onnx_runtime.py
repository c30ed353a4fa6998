"""Run a torch module's inference in ONNX Runtime, on the CPU.

The embedded diarization models (segmentation-3.0's SincNet + LSTM, CAM++'s convolutions)
run about 2x and 1.25x faster in ONNX Runtime than in eager PyTorch on a 2-core AVX2 CPU
(``bench/diarize_bench.py``), with the same outputs to float rounding. Each model is
exported once (``torch.onnx.export``, TorchScript-based) and the ``.onnx`` file is kept in a
cache folder, named by a digest of the module's weights, its input signature and the torch
and opset versions: later worker starts load it in a fraction of a second.

Only inference, only the CPU: on CUDA the models stay in torch (fp16 there is faster still).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17


def default_cache_dir() -> Path:
    return Path(os.environ.get("ECG_VAR_DIR", Path.home() / ".cache" / "ecg-audio")) / "onnx"


def _digest(module: Any, example_inputs: Sequence[Any], dynamic_axes: Mapping[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{OPSET}|{type(module).__qualname__}|{sorted(dynamic_axes.items())}".encode())
    for x in example_inputs:
        h.update(f"{tuple(x.shape[1:])}{x.dtype}".encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class OrtFunction:
    """``f(*tensors) -> tensor``: ``module(*tensors)`` evaluated by an ONNX Runtime session.

    Args:
        module: in eval mode; its forward takes ``len(input_names)`` tensors, returns one.
        example_inputs: tensors of the right rank and dtype (sizes along dynamic axes free).
        input_names: one name per input.
        dynamic_axes: ``{input name: {axis: label}}``; the output's batch axis is dynamic too.
        cache_dir: where the exported model is kept (None: export to memory, every time).
        threads: intra-op threads in all (default: torch's).
        streams: sessions that may run at once, from as many Python threads, sharing
            ``threads`` between them. A network of many small operations (CAM++) leaves a
            two-thread session's second thread idle much of the time, so two one-thread sessions
            beside each other do more work per second; a large LSTM (segmentation) does not.
        memory_arena: ONNX Runtime's CPU arena keeps the largest buffers it ever allocated for
            the life of the session, i.e. of the worker, beside whatever stage runs next. Off,
            they go back to the allocator after each call, at the cost of a malloc per buffer
            (see the segmentation model in ``pipeline.diarize``).
    """

    def __init__(
        self,
        module: Any,
        example_inputs: Sequence[Any],
        *,
        input_names: Sequence[str],
        dynamic_axes: Mapping[str, Mapping[int, str]],
        cache_dir: Path | None = None,
        threads: int | None = None,
        streams: int = 1,
        memory_arena: bool = True,
        name: str = "model",
    ) -> None:
        import onnxruntime as ort
        import torch

        self.input_names = list(input_names)
        axes = {key: dict(value) for key, value in dynamic_axes.items()}
        axes.setdefault("output", {0: "batch"})
        model: bytes | str
        if cache_dir is None:
            model = self._export(module, example_inputs, axes)
            self.path: Path | None = None
        else:
            path = Path(cache_dir) / f"{name}-{_digest(module, example_inputs, axes)}.onnx"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                data = self._export(module, example_inputs, axes)
                # write then rename: two workers starting together never read half a file
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            model = str(path)
            self.path = path
        total = int(threads or torch.get_num_threads())
        self.streams = max(1, min(int(streams), total))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, total // self.streams)
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = memory_arena
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its shape-inference warnings are noise here
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.streams):
            self._idle.put(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))

    def _export(self, module: Any, example_inputs: Sequence[Any], axes: Mapping[str, Any]) -> bytes:
        import torch

        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on Python values it turned into constants (shapes, loop counts)
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(example_inputs),
                buffer,  # type: ignore[arg-type]  # a file object is accepted too
                input_names=self.input_names,
                output_names=["output"],
                dynamic_axes=dict(axes),
                opset_version=OPSET,
                dynamo=False,
            )
        return buffer.getvalue()

    def __call__(self, *tensors: Any) -> Any:
        import torch

        feed = {
            name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
            for name, t in zip(self.input_names, tensors, strict=True)
        }
        session = self._idle.get()
        try:
            (output,) = session.run(None, feed)
        finally:
            self._idle.put(session)
        return torch.from_numpy(output)
