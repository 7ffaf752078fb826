"""``tandem compare``: from "my model" to "what to use" in one command.

    tandem compare --workload mypackage.jobs:make_job --workers 4 --net 100mbit:1ms \\
        --steps 300 --target-accuracy 0.9 --out runs/compare

Picks the configurations most worth trying (``tandem plan``'s fastest at that worker count plus
the ``allreduce`` + ``dense`` baseline), trains each for real, and prints the comparison table;
``runs/compare/report.html`` is the page to share (see :mod:`tandem.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail, load_flags, option_flags
from tandem.errors import TandemError


@command("compare", rank=36)
def compare_cmd(
    workload: Annotated[str | None, Opt(help="a registered workload or package.module:function")] = None,
    workload_opt: Annotated[list[str] | None, Opt(help="workload option KEY=VALUE (repeat)")] = None,
    config: Annotated[Path | None, Opt(help="YAML config of the job; flags override it")] = None,
    workers: Annotated[int | None, Opt(help="data-parallel workers")] = None,
    steps: Annotated[int | None, Opt(help="steps per worker of every candidate")] = None,
    net: Annotated[str | None, Opt(help="your network per process, e.g. 100mbit:1ms (emulated)")] = None,
    stragglers: Annotated[str | None, Opt(help="P:FACTOR or P:exp:MEAN_S")] = None,
    target_accuracy: Annotated[float | None, Opt(help="time- and bytes-to-target to this accuracy")] = None,
    lr: Annotated[float | None, Opt(help="learning rate")] = None,
    batch_size: Annotated[int | None, Opt(help="per-worker minibatch size")] = None,
    candidates: Annotated[int, Opt(help="how many configurations besides the baseline")] = 3,
    out: Annotated[Path, Opt(help="folder for the runs and the report")] = Path("runs/compare"),
) -> None:
    """Try the configurations most worth trying on your workload and network, then report."""
    from tandem.compare import compare
    from tandem.resolve import load_config

    def flag(text: str, value: object, key: str) -> tuple[str, dict]:
        return (f"--{text} {value}", {key: value})

    try:
        if candidates < 1:
            raise TandemError(f"--candidates {candidates}: give at least 1")
        flags = [flag("workload", workload, "workload.name"),
                 *option_flags("--workload-opt", workload_opt, "workload.options"),
                 flag("workers", workers, "workers"), flag("steps", steps, "steps"),
                 flag("net", net, "net"), flag("stragglers", stragglers, "stragglers"),
                 flag("target-accuracy", target_accuracy, "target_accuracy"),
                 flag("lr", lr, "lr"), flag("batch-size", batch_size, "batch_size")]
        cfg = load_flags(load_config, config, flags)
        data = cfg.model_dump(mode="json", exclude_unset=False)
        data["progress"] = False
        result = compare(data, out=out, k=candidates)
    except TandemError as err:
        fail(err)
        return
    typer.echo("tried: " + ", ".join(f"{m}/{c}" for m, c in result["pairs"]))
    for label, why in result["failed"].items():
        typer.echo(f"failed: {label}: {why}")
    typer.echo(result["table"])
    typer.echo(f"page: {result['html']}")
