"""One runner per ``qkdissect dynamics`` experiment, each with its frozen config dataclass.

``run_X(out, XConfig(...), progress=...)`` (module ``qkdissect.dynamics.runs.X``) writes
``out/results.json`` (format ``qkdissect-dynamics``, see :mod:`.common`) and the experiment's PNG
figures, and returns the results dictionary. The configs live in :mod:`.configs`; the command line
builds them from its options, so every default is written once. The runners (which import matplotlib)
are loaded on first use: ``from qkdissect.dynamics.runs import run_saxe`` works.
"""

from __future__ import annotations

import importlib
from typing import Any

from qkdissect.dynamics.runs.common import FORMAT, FORMAT_VERSION, load_results
from qkdissect.dynamics.runs.configs import (
    DepthSweepConfig,
    GeneralizationConfig,
    ICLConfig,
    MetalearnConfig,
    SaxeConfig,
    TransferConfig,
)

#: runner (and loader) name -> the module that defines it
RUNNERS = {"run_saxe": "saxe", "run_depth_sweep": "depth_sweep", "run_generalization": "generalization",
           "run_transfer": "transfer", "run_metalearn": "metalearn", "load_metalearn": "metalearn",
           "run_icl": "icl", "load_icl": "icl"}

__all__ = ["FORMAT", "FORMAT_VERSION", "load_results", "DepthSweepConfig", "GeneralizationConfig", "ICLConfig",
           "MetalearnConfig", "SaxeConfig", "TransferConfig", *RUNNERS]


def __getattr__(name: str) -> Any:
    if name in RUNNERS:
        return getattr(importlib.import_module(f"{__name__}.{RUNNERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
