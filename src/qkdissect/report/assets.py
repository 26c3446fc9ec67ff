"""What every report page shares: the Jinja environment with the inlined stylesheet, script and CSP, page names,
number formatting, PNG sizes."""

from __future__ import annotations

import base64
import hashlib
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup

__all__ = ["environment", "fmt", "head_page_name", "png_size", "round_up"]


def head_page_name(layer: int, head: int, n_layers: int, n_heads: int) -> str:
    """'layer03_head11.html' — indices zero-padded to the width of the largest one (at least 2)."""
    lw, hw = max(2, len(str(n_layers - 1))), max(2, len(str(n_heads - 1)))
    return f"layer{layer:0{lw}d}_head{head:0{hw}d}.html"


@lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("qkdissect.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    css = resources.files("qkdissect.report").joinpath("static/report.css").read_text(encoding="utf-8")
    js = resources.files("qkdissect.report").joinpath("static/report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    env.globals.update(
        css=Markup(css), js=Markup(js),
        csp=(f"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
             "base-uri 'none'; form-action 'none'"),
    )
    return env


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def round_up(value: float) -> float:
    """Round up to 1, 2 or 5 × 10^k (a readable colour-scale end)."""
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value - 1e-12)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if value else "none"
    return "—" if value is None or value == "" else str(value)
