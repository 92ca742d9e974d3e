"""Terminal output of the operator's commands: rich when the `fleet` extra is installed, plain text otherwise.

A device's venv has no rich (devices never need it), yet an operator may run `lepton-fleet deploy`
there; it must print the same table, only without colour. Every rich import of the fleet commands is
here or behind `have_rich()`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

_STYLE = re.compile(r"\[/?(?:(?:dim|bold|italic|cyan|magenta|green|yellow|red|white|blue)\s*)*\]")
"""The rich markup tags our own messages use (and only those: a label like `[x]` stays)."""


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class PlainConsole:
    """The part of rich's Console the fleet commands use."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def print(self, text: str, markup: bool = False) -> None:
        self.file.write((_STYLE.sub("", text) if markup else text) + "\n")
        self.file.flush()


def console(file: TextIO) -> Any:
    """A console writing to `file`: rich's (colour on a terminal) or a plain one."""
    if not have_rich():
        return PlainConsole(file)
    from rich.console import Console

    return Console(file=file, highlight=False, soft_wrap=True)


def plain_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a title line above."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip() + "\n"

    return title + "\n" + line(columns) + "".join(line(r) for r in rows)


def print_table(out: TextIO, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                plain: bool = False) -> None:
    """rich's table, or with `plain` (or without rich) `plain_table`: a line per row, never wrapped."""
    if plain or not have_rich():
        out.write(plain_table(title, [c.upper() for c in columns], rows))
        out.flush()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*row)
    Console(file=out, width=max(100, Console().width)).print(table)


class PlainProgress:
    """rich's Progress as the deploy command uses it: one line per device whenever its state changes."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def add_task(self, description: str, total: float = 1.0, **fields: Any) -> int:
        self.tasks.append({"total": total, "shown": None, **fields})
        return len(self.tasks) - 1

    def update(self, task: int, completed: float = 0.0, **fields: Any) -> None:
        t = self.tasks[task]
        t.update(fields)
        # A line per state and per quarter of the download, not per chunk.
        shown = (t.get("state"), int(4 * completed / t["total"]) if t["total"] else 0)
        if shown != t["shown"]:
            t["shown"] = shown
            self.file.write(f"{t.get('device', '')!s:<20} {100 * completed / (t['total'] or 1):5.1f}% "
                            f"{t.get('state', '')}\n")
            self.file.flush()


def progress(file: TextIO) -> Any:
    """Per-device progress bars on `file` (rich), or a line per change (plain)."""
    if not have_rich():
        return PlainProgress(file)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    return Progress(TextColumn("{task.fields[device]:<20}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TextColumn("{task.fields[state]}"), console=Console(file=file), transient=False)
