"""``tandem sweep``: train K variants of one config as one pipelined job (strategy ``pipeline``).

Flags are those of ``tandem train``; the sweepable ones take comma lists and every list with
more than one value becomes an axis of the grid (``--paired`` pairs them instead)::

    tandem sweep --workload digits --workers 4 --steps 300 --lr 0.01,0.03,0.1,0.3
    tandem sweep --workload mnist5k --workload-opt width=1,2 --codec dense,fp16
    tandem sweep --codec topk,randomk --codec-opt ratio=0.01,0.1
    tandem sweep --variant '{lr: 0.1}' --variant '{lr: 0.05, codec: topk}'

Plugins follow ``tandem train``'s rule: a ``--codec`` other than the config's replaces it with its
options; ``--codec-opt`` sets options of the codec in force. With several codecs (an axis),
every ``--codec-opt`` goes into every variant, since each variant's codec starts from its own
defaults; the same holds for ``--workload`` and ``--workload-opt``.

Everything is checked before the job starts: the base flags (the one that breaks the config is
named), each list value on its own, then every variant, exiting 2 with one line naming the flag.

Writes one run record per variant under ``<run>/variants/``, the summary table
(``<run>/sweep.txt``) and the overlay plot (``<run>/sweep.png``). On several machines:
``--write-config job.yaml`` writes the job for ``torchrun ... -m tandem.cli worker --config
job.yaml``; afterwards ``tandem sweep --report <run dir>`` builds the table and the plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from tandem.commands.base import Flag, Opt, command, fail, load_flags
from tandem.errors import ConfigError, TandemError

SWEEP, RUN, DATA, NET, FAULTS, OUT = ("Swept (comma lists)", "Run", "Data", "Network", "Faults",
                                      "Output")


def _values(flag: str, text: str | None) -> list[Any]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]`` (each item read as a YAML scalar); an empty list is a
    ConfigError naming ``flag``."""
    if text is None:
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(yaml.safe_load(item))
        except yaml.YAMLError:
            out.append(item)
    if not out:
        raise ConfigError(f"{flag} {text!r}: give at least one value, e.g. {flag} 0.01,0.1")
    return out


def _option_lists(flag: str, pairs: list[str] | None, prefix: str
                  ) -> list[tuple[str, str, list[Any]]]:
    out = []
    for pair in pairs or []:
        key, sep, vals = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE[,VALUE...], e.g. hidden=64,128")
        out.append((f"{flag} {pair}", f"{prefix}.{key.strip()}", _values(f"{flag} {key}=", vals)))
    return out


def _variant(text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--variant {text!r} is not YAML: {' '.join(str(err).split())}") \
            from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--variant {text!r}: expected a mapping, "
                          "e.g. '{lr: 0.1, codec: fp16}'")
    return value


