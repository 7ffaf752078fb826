"""``tandem sim goco``: the single-process GOCO simulator (error against iterations over p and d).

Example (the paper-style study, ~1-2 minutes on 2 cores)::

    tandem sim goco --devices 1024 --p 0.1,0.3,0.5 --d 1,2,3 --steps 300 --out runs/sim-goco

writes ``goco.png`` (one panel per p, one curve per d), ``goco.json`` (curves, floors, config) and
prints the error-floor table (mean ``||x_i - x*||^2`` over the last 20% of the steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import command_group
from tandem.errors import TandemError

sim_app = typer.Typer(no_args_is_help=True, help="Single-process simulators for large studies.")
Opt = typer.Option


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


@sim_app.command("goco")
def goco(
    devices: Annotated[int, Opt(help="number of simulated devices M")] = 1024,
    p: Annotated[str, Opt(help="straggling probabilities, comma-separated")] = "0.1,0.3,0.5",
    d: Annotated[str, Opt(help="redundancies (partitions per device), comma-separated")] = "1,2,3",
    steps: Annotated[int, Opt(help="iterations")] = 300,
    lr: Annotated[float, Opt(help="learning rate")] = 0.05,
    lr_decay: Annotated[float, Opt(help="lr_t = lr / (1 + lr_decay * t)")] = 0.0,
    mode: Annotated[str, Opt(help="goco | dsgd | redundant | wait")] = "goco",
    topology: Annotated[str, Opt(help="ring | torus | exponential | erdos_renyi | complete "
                                      "(a 1024-ring barely mixes: exponential by default)")
                        ] = "exponential",
    gossip_rounds: Annotated[int, Opt(help="gossip rounds per step")] = 1,
    allocation: Annotated[str, Opt(help="cyclic | fractional")] = "cyclic",
    noise: Annotated[float, Opt(help="regression label noise (scales the error floor)")] = 1.0,
    dim: Annotated[int, Opt(help="regression dimension")] = 20,
    samples: Annotated[int, Opt(help="training samples (default max(2048, 16 M))")] = 0,
    batch_size: Annotated[int, Opt(help="minibatch per partition; 0 = full partition")] = 0,
    seed: Annotated[int, Opt(help="seed for data, model and straggler draws")] = 0,
    out: Annotated[Path, Opt(help="output folder")] = Path("runs/sim-goco"),
) -> None:
    """Simulate GOCO for every (p, d) pair; write goco.png and goco.json; print the floors."""
    from tandem.sim import SimConfig, floor_table, format_table, plot_study, save_study, study

    try:
        opts = {"noise": noise, "dim": dim}
        if samples:
            opts["n"] = samples
        base = SimConfig(devices=devices, steps=steps, lr=lr, lr_decay=lr_decay, mode=mode,
                         topology=topology, gossip_rounds=gossip_rounds, allocation=allocation,
                         seed=seed, batch_size=batch_size or None, workload_options=opts)
        results = study(base, _floats(p), _ints(d))
    except TandemError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    png = plot_study(results, out / "goco.png")
    js = save_study(results, out / "goco.json")
    typer.echo("error floor: mean ||x_i - x*||^2 over the last 20% of steps")
    typer.echo(format_table(floor_table(results)))
    typer.echo(f"wrote {png} and {js}")


command_group("sim", sim_app, rank=70)
