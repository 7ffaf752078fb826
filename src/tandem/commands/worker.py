"""``tandem worker``: one worker process under torchrun."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail
from tandem.errors import TandemError

#: torch's elastic agent waits in an exit barrier for every node's agent once its own workers
#: succeed; a node whose worker died never arrives, so the survivors' torchrun waits the
#: barrier's whole timeout (300 s; ``LocalElasticAgent``'s, with no torchrun flag) after the run
#: is complete. Said at the end, so the wait is not mistaken for a hang.
EXIT_BARRIER_NOTE = ("note: ranks {lost} were lost and the run completed without them; its record "
                     "and model are written. torchrun on each surviving node now waits up to "
                     "300 s in torch's exit barrier for the lost nodes' agents, which never "
                     "arrive; stopping it (Ctrl-C) loses nothing.")


@command("worker", rank=20)
def worker(config: Annotated[Path, Opt(help="the run's YAML config")]) -> None:
    """One worker process under torchrun: `torchrun --nproc_per_node=4 -m tandem.cli worker --config run.yaml`. Global rank 0 shows the progress bar and prints the summary at the end, as `tandem train` does."""
    from tandem.commands.train import print_summary
    from tandem.launch_child import exit_without_teardown
    from tandem.worker import torchrun_main

    code = 1
    try:
        try:
            done = torchrun_main(str(config))
        except TandemError as err:
            fail(err)
        if done is not None:
            print_summary(*done)
            if done[0].get("lost_ranks"):
                typer.echo(EXIT_BARRIER_NOTE.format(lost=done[0]["lost_ranks"]), err=True)
        code = 0
    except typer.Exit as stop:
        code = stop.exit_code
    except SystemExit as stop:  # as Python reads it: None is success, text a printed failure
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
        if not isinstance(stop.code, int | None):
            typer.echo(stop.code, err=True)
    except BaseException:  # noqa: BLE001 - printed as Python would, then the exit below
        traceback.print_exc()
    exit_without_teardown(code)  # never the interpreter's teardown (see its docstring)