def plan_sweep(config: Path | None, lists: list[tuple[str, str, list[Any]]],
               scalars: list[Flag], variant_texts: list[str], *, paired: bool = False,
               bucket_mb: float = 0.0) -> tuple[Any, list[dict[str, Any]]]:
    """The base config and the variants of a sweep, every one checked (resolved) before
    anything starts; ``lists``: (flag as typed, dotted key, values) of each list flag given.
    Raises ConfigError naming the flag, the value or the variant at fault."""
    from tandem.resolve import load_config, resolve
    from tandem.sweep import expand_grid, label_of, sweep_config, variant_configs

    if not (math.isfinite(bucket_mb) and bucket_mb >= 0):
        raise ConfigError(f"--bucket-mb {bucket_mb}: give 0 (after backward) or a positive size")
    # a plugin that varies takes its options into every variant (each starts from its defaults)
    varied = {k.removesuffix(".name") for _, k, v in lists
              if k in ("codec.name", "workload.name") and len(v) > 1}
    coupled = {k for _, k, _ in lists if k.split(".")[0] in varied and ".options." in k}
    base_flags = scalars + [(label, {k: v[0]}) for label, k, v in lists
                            if len(v) == 1 and k not in coupled]
    base = load_flags(load_config, config, base_flags)
    data = base.model_dump(mode="json")
    axes = {k: v for _, k, v in lists if len(v) > 1 or k in coupled}
    flag_of = {k: label.split()[0] for label, k, _ in lists}
    for label, key, vals in lists:
        for v in vals if len(vals) > 1 and key not in coupled else []:
            try:
                load_config(data, **{key: v})
            except ConfigError as err:
                raise ConfigError(f"{label}: value {v!r}: {err}") from None
    grid = expand_grid(axes, paired=paired) if axes else []  # its error names --paired
    swept = "/".join(dict.fromkeys(flag_of[k] for k in axes))
    sources = [f"{swept} (variant {label_of(v, i)})" for i, v in enumerate(grid)]
    variants = grid + [_variant(t) for t in variant_texts]
    sources += [f"--variant {t!r}" for t in variant_texts]
    if not variants:
        given = ", ".join(label for label, _, _ in lists)
        raise ConfigError(f"nothing to sweep: {given or 'no list flag'} "
                          f"{'has' if len(lists) < 2 else 'have'} one value; give a flag two or "
                          "more values (e.g. --lr 0.01,0.1) or --variant")
    for source, v in zip(sources, variants, strict=True):
        try:
            for _, vcfg in variant_configs(sweep_config(base, [v], bucket_mb=bucket_mb)):
                resolve(vcfg)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return base, variants


