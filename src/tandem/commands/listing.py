"""``tandem codecs``, ``tandem strategies`` and ``tandem workloads``: what is registered.

Each entry shows its one-line summary and, for every option, the default, the allowed values
(bounds and choices, read from the options model, so they cannot drift from what is enforced)
and the option's ``description``. A plugin author documents an option by giving its pydantic
``Field`` a ``description=``; nothing else is needed for it to show here. ``--json`` prints the
same as a machine-readable list.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Annotated, Any

import typer

from tandem.commands.base import Opt, command

JSON = Annotated[bool, Opt("--json", help="machine-readable output")]


def _allowed(field: Any) -> str:
    """``"> 0, <= 1"`` or ``"layer | global"``: the bounds and choices a pydantic field enforces."""
    parts = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sym} {bound}")
    todo = [field.annotation]
    while todo:
        ann = todo.pop()
        if typing.get_origin(ann) is typing.Literal:
            parts.append(" | ".join(str(a) for a in typing.get_args(ann)))
        else:
            todo += [a for a in typing.get_args(ann) if a is not type(None)]
    return ", ".join(parts)


def option_rows(model: Any) -> dict[str, dict[str, Any]]:
    """Per option of a pydantic options model: default, allowed values, one-line help."""
    return {k: {"default": f.default if f.default_factory is None else f.default_factory(),
                "allowed": _allowed(f), "help": " ".join((f.description or "").split())}
            for k, f in model.model_fields.items()}


def _summary(obj: Any) -> str:
    doc = obj if isinstance(obj, str) else \
        (getattr(obj, "__doc__", None) or sys.modules[obj.__module__].__doc__ or "")
    doc = doc.strip().replace("``", "")
    return doc.splitlines()[0] if doc else ""


def _show(rows: list[dict[str, Any]], as_json: bool, head: Any) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        for line in head(r):
            typer.echo(line)
        for k, o in r["options"].items():
            allowed = f"  [{o['allowed']}]" if o["allowed"] else ""
            typer.echo(f"    {k}={o['default']!r}{allowed}  {o['help']}".rstrip())


@command("codecs", rank=60)
def codecs(as_json: JSON = False) -> None:
    """List the codecs with their options, defaults and allowed values."""
    from tandem.codecs import CODECS

    rows = [{"name": name, "transfer": cls.transfer, "summary": _summary(cls),
             "options": option_rows(cls.Options)} for name, cls in sorted(CODECS.items())]
    _show(rows, as_json, lambda r: [f"{r['name']:<10} [{r['transfer']}]  {r['summary']}"])


@command("strategies", rank=61)
def strategies(as_json: JSON = False) -> None:
    """List the strategies with the codecs they take and their options and defaults."""
    from tandem.strategies import STRATEGIES

    rows = [{"name": name, "summary": _summary(sys.modules[cls.__module__]),
             "codecs": _codec_support(cls), "options": option_rows(cls.Options)}
            for name, cls in sorted(STRATEGIES.items())]
    _show(rows, as_json, lambda r: [f"{r['name']:<14} {r['summary']}",
                                    f"    codecs: {r['codecs']}"])


@command("workloads", rank=62)
def workloads(as_json: JSON = False) -> None:
    """List the workloads (`--workload`) with their options (`--workload-opt` / YAML
    `workload.options`), defaults and allowed values."""
    from tandem.workloads import WORKLOADS

    rows = [{"name": name, "summary": _summary(spec.summary), "options": option_rows(spec.options)}
            for name, spec in sorted(WORKLOADS.items())]
    _show(rows, as_json, lambda r: [f"{r['name']:<12} {r['summary']}"])


def _codec_support(cls: Any) -> str:
    """Which codecs a strategy takes, for ``tandem strategies``."""
    from tandem.codecs import CODECS

    if cls.exact_exchange:
        return f"dense only ({cls.exact_exchange})"
    if cls.peer_codes:
        ok = ", ".join(sorted(n for n, c in CODECS.items() if c.self_contained))
        return f"self-contained ones ({ok}): each peer decodes its neighbours' codes alone"
    refused = _refused(cls.name, CODECS.names())
    if not refused:
        return "any"
    ok = [c for c in CODECS.names() if c not in refused]
    why = "; ".join(f"{c}: {r}" for c, r in refused.items())
    return f"{', '.join(ok)} (refused: {why})"


def _refused(strategy: str, codecs: list[str]) -> dict[str, str]:
    """The codecs the resolve step refuses for ``strategy`` with default options, and why (the
    strategy's own checks, e.g. a codec the parameter server cannot run as documented)."""
    from tandem.config import load_config
    from tandem.errors import ConfigError
    from tandem.resolve import resolve

    out = {}
    for codec in codecs:
        extra = {"strategy.options.models": [{}]} if strategy == "pipeline" else {}
        try:
            resolve(load_config(**{"strategy.name": strategy, "codec.name": codec}, **extra))
        except ConfigError as err:
            out[codec] = str(err).removeprefix("invalid configuration: ").split(";")[0][:90]
    return out
