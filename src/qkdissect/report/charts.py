"""Small inline SVG charts and the diverging colour scale of the HTML report.

Per-head charts are drawn straight from the numbers (no matplotlib): a ViT-H has 512 heads, and
512 matplotlib figures would dominate report time. Every chart is a ``markupsafe.Markup`` string
built only from formatted numbers and escaped text, so it is safe to insert into an autoescaped
template. Geometry: a fixed ``viewBox`` scaled to the container width by CSS.

Colour scale (heat map, legend): diverging around 0, blue (−vmax) → near-white (0) → red (+vmax),
piecewise linear in sRGB through the five stops of ColorBrewer's RdBu.
"""

from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup, escape

__all__ = ["cosine_svg", "distance_svg", "diverging_color", "nice_ticks", "spectrum_svg", "text_color"]

# ColorBrewer RdBu (5 classes), reversed so that negative is blue and positive is red.
_STOPS = ((-1.0, (33, 102, 172)), (-0.5, (146, 197, 222)), (0.0, (247, 247, 247)),
          (0.5, (244, 165, 130)), (1.0, (178, 24, 43)))
ABOVE, BELOW, INSIDE = "#b2182b", "#2166ac", "#8c8c8c"
BAND_FILL = "#d9d9d9"
_W, _H = 420, 190
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 10, 10, 34


def diverging_color(value: float, vmax: float) -> str:
    """'#rrggbb' for ``value`` on a scale symmetric around 0 that saturates at ±``vmax``."""
    t = 0.0 if not math.isfinite(value) or vmax <= 0 else max(-1.0, min(1.0, value / vmax))
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + f * (b - a)):02x}" for a, b in zip(c0, c1))
    return "#%02x%02x%02x" % _STOPS[-1][1]


