"""The ``qkdissect`` command line: one command per job (see ``qkdissect --help``)."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="qkdissect",
    help="Dissect transformer attention into singular modes of W_qᵀW_k, and study how singular modes are learned.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module under qkdissect.commands has register(app); the order is the order in --help.
COMMAND_MODULES = ("demo", "dissect", "survey", "views", "preference", "report", "dynamics")

for _name in COMMAND_MODULES:
    importlib.import_module(f"qkdissect.commands.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
