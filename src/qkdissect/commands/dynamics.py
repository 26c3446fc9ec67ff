"""``qkdissect dynamics ...``: how singular modes are learned (theory and simulations)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from qkdissect.dynamics.cli import app as dynamics_app

    app.add_typer(dynamics_app, name="dynamics",
                  help="How singular modes are learned: deep linear networks, generalisation, transfer, "
                       "meta-learning and in-context learning.")