def text_color(value: float, vmax: float) -> str:
    """Dark text on pale cells, white text on saturated ones."""
    return "#ffffff" if vmax > 0 and abs(value) / vmax > 0.6 else "#1a1a1a"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k steps) covering [lo, hi], about ``count`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(value) < 1e-12 * step else value)
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


class _Frame:
    """Maps data to viewBox coordinates: x = mode k (0..r−1, 0 = largest σ) in slots, y = linear in
    [y_lo, y_hi]."""

    def __init__(self, r: int, y_lo: float, y_hi: float):
        self.r, self.y_lo, self.y_hi = r, y_lo, y_hi
        self.width, self.height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
        self.slot = self.width / r

    def x(self, k: int) -> float:
        """Centre of the slot of mode k (0-based)."""
        return _LEFT + (k + 0.5) * self.slot

    def y(self, value: float) -> float:
        return _TOP + (self.y_hi - value) / (self.y_hi - self.y_lo) * self.height

    def axes(self, y_label: str, x_label: str = "mode k") -> list[str]:
        parts = [f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + self.height}"/>',
                 f'<line class="axis" x1="{_LEFT}" y1="{_TOP + self.height}" x2="{_LEFT + self.width}" '
                 f'y2="{_TOP + self.height}"/>']
        for tick in nice_ticks(self.y_lo, self.y_hi, 5):
            y = self.y(tick)
            parts.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + self.width}" y2="{y:.1f}"/>'
                         f'<text class="tick" x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt(tick)}</text>')
        step = max(1, math.ceil(self.r / 10))
        step = next((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 100) if s >= step), step)
        for k in range(0, self.r, step):
            parts.append(f'<text class="tick" x="{self.x(k):.1f}" y="{_TOP + self.height + 12}" '
                         f'text-anchor="middle">{k}</text>')
        parts.append(f'<text class="label" x="{_LEFT + self.width / 2:.1f}" y="{_H - 4}" '
                     f'text-anchor="middle">{escape(x_label)}</text>')
        parts.append(f'<text class="label" transform="translate(11 {_TOP + self.height / 2:.1f}) rotate(-90)" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        return parts


def _svg(parts: Sequence[str], label: str, css_class: str) -> Markup:
    head = f'<svg class="chart {css_class}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(label)}">'
    return Markup(head + "".join(parts) + "</svg>")


def spectrum_svg(S: Sequence[float], degenerate: Sequence[int] = ()) -> Markup:
    """Bar chart of the singular values σ_0 ≥ … ≥ σ_{r−1} (bar height ∝ σ_k from 0; modes 0-based).

    ``degenerate``: k where (σ_k − σ_{k+1})/σ_0 is below the tolerance; both bars of such
    a pair are drawn in orange (their singular vectors are not individually defined).
    """
    S = [float(s) for s in S]
    r = len(S)
    top = max(S) * 1.05 if S and max(S) > 0 else 1.0
    frame = _Frame(r, 0.0, top)
    flagged = {k for k in degenerate} | {k + 1 for k in degenerate}
    parts = frame.axes("σ_k")
    bar = frame.slot * 0.8
    base = frame.y(0.0)
    for k, sigma in enumerate(S):
        y = frame.y(sigma)
        cls = "bar degenerate" if k in flagged else "bar"
        parts.append(f'<rect class="{cls}" data-k="{k}" data-value="{sigma:.6g}" x="{frame.x(k) - bar / 2:.2f}" '
                     f'y="{y:.2f}" width="{bar:.2f}" height="{base - y:.2f}"><title>mode {k}: σ = {sigma:.4g}'
                     f'{" (near-degenerate)" if k in flagged else ""}</title></rect>')
    return _svg(parts, f"singular values of {r} modes", "spectrum")


def cosine_range(cosines: Sequence[float], band: tuple[float, float]) -> tuple[float, float]:
    """Symmetric y range around 0 that holds every cosine and the null band, in steps of 0.1, ≤ 1."""
    extent = max([abs(float(c)) for c in cosines if math.isfinite(float(c))] + [abs(band[0]), abs(band[1]), 0.05]) * 1.1
    extent = min(1.0, math.ceil(extent * 10 - 1e-9) / 10)
    return -extent, extent


def cosine_svg(cosines: Sequence[float], S: Sequence[float], band: tuple[float, float]) -> Markup:
    """Per-mode cosine u_k·v_k as dots against the null band (grey); dot area ∝ σ_k/σ_0.

    Red: above the band, blue: below it, grey: inside. y range from :func:`cosine_range`. Undefined modes (NaN
    cosine: σ_k ≤ ε·σ_1) get no dot.
    """
    cosines = [float(c) for c in cosines]
    S = [float(s) for s in S]
    lo, hi = band
    y_lo, y_hi = cosine_range(cosines, band)
    frame = _Frame(len(cosines), y_lo, y_hi)
    parts = [f'<rect class="band" x="{_LEFT}" y="{frame.y(min(hi, y_hi)):.2f}" width="{frame.width}" '
             f'height="{frame.y(max(lo, y_lo)) - frame.y(min(hi, y_hi)):.2f}" fill="{BAND_FILL}">'
             f'<title>null band [{lo:+.3f}, {hi:+.3f}]</title></rect>']
    parts += frame.axes("cos(u_k, v_k)")
    parts.append(f'<line class="zero" x1="{_LEFT}" y1="{frame.y(0):.2f}" x2="{_LEFT + frame.width}" '
                 f'y2="{frame.y(0):.2f}"/>')
    s_max = max(S) if S and max(S) > 0 else 1.0
    for k, (cos, sigma) in enumerate(zip(cosines, S)):
        if not math.isfinite(cos):
            continue
        color, where = (ABOVE, "above") if cos > hi else (BELOW, "below") if cos < lo else (INSIDE, "inside")
        radius = 1.8 + 3.2 * math.sqrt(max(sigma, 0.0) / s_max)
        parts.append(f'<circle class="dot {where}" data-k="{k}" data-value="{cos:.6f}" cx="{frame.x(k):.2f}" '
                     f'cy="{frame.y(cos):.2f}" r="{radius:.2f}" fill="{color}"><title>mode {k}: cos = {cos:+.3f}, '
                     f'σ = {sigma:.4g} ({where} the null band)</title></circle>')
    return _svg(parts, f"per-mode cosines of {len(cosines)} modes against the null band", "cosines")


def distance_svg(distances: Sequence[float], curve: Sequence[float], band: tuple[float, float]) -> Markup:
    """Weighted cosine C_h(|Δ|) of the offset-averaged form against the query–key distance (line
    with dots), the null band of C_h shaded, 0 marked."""
    xs, ys = [float(d) for d in distances], [float(c) for c in curve]
    lo, hi = band
    y_lo, y_hi = cosine_range(ys, band)
    x_hi = max(xs[-1], 1.0) if xs else 1.0
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + x / x_hi * width

    def py(y: float) -> float:
        return _TOP + (y_hi - y) / (y_hi - y_lo) * height

    parts = [f'<rect class="band" x="{_LEFT}" y="{py(min(hi, y_hi)):.2f}" width="{width}" '
             f'height="{py(max(lo, y_lo)) - py(min(hi, y_hi)):.2f}" fill="{BAND_FILL}">'
             f'<title>null band of C_h [{lo:+.3f}, {hi:+.3f}]</title></rect>',
             f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + height}"/>',
             f'<line class="axis" x1="{_LEFT}" y1="{_TOP + height}" x2="{_LEFT + width}" y2="{_TOP + height}"/>',
             f'<line class="zero" x1="{_LEFT}" y1="{py(0):.2f}" x2="{_LEFT + width}" y2="{py(0):.2f}"/>']
    for tick in nice_ticks(y_lo, y_hi, 5):
        parts.append(f'<text class="tick" x="{_LEFT - 4}" y="{py(tick) + 3:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    for tick in nice_ticks(0.0, x_hi, 6):
        parts.append(f'<text class="tick" x="{px(tick):.1f}" y="{_TOP + height + 12}" text-anchor="middle">'
                     f'{_fmt(tick)}</text>')
    parts.append('<polyline class="curve" fill="none" stroke="#444" stroke-width="1.4" points="'
                 + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys)) + '"/>')
    for x, y in zip(xs, ys):
        color = ABOVE if y > hi else BELOW if y < lo else INSIDE
        parts.append(f'<circle class="dot" data-x="{x:.4g}" data-value="{y:.6f}" cx="{px(x):.2f}" cy="{py(y):.2f}" '
                     f'r="2.6" fill="{color}"><title>|Δ| ≈ {x:.3g}: C = {y:+.3f}</title></circle>')
    parts.append(f'<text class="label" x="{_LEFT + width / 2:.1f}" y="{_H - 4}" text-anchor="middle">'
                 'query–key distance |Δ| (patches or tokens)</text>')
    parts.append(f'<text class="label" transform="translate(11 {_TOP + height / 2:.1f}) rotate(-90)" '
                 'text-anchor="middle">C_h(|Δ|)</text>')
    return _svg(parts, f"weighted cosine against distance over {len(xs)} distance bins", "distance")