@command("sweep", rank=30)
def sweep(
    config: Annotated[Path | None, Opt(help="YAML base config; flags override it", rich_help_panel=RUN)] = None,
    lr: Annotated[str | None, Opt(help="learning rate(s) > 0, e.g. 0.01,0.1", rich_help_panel=SWEEP)] = None,
    momentum: Annotated[str | None, Opt(help="SGD momentum value(s) in [0, 1)", rich_help_panel=SWEEP)] = None,
    weight_decay: Annotated[str | None, Opt(help="weight decay value(s) >= 0", rich_help_panel=SWEEP)] = None,
    batch_size: Annotated[str | None, Opt(help="per-worker minibatch size(s)", rich_help_panel=SWEEP)] = None,
    seed: Annotated[str | None, Opt(help="seed(s) >= 0: several make an ensemble", rich_help_panel=SWEEP)] = None,
    workload: Annotated[str | None, Opt(help="workload name(s) (`tandem workloads`); another than the config's drops its options", rich_help_panel=SWEEP)] = None,
    workload_opt: Annotated[list[str] | None, Opt(help="KEY=V1,V2 workload option(s), "
                                                         "e.g. hidden=64,256 (repeat)", rich_help_panel=SWEEP)] = None,
    codec: Annotated[str | None, Opt(help="codec name(s), e.g. dense,fp16 (`tandem codecs`); another than the config's drops its options", rich_help_panel=SWEEP)] = None,
    codec_opt: Annotated[list[str] | None, Opt(help="KEY=V1,V2 codec option(s) (repeat), for every codec swept", rich_help_panel=SWEEP)] = None,
    variant: Annotated[list[str] | None, Opt(help="an explicit variant as YAML, e.g. "
                                                     "'{lr: 0.1, codec: fp16}' (repeat)", rich_help_panel=SWEEP)] = None,
    paired: Annotated[bool, Opt("--paired", help="pair the lists (equal lengths) instead of their grid", rich_help_panel=SWEEP)] = False,
    bucket_mb: Annotated[float, Opt(help="0: exchange after backward; >0: MB per bucket "
                                         "launched during backward", rich_help_panel=RUN)] = 0.0,
    workers: Annotated[int | None, Opt(help="number of data-parallel workers (1 to 1024)", rich_help_panel=RUN)] = None,
    steps: Annotated[int | None, Opt(help="steps per worker (overrides --epochs)", rich_help_panel=RUN)] = None,
    epochs: Annotated[float | None, Opt(help="epochs over each worker's shard", rich_help_panel=RUN)] = None,
    timeout: Annotated[float | None, Opt(help="longest any wait may last, seconds", rich_help_panel=RUN)] = None,
    data_path: Annotated[Path | None, Opt(help="dataset folder (fashion)", rich_help_panel=DATA)] = None,
    partition: Annotated[str | None, Opt(help="iid | label | redundant", rich_help_panel=DATA)] = None,
    net: Annotated[str | None, Opt(help="emulated link BANDWIDTH[:LATENCY[:JITTER]], units required, e.g. 100mbit:1ms", rich_help_panel=NET)] = None,
    stragglers: Annotated[str | None, Opt(help="P:FACTOR or P:exp:MEAN_S", rich_help_panel=FAULTS)] = None,
    nan_policy: Annotated[str | None, Opt(help="skip | stop on a NaN/Inf gradient", rich_help_panel=FAULTS)] = None,
    target_accuracy: Annotated[float | None, Opt(help="report time to this accuracy, in (0, 1]", rich_help_panel=OUT)] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (0 = auto)", rich_help_panel=OUT)] = None,
    out: Annotated[Path | None, Opt(help="run directory (default runs/<name>)", rich_help_panel=OUT)] = None,
    name: Annotated[str | None, Opt(help="run name", rich_help_panel=OUT)] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="bar", rich_help_panel=OUT)] = None,
    write_config: Annotated[Path | None, Opt(help="write the job's YAML (for torchrun) and "
                                                  "exit without training", rich_help_panel=OUT)] = None,
    report: Annotated[Path | None, Opt(help="only rebuild the table and plot of a finished "
                                            "sweep in this run directory", rich_help_panel=OUT)] = None,
) -> None:
    """Train several variants of one config as ONE pipelined job; one record per variant."""
    from tandem.sweep import run_sweep, summarize_sweep, sweep_config

    if report is not None:
        try:
            table, _ = summarize_sweep(report)
        except (TandemError, OSError) as err:
            fail(f"--report {report}: {err}")
        typer.echo(table)
        typer.echo(f"overlay plot: {report / 'sweep.png'}")
        return
    try:
        lists = [(f"--{flag} {text}", key, _values(f"--{flag}", text)) for flag, key, text in (
            ("lr", "lr", lr), ("momentum", "momentum", momentum),
            ("weight-decay", "weight_decay", weight_decay), ("batch-size", "batch_size", batch_size),
            ("seed", "seed", seed), ("workload", "workload.name", workload),
            ("codec", "codec.name", codec)) if text is not None]
        lists += _option_lists("--workload-opt", workload_opt, "workload.options")
        lists += _option_lists("--codec-opt", codec_opt, "codec.options")
        scalars: list[Flag] = [(f"--{flag} {value}", {key: value}) for flag, key, value in (
            ("workers", "workers", workers), ("steps", "steps", steps),
            ("epochs", "epochs", epochs), ("timeout", "timeout_s", timeout),
            ("data-path", "workload.data_path", str(data_path) if data_path else None),
            ("partition", "workload.partition", partition), ("net", "net", net),
            ("stragglers", "stragglers", stragglers), ("nan-policy", "nan_policy", nan_policy),
            ("target-accuracy", "target_accuracy", target_accuracy),
            ("eval-every", "eval_every", eval_every), ("out", "out", str(out) if out else None),
            ("name", "name", name), ("progress", "progress", progress)) if value is not None]
        base, variants = plan_sweep(config, lists, scalars, variant or [], paired=paired,
                                    bucket_mb=bucket_mb)
        if write_config is not None:
            try:
                write_config.write_text(sweep_config(base, variants, bucket_mb=bucket_mb).to_yaml())
            except OSError as err:
                raise ConfigError(f"--write-config {write_config}: {err}") from None
            typer.echo(f"wrote {write_config}: torchrun ... -m tandem.cli worker --config "
                       f"{write_config}, then tandem sweep --report <its run directory>")
            return
        result = run_sweep(base, variants, bucket_mb=bucket_mb)
    except TandemError as err:
        fail(err)
    run_dir = result["run_dir"]
    typer.echo(result["table"])
    typer.echo(f"job record: {run_dir}")
    typer.echo(f"variant records: {run_dir / 'variants'}")
    typer.echo(f"overlay plot: {run_dir / 'sweep.png'}")
