"""``tandem report``: compare run records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail
from tandem.errors import TandemError


@command("report", rank=40)
def report(runs: Annotated[list[Path], typer.Argument(help="run directories")],
           out: Annotated[Path, Opt(help="PNG with the runs' curves overlaid")] = Path("compare.png")) -> None:
    """Compare runs: a table on stdout and one PNG of their curves overlaid."""
    from tandem.telemetry.report import compare

    try:
        table, _ = compare(list(runs), out)
    except TandemError as err:
        fail(err)
        return
    typer.echo(table)
    typer.echo(f"curves: {out}")
