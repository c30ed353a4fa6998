"""A picture of who spoke when: one lane per speaker, time in mm:ss."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.diarize import SpeakerTurn

# Colour-blind-safe palette (Okabe & Ito), cycled when there are more speakers.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


# Fonts with Hangul (and CJK ideographs), tried in order after matplotlib's default DejaVu Sans
# (which has none): speaker names and titles may be Korean. Debian: fonts-nanum, fonts-noto-cjk.
CJK_FONTS = ("NanumGothic", "NanumBarunGothic", "Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans KR", "UnDotum")


def cjk_font() -> str | None:
    """The first installed font of CJK_FONTS, or None (Hangul then renders as empty boxes)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in installed), None)
    if found is None:
        # installed after matplotlib cached its font list: register the files directly
        for path in font_manager.findSystemFonts():
            if any(key in Path(path).name for key in ("NanumGothic.", "NanumBarunGothic.", "NotoSansCJK")):
                font_manager.fontManager.addfont(path)
        installed = {f.name for f in font_manager.fontManager.ttflist}
        found = next((name for name in CJK_FONTS if name in installed), None)
    return found


def _mmss(seconds: float, _position: object = None) -> str:
    seconds = max(0.0, seconds)
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{rest:02d}"
    return f"{minutes:02d}:{rest:02d}"


def render_timeline(turns: list[SpeakerTurn], duration: float, out_png: Path, title: str = "") -> Path:
    """Draw ``turns`` as horizontal bars, one lane per speaker (first speaker on top).

    Args:
        turns: speaker turns (overlapping turns are fine: they sit in different lanes).
        duration: length of the recording in seconds (the x axis spans [0, duration]).
        out_png: where to write the PNG; parent folders are created.
        title: optional title above the plot.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk = cjk_font()
    # matplotlib (>= 3.6) falls back glyph by glyph along the family list
    with plt.rc_context({"font.family": ["DejaVu Sans", cjk] if cjk else ["DejaVu Sans"]}):
        return _draw(turns, duration, out_png, title)


def _draw(turns: list[SpeakerTurn], duration: float, out_png: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    speakers = sorted({t.speaker for t in turns})
    duration = max(duration, max((t.end for t in turns), default=0.0), 1.0)

    lanes = max(1, len(speakers))
    fig = Figure(figsize=(12, 1.2 + 0.55 * lanes), dpi=100)
    ax = fig.add_subplot()
    for lane, speaker in enumerate(speakers):
        bars = [(t.start, t.end - t.start) for t in turns if t.speaker == speaker and t.end > t.start]
        talk = sum(width for _, width in bars)
        y = lanes - 1 - lane
        ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=PALETTE[lane % len(PALETTE)])
        ax.text(duration * 1.005, y, f"{100 * talk / duration:.0f}%", va="center", fontsize=8)
    ax.set_yticks(range(lanes))
    ax.set_yticklabels(list(reversed(speakers)) if speakers else ["(no speech)"])
    ax.set_ylim(-0.6, lanes - 0.4)
    ax.set_xlim(0, duration)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, steps=[1, 2, 3, 5, 6, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(_mmss))
    ax.set_xlabel("time (mm:ss)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, loc="left", fontsize=11)
    fig.tight_layout()

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
