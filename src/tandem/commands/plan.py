"""``tandem plan``: predict 2 to 1,024 workers before renting them.

    tandem plan --workload mnist5k --workers 2,8,64,1024 --net 1gbit:50us
    tandem plan --workload resnet18 --compute-s 0.05 --net-inter 10gbit:20us --per-node 8
    tandem plan --workload textlm --net 1gbit:50us --stragglers 0.05:3 --strategies allreduce,gossip

Measures one worker's compute here (or takes ``--compute-s``), records every codec's exact
messages from its real exchange, and predicts each strategy x codec at each N: step time, bytes
per worker per step and the compute / communication / idle split. Prints the table ranked at
the largest N (``--rank-at``), a paragraph saying what it would pick and why, and writes
``plan.png`` (step time against N, log-log) and ``plan.json`` into ``--out``. The model and
its assumptions: ``tandem.plan`` and docs/scaling.md.

Every flag is checked before anything is measured: a bad value exits with status 2 and one
line naming the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tandem.commands.base import Opt, command, fail
from tandem.errors import ConfigError, TandemError

WHAT, NET, MODEL, OUT = "Workload and compute", "Network", "Strategy options", "Output"


def _ints(flag: str, text: str) -> list[int]:
    """``"2,8,64"`` -> ``[2, 8, 64]``; anything else is a ConfigError naming ``flag``."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: {item!r} is not an integer; give a "
                              "comma-separated list, e.g. 2,8,64,1024") from None
        if value < 1:
            raise ConfigError(f"{flag} {text!r}: {value} workers; every count must be >= 1")
        out.append(value)
    return out


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _codec_options(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["topk.ratio=0.001"]`` -> ``{"topk": {"ratio": 0.001}}``."""
    from tandem.config import parse_options

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        key = pair.split("=", 1)[0]
        if "." not in key or "=" not in pair:
            raise ConfigError(f"--codec-opt {pair!r}: expected CODEC.KEY=VALUE, e.g. "
                              "topk.ratio=0.001")
        codec, _, opt = key.partition(".")
        (k, v), = parse_options([f"{opt}={pair.split('=', 1)[1]}"]).items()
        out.setdefault(codec.strip(), {})[k] = v
    return out


def _check_codecs(names: list[str] | None, options: dict[str, dict[str, Any]]) -> None:
    from tandem.codecs.base import CODECS

    for name in (names or []) + list(options):
        if name not in CODECS:
            raise ConfigError(f"--codecs / --codec-opt: unknown codec {name!r}; choose from "
                              f"{CODECS.names()}")
    for name, opts in options.items():
        try:
            CODECS[name].Options.model_validate(opts)
        except ValueError as err:
            raise ConfigError(f"--codec-opt {name}: {' '.join(str(err).split())[:200]}") \
                from None


@command("plan", rank=35)
def plan(
    workload: Annotated[str, Opt(help="a registered workload or package.module:function", rich_help_panel=WHAT)] = "mnist5k",
    workload_opt: Annotated[list[str] | None, Opt("--workload-opt", help="workload option KEY=VALUE (repeat)", rich_help_panel=WHAT)] = None,
    workers: Annotated[str, Opt(help="worker counts N, comma-separated", rich_help_panel=WHAT)] = "2,4,8,16,32,64,128,256,512,1024",
    compute_s: Annotated[float | None, Opt("--compute-s", help="seconds of forward+backward per worker step on the target machine (default: measured here, one thread)", rich_help_panel=WHAT)] = None,
    batch_size: Annotated[int | None, Opt(help="per-worker batch (default the workload's, else 32)", rich_help_panel=WHAT)] = None,
    stragglers: Annotated[str | None, Opt(help="P:FACTOR or P:exp:MEAN_S, per worker per step", rich_help_panel=WHAT)] = None,
    jitter_ms: Annotated[float, Opt("--jitter-ms", help="mean of exponential noise on every step's compute", rich_help_panel=WHAT)] = 0.0,
    net: Annotated[str | None, Opt(help="BANDWIDTH:LATENCY of each process's link (one tier; default 1gbit:50us), or inside a node with --net-inter", rich_help_panel=NET)] = None,
    net_inter: Annotated[str | None, Opt("--net-inter", help="BANDWIDTH:LATENCY of a node's NIC (two tiers)", rich_help_panel=NET)] = None,
    per_node: Annotated[int, Opt("--per-node", help="processes per node (with --net-inter)", rich_help_panel=NET)] = 1,
    backend: Annotated[str, Opt(help="collective algorithms: nccl | gloo | tandem (the emulator's)", rich_help_panel=NET)] = "nccl",
    overhead_us: Annotated[float, Opt("--overhead-us", help="software cost per message hop", rich_help_panel=NET)] = 0.0,
    strategies: Annotated[str | None, Opt(help="strategies or methods to plan (default all), comma-separated", rich_help_panel=MODEL)] = None,
    codecs: Annotated[str | None, Opt(help="codecs to plan (default all), comma-separated", rich_help_panel=MODEL)] = None,
    codec_opt: Annotated[list[str] | None, Opt("--codec-opt", help="CODEC.KEY=VALUE, e.g. topk.ratio=0.001 (repeat)", rich_help_panel=MODEL)] = None,
    servers: Annotated[int, Opt(help="param_server: server processes", rich_help_panel=MODEL)] = 1,
    cap: Annotated[int | None, Opt(help="param_server candidate: steps between merges (default auto)", rich_help_panel=MODEL)] = None,
    topology: Annotated[str, Opt(help="gossip: ring | torus | exponential | complete", rich_help_panel=MODEL)] = "ring",
    gossip_rounds: Annotated[int, Opt(help="gossip: mixing rounds per step", rich_help_panel=MODEL)] = 1,
    deadline_s: Annotated[float | None, Opt("--deadline-s", help="GOCO: a real deadline per step, seconds after it began", rich_help_panel=MODEL)] = None,
    deadline_factor: Annotated[float, Opt("--deadline-factor", help="GOCO without --deadline-s: a straggler's step ends at this multiple of its normal compute", rich_help_panel=MODEL)] = 1.5,
    models: Annotated[int, Opt(help="pipeline: models trained together (K)", rich_help_panel=MODEL)] = 2,
    period_s: Annotated[float, Opt("--period-s", help="bsp_shared: superstep period", rich_help_panel=MODEL)] = 0.05,
    coded_s: Annotated[int, Opt("--coded-s", help="coded_ps: stragglers tolerated", rich_help_panel=MODEL)] = 1,
    rank_at: Annotated[int | None, Opt("--rank-at", help="N the table is ranked at (default the largest)", rich_help_panel=OUT)] = None,
    out: Annotated[Path, Opt(help="folder for plan.png and plan.json", rich_help_panel=OUT)] = Path("runs/plan"),
    seed: Annotated[int, Opt(help="seed of the model and batches", rich_help_panel=OUT)] = 0,
) -> None:
    """Predict step time, bytes and compute/comm/idle of every strategy x codec at N workers."""
    from tandem.config import parse_options
    from tandem.plan import PlanOptions
    from tandem.plan import plan as run_plan

    try:
        ns = _ints("--workers", workers)
        codec_options = _codec_options(codec_opt)
        _check_codecs(_names(codecs), codec_options)
        for flag, value, ok in (("--per-node", per_node, per_node >= 1),
                                ("--servers", servers, servers >= 1),
                                ("--cap", cap, cap is None or cap >= 1),
                                ("--gossip-rounds", gossip_rounds, gossip_rounds >= 1),
                                ("--models", models, models >= 1),
                                ("--period-s", period_s, period_s > 0),
                                ("--coded-s", coded_s, coded_s >= 0),
                                ("--jitter-ms", jitter_ms, jitter_ms >= 0),
                                ("--overhead-us", overhead_us, overhead_us >= 0),
                                ("--deadline-s", deadline_s, deadline_s is None or
                                 deadline_s > 0),
                                ("--deadline-factor", deadline_factor, deadline_factor >= 1)):
            if not ok:
                raise ConfigError(f"{flag} {value}: out of range (see tandem plan --help)")
        if topology not in ("ring", "torus", "exponential", "complete"):
            raise ConfigError(f"--topology {topology!r}: choose ring, torus, exponential or "
                              "complete")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out: {out} is a file; give a folder")
        opts = PlanOptions(servers=servers, cap=cap, topology=topology,
                           gossip_rounds=gossip_rounds, deadline_s=deadline_s,
                           deadline_factor=deadline_factor, models=models,
                           period_s=period_s, coded_s=coded_s)
        result = run_plan(workload, ns, net=net, net_inter=net_inter, per_node=per_node,
                          backend=backend, overhead_s=overhead_us * 1e-6,
                          stragglers=stragglers, jitter_s=jitter_ms * 1e-3,
                          compute_s=compute_s, batch_size=batch_size,
                          workload_options=parse_options(workload_opt),
                          codecs=_names(codecs), codec_options=codec_options,
                          methods=_names(strategies), options=opts, rank_at=rank_at, seed=seed)
    except (TandemError, ValueError) as err:
        fail(err)
    typer.echo(f"{result.profile.workload}: {result.profile.params:,} parameters, batch "
               f"{result.profile.batch_size}; {result.notes[0]}")
    typer.echo(result.table())
    for note in result.notes[1:]:  # a codec costed stage by stage (LGC)
        typer.echo(f"note: {note}")
    typer.echo("")
    typer.echo(result.recommendation())
    try:
        png = result.plot(out / "plan.png")
        js = result.save(out / "plan.json")
    except OSError as err:
        fail(f"--out {out}: cannot write the results: {err}")
    typer.echo(f"wrote {png} and {js}")
