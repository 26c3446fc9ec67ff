"""Shared pieces of the command-line interface: console, error guard, option parsing."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qkdissect.errors import QKDissectError
from qkdissect.files import write_json
from qkdissect.progress import ProgressFn

__all__ = ["console", "err_console", "guarded", "parse_float_list", "parse_int_list", "parse_range", "progress_bar",
           "progress_reporter", "write_json"]

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def guarded(func: F) -> F:
    """Run a command; a QKDissectError is printed (no traceback) and exits with status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QKDissectError as error:
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def parse_int_list(text: str, name: str = "value") -> list[int]:
    """'1,2,5' -> [1, 2, 5]; also accepts ranges '0-3' -> [0, 1, 2, 3]."""
    values: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        values.extend(parse_range(part, name))
    if not values:
        raise QKDissectError(f"{name} is empty; give numbers like 0,2,5 or a range 0-5.")
    return values


def parse_float_list(text: str, name: str = "value") -> list[float]:
    """'5,4,3.5' -> [5.0, 4.0, 3.5]; QKDissectError naming ``name`` for anything else."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise QKDissectError(f"{name}: expected comma-separated numbers such as 5,4,3, got {text!r}.") from None
    if not values:
        raise QKDissectError(f"{name}: expected at least one number, got {text!r}.")
    return values


def parse_range(text: str, name: str = "value") -> list[int]:
    """'3' -> [3]; '0-5' -> [0, 1, 2, 3, 4, 5]."""
    try:
        if "-" in text.strip().lstrip("-"):
            start, stop = text.split("-", 1)
            first, last = int(start), int(stop)
            if last < first:
                raise ValueError
            return list(range(first, last + 1))
        return [int(text)]
    except ValueError:
        raise QKDissectError(f"could not read {name} {text!r}; expected an integer or a range like 0-5.") from None


def progress_bar(*, transient: bool = False, unit: str = "") -> Progress:
    """A rich progress bar with count, elapsed and remaining time."""
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if unit:
        columns.append(TextColumn(f"{{task.fields[rate]}} {unit}"))
    return Progress(*columns, console=err_console, transient=transient)


@contextmanager
def progress_reporter(labels: dict[str, str] | None = None, *, transient: bool = False,
                      unit: str = "") -> Iterator[ProgressFn]:
    """A rich progress bar driven by qkdissect's one callback type ``progress(stage, done, total)``.

    Each new ``stage`` gets its own bar, labelled ``labels.get(stage, stage)``; with ``unit`` (e.g. "img/s")
    each bar also shows its rate: items done since the stage's first call (a resumed run starts part-way) per
    second.
    """
    tasks: dict[str, tuple[Any, float, int]] = {}
    with progress_bar(transient=transient, unit=unit) as bar:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = (bar.add_task((labels or {}).get(stage, stage), total=total, rate="–"),
                                time.perf_counter(), done)
            task, started, first = tasks[stage]
            elapsed = time.perf_counter() - started
            rate = f"{(done - first) / elapsed:.1f}" if elapsed > 0 else "–"
            bar.update(task, completed=done, total=total, rate=rate)

        yield update
