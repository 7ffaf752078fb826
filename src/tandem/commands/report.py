"""``tandem report``: compare run records as a text table, a PNG, and a page to share.

::

    tandem report runs/a runs/b                        # table on stdout, compare.png
    tandem report runs/a runs/sweep --html report.html  # one self-contained HTML page
    tandem report runs/a runs/b --target-accuracy 0.95 --out curves.png

A sweep directory stands for its variants; the best one is named (and marked on the page).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail
from tandem.errors import TandemError


@command("report", rank=40)
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories (or sweep directories)")],
    out: Annotated[Path | None, Opt(help="PNG with the runs' curves overlaid "
                                         "[default: compare.png, unless --html is given]")] = None,
    html: Annotated[Path | None, Opt(help="also write one self-contained HTML page (table, "
                                          "figures, configs) to attach to an issue or a review")
                    ] = None,
    target_accuracy: Annotated[float | None, Opt(help="count time- and bytes-to-target to this "
                                                      "test accuracy [default: each run's own]")
                               ] = None,
    target_loss: Annotated[float | None, Opt(help="the same for workloads without accuracy: "
                                                  "this test loss")] = None,
    title: Annotated[str | None, Opt(help="title of the HTML page")] = None,
) -> None:
    """Compare runs: a table on stdout, one PNG of their curves overlaid, optionally a page."""
    import tandem
    from tandem.telemetry.html import write_html
    from tandem.telemetry.report import build_report, format_sweeps, format_table, save_png

    if out is None and html is None:
        out = Path("compare.png")
    try:
        rep = build_report(list(runs), target_accuracy=target_accuracy, target_loss=target_loss)
        if out is not None:
            save_png(rep, out)
        if html is not None:
            write_html(rep, html, title=title, version=tandem.__version__)
    except (TandemError, OSError) as err:
        fail(err)
        return
    typer.echo(format_table(rep.rows))
    if rep.sweeps:
        typer.echo(format_sweeps(rep.sweeps))
    if out is not None:
        typer.echo(f"curves: {out}")
    if html is not None:
        typer.echo(f"page: {html}")
