"""``qkdissect dynamics …``: how singular modes are learned (theory and simulations).

Every command builds its experiment's config (``qkdissect.dynamics.runs.configs``) from its options,
runs it with a progress bar, writes ``results.json`` and PNG figures into ``--out`` and prints a
summary table; bad input ends in one ``error:`` line and exit status 2 (``commands.common.guarded``).
"""

from __future__ import annotations

import typer

from qkdissect.commands.dynamics import incontext, linear

__all__ = ["app", "register"]

app = typer.Typer(
    name="dynamics",
    help="How singular modes are learned: deep linear networks (Saxe et al.), random-matrix generalisation "
         "theory and transfer (Lampinen & Ganguli), learners vs meta-learners (Rabinowitz), and the QK modes of "
         "in-context regression transformers.",
    no_args_is_help=True,
    add_completion=False,
)
linear.register(app)
incontext.register(app)


def register(parent: typer.Typer) -> None:
    """Mount ``dynamics`` on the ``qkdissect`` command line."""
    parent.add_typer(app, name="dynamics")
