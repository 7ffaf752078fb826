"""``tandem``: the command line. Thin: each command is one module of :mod:`tandem.commands`
(registered with a decorator); they parse, validate through the config model and the resolve
step, and call the Python API. Every flag of ``tandem train`` maps onto one field of
:class:`~tandem.config.RunConfig`."""

from __future__ import annotations

import typer

from tandem.commands.base import COMMANDS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: distributed training that sends far fewer bytes and never waits "
                       "for the slowest machine.")

for _cmd in sorted(COMMANDS.values(), key=lambda c: (c.rank, c.name)):
    _cmd.attach(app)

if __name__ == "__main__":
    app()
