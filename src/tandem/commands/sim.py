"""``tandem sim goco``: the single-process GOCO simulator (error against iterations over p and d).

Example (the paper-style study, ~1-2 minutes on 2 cores)::

    tandem sim goco --devices 1024 --p 0.1,0.3,0.5 --d 1,2,3 --steps 300 --out runs/sim-goco

writes ``goco.png`` (one panel per p, one curve per d), ``goco.json`` (curves, floors, config) and
prints the error-floor table (mean ``||x_i - x*||^2`` over the last 20% of the steps).

Every flag is checked before the first simulation starts (:meth:`tandem.sim.SimConfig.check`,
with the fields named by their flags): a bad value exits with status 2 and one line naming the
flag and the values it takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import OneLineErrors, command_group, fail
from tandem.errors import ConfigError, TandemError

sim_app = typer.Typer(no_args_is_help=True, help="Single-process simulators for large studies.")
Opt = typer.Option
STUDY, PROBLEM, OUT = "Study", "Problem and optimiser", "Output"

#: SimConfig fields whose flag is not ``--`` + the field with dashes
_FLAGS = {"workload_options.n": "--samples", "workload_options.dim": "--dim",
          "workload_options.noise": "--noise"}


def flag_of(field: str) -> str:
    """The ``tandem sim goco`` flag that sets a :class:`~tandem.sim.SimConfig` field."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _list(flag: str, text: str, kind: type) -> list:
    """``"0.1,0.3"`` -> ``[0.1, 0.3]``; anything else is a ConfigError naming ``flag``."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = kind(item)
            if kind is float and not math.isfinite(value):
                raise ValueError
        except ValueError:
            what = "an integer" if kind is int else "a finite number"
            raise ConfigError(f"{flag}: {item!r} is not {what}; give a comma-separated list, "
                              f"e.g. {'1,2,3' if kind is int else '0.1,0.3,0.5'}") from None
        out.append(value)
    return out


@sim_app.command("goco", cls=OneLineErrors)
def goco(
    devices: Annotated[int, Opt(help="number of simulated devices M (1 to 4096)", rich_help_panel=STUDY)] = 1024,
    p: Annotated[str, Opt(help="straggling probabilities in [0, 1), comma-separated", rich_help_panel=STUDY)] = "0.1,0.3,0.5",
    d: Annotated[str, Opt(help="redundancies (partitions per device), 1 to --devices, comma-separated", rich_help_panel=STUDY)] = "1,2,3",
    mode: Annotated[str, Opt(help="goco | dsgd | redundant | wait", rich_help_panel=STUDY)] = "goco",
    topology: Annotated[str, Opt(help="ring | torus | exponential | erdos_renyi | complete "
                                      "(a 1024-ring barely mixes: exponential by default)", rich_help_panel=STUDY)
                        ] = "exponential",
    gossip_rounds: Annotated[int, Opt(help="gossip rounds per step (1 to 1000)", rich_help_panel=STUDY)] = 1,
    allocation: Annotated[str, Opt(help="cyclic | fractional (d must divide --devices)", rich_help_panel=STUDY)] = "cyclic",
    mix_every: Annotated[int, Opt(help="mix on every N-th step only, local steps between (1 to 1000)", rich_help_panel=STUDY)] = 1,
    overlap: Annotated[bool, Opt("--overlap/--no-overlap", help="the gossip option: x_{t+1} = W x_t - lr e(x_t) (D-PSGD's order) instead of GOCO's W (x_t - lr e)", rich_help_panel=STUDY)] = False,
    seed: Annotated[int, Opt(help="seed for data, model and straggler draws (>= 0)", rich_help_panel=STUDY)] = 0,
    steps: Annotated[int, Opt(help="iterations (>= 1)", rich_help_panel=PROBLEM)] = 300,
    lr: Annotated[float, Opt(help="learning rate (> 0)", rich_help_panel=PROBLEM)] = 0.05,
    lr_decay: Annotated[float, Opt(help="lr_t = lr / (1 + lr_decay * t), >= 0", rich_help_panel=PROBLEM)] = 0.0,
    noise: Annotated[float, Opt(help="regression label noise, >= 0 (scales the error floor)", rich_help_panel=PROBLEM)] = 1.0,
    dim: Annotated[int, Opt(help="regression dimension (>= 1, at most the samples)", rich_help_panel=PROBLEM)] = 20,
    samples: Annotated[int, Opt(help="training samples, at least --devices (0 = max(2048, 16 M))", rich_help_panel=PROBLEM)] = 0,
    batch_size: Annotated[int, Opt(help="minibatch per partition; 0 = full partition", rich_help_panel=PROBLEM)] = 0,
    out: Annotated[Path, Opt(help="output folder", rich_help_panel=OUT)] = Path("runs/sim-goco"),
) -> None:
    """Simulate GOCO for every (p, d) pair; write goco.png and goco.json; print the floors."""
    from tandem import sim

    try:
        opts: dict = {"noise": noise, "dim": dim}
        if samples != 0:
            opts["n"] = samples
        if batch_size < 0:
            raise ConfigError(f"--batch-size: {batch_size} is not allowed; 0 (full partitions) "
                              "or a minibatch of at least 1 sample")
        base = sim.SimConfig(devices=devices, steps=steps, lr=lr, lr_decay=lr_decay, mode=mode,
                             topology=topology, gossip_rounds=gossip_rounds,
                             allocation=allocation, seed=seed, batch_size=batch_size or None,
                             overlap=overlap, mix_every=mix_every,
                             workload_options=opts)
        ps, ds = _list("--p", p, float), _list("--d", d, int)
        sim.study_configs(base, ps, ds, flag_of)  # every pair checked before the first runs
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out: {out} is a file; give a folder")
        results = sim.study(base, ps, ds)
    except TandemError as err:
        fail(err)
    try:
        png = sim.plot_study(results, out / "goco.png")
        js = sim.save_study(results, out / "goco.json")
    except OSError as err:
        fail(f"--out {out}: cannot write the results: {err}")
    rows = sim.floor_table(results)
    typer.echo("error floor: mean ||x_i - x*||^2 over the last 20% of steps")
    typer.echo(sim.format_table(rows))
    if any(not r.floor() <= r.opt_error[0] for r in results.values()):  # nan compares False
        typer.echo("note: the error grew in some runs (diverged): lower --lr or raise --lr-decay")
    typer.echo(f"wrote {png} and {js}")


command_group("sim", sim_app, rank=70)
