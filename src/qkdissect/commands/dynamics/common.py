"""What the ``qkdissect dynamics`` commands share: options, turning options into a config, running it.

Each command's options carry the names of its config dataclass's fields (``qkdissect.dynamics.runs``)
and take their defaults from it, so a default is written once. List-valued fields are given on the
command line as comma-separated text and parsed by the package's list parsers.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from qkdissect.commands.common import console, parse_float_list, parse_int_list, progress_reporter
from qkdissect.errors import QKDissectError

__all__ = ["config_from_options", "execute", "fmt", "list_default", "out_option", "quick_option", "results_table",
           "seed_option", "threads_option"]

C = TypeVar("C")

OUT_HELP = "Directory for results.json and the PNG figures (created if missing)."


def out_option(default: str) -> Any:
    """``--out DIR``."""
    return typer.Option(default, help=OUT_HELP)


def threads_option() -> Any:
    """``--threads N`` (torch CPU threads)."""
    return typer.Option(1, help="torch CPU threads (small matrices run fastest on one).")


def seed_option(default: int) -> Any:
    """``--seed N``."""
    return typer.Option(default, help="Random seed (every derived seed is recorded in results.json).")


def quick_option() -> Any:
    """``--quick`` (tiny settings for tests)."""
    return typer.Option(False, "--quick", help="Tiny settings for tests (< 1 min): overrides the size options.")


def list_default(values: Any) -> str:
    """A config's tuple default as the command-line text: ``(5.0, 4.0)`` -> ``'5,4'``."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not names:
        raise QKDissectError(f"{option}: expected at least one name, got {text!r}.")
    return names


def config_from_options(cls: type[C], options: dict[str, Any]) -> C:
    """An instance of the config dataclass ``cls`` with every field named in ``options`` set from it.

    Fields typed ``tuple[float, ...]``, ``tuple[int, ...]`` or ``tuple[str, ...]`` are read from
    comma-separated text (``--strengths 5,4,3``); every other field is passed as given. Options that
    are not fields (``out``, ``threads``, ``quick``) are ignored.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in options:
            continue
        value, hint = options[field.name], hints[field.name]
        option = "--" + field.name.replace("_", "-")
        if typing.get_origin(hint) is tuple and isinstance(value, str):
            element = typing.get_args(hint)[0]
            parse = {float: parse_float_list, int: parse_int_list}.get(element, _names)
            value = tuple(parse(value, option))
        values[field.name] = value
    return cls(**values)


def execute(run: Callable[..., dict[str, Any]], out: str, config: Any, threads: int) -> dict[str, Any]:
    """``run(out, config, progress=…)`` on ``threads`` torch threads with progress bars; its results."""
    import torch

    if threads < 1:
        raise QKDissectError(f"--threads: expected an integer >= 1, got {threads}.")
    torch.set_num_threads(threads)
    with progress_reporter() as progress:
        return run(out, config, progress=progress)


def fmt(x: Any, spec: str = ".4g") -> str:
    """``x`` formatted with ``spec``; an em dash for a missing value (None)."""
    return "—" if x is None else format(x, spec)


def results_table(title: str, out: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print a table titled ``title → OUT/results.json`` (the path shown literally, never as markup)."""
    table = Table(title=f"{escape(title)} → {escape(str(Path(out) / 'results.json'))}")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
