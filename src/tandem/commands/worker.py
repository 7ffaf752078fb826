"""``tandem worker``: one worker process under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from tandem.commands.base import Opt, command, fail
from tandem.errors import TandemError


@command("worker", rank=20)
def worker(config: Annotated[Path, Opt(help="the run's YAML config")]) -> None:
    """One worker process under torchrun: `torchrun --nproc_per_node=4 -m tandem.cli worker --config run.yaml`. Global rank 0 shows the progress bar and prints the summary at the end, as `tandem train` does."""
    from tandem.commands.train import print_summary
    from tandem.worker import torchrun_main

    try:
        done = torchrun_main(str(config))
    except TandemError as err:
        fail(err)
    if done is not None:
        print_summary(*done)
