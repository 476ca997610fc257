"""The report's volume-over-time plot: inline SVG drawn by matplotlib (see :mod:`.html`).

The SVG keeps its text as text (``svg.fonttype: none``), takes a fixed hash salt so the same
results give the same file, and loses the XML declaration, DOCTYPE and metadata, whose URLs
must not be in a page that opens offline.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

_TRACK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def volume_plot(timepoints: list[dict[str, Any]], tracks: list[dict[str, Any]], response: list[dict[str, Any]],
               *, salt: str) -> Any:
    """Volume over time (one line per lesion track, the total in black) as inline SVG markup."""
    if not timepoints:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from markupsafe import Markup

    x = list(range(len(timepoints)))
    by_case = {r.get("case_id"): r for r in response}
    style = {"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9}
    with plt.rc_context(style):
        fig, axis = plt.subplots(figsize=(7.2, 3.4))
        try:
            drawn = False
            for n, track in enumerate(tracks):
                y = [_nan(c["volume_ml"]) for c in track["cells"]]
                if all(math.isnan(v) for v in y):
                    continue
                label = f"{track['track'] or '?'} {track['name'] or ''}".strip()
                axis.plot(x, y, marker="o", ms=4, lw=1.4, color=_TRACK_COLOURS[n % len(_TRACK_COLOURS)], label=label)
                drawn = True
            total = [_nan(by_case.get(t.get("case_id"), {}).get("total_volume_ml")) for t in timepoints]
            if not all(math.isnan(v) for v in total):
                axis.plot(x, total, marker="s", ms=5, lw=2.4, color="black", label="total")
                drawn = True
            if not drawn:
                return None
            axis.set_xticks(x, [str(t.get("timepoint") if t.get("timepoint") is not None else t.get("case_id"))
                                for t in timepoints])
            axis.set_xlim(-0.4, len(x) - 0.6)
            axis.set_ylim(bottom=0)
            axis.set_ylabel("volume (mL)")
            axis.grid(axis="y", color="#dddddd", lw=0.6)
            for side in ("top", "right"):
                axis.spines[side].set_visible(False)
            for xi, t in zip(x, timepoints):
                r = by_case.get(t.get("case_id"))
                if r:
                    text = f"RECIST {r.get('recist') or '–'}\nvol. {r.get('volumetric') or '–'}"
                    axis.annotate(text, (xi, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                                  textcoords="offset points", ha="center", va="bottom", fontsize=8,
                                  color=_category_colour(r.get("recist"), r.get("volumetric")))
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
            fig.tight_layout()
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE (their URL must not be in the page)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    svg = re.sub(r'\swidth="[^"]*"\s+height="[^"]*"', ' class="plot"', svg, count=1)
    return Markup(svg)


def _category_colour(recist: Any, volumetric: Any) -> str:
    worst = {"PD": "#b00020", "NE": "#a05a00"}
    for category in (recist, volumetric):
        if category in worst:
            return worst[category]
    return "#1b5e20" if recist in ("CR", "PR") or volumetric in ("CR", "PR") else "#333333"


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
