"""``tandem codecs`` and ``tandem strategies``: what is registered, with options and defaults."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from tandem.commands.base import Opt, command


@command("codecs", rank=60)
def codecs(as_json: Annotated[bool, Opt("--json", help="machine-readable")] = False) -> None:
    """List the codecs with their options and defaults."""
    from tandem.codecs import CODECS

    rows = []
    for name, cls in sorted(CODECS.items()):
        opts = {k: {"default": f.default, "help": f.description or ""}
                for k, f in cls.Options.model_fields.items()}
        rows.append({"name": name, "transfer": cls.transfer, "options": opts,
                     "summary": (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        typer.echo(f"{r['name']:<10} [{r['transfer']}]  {r['summary']}")
        for k, o in r["options"].items():
            typer.echo(f"    {k}={o['default']!r}  {o['help']}")


@command("strategies", rank=61)
def strategies() -> None:
    """List the strategies with their options and defaults."""
    from tandem.strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<14} {doc}")
        typer.echo(f"    codecs: {_codec_support(cls)}")
        for k, f in cls.Options.model_fields.items():
            typer.echo(f"    {k}={f.default!r}  {f.description or ''}")


def _codec_support(cls: Any) -> str:
    """Which codecs a strategy takes, for ``tandem strategies``."""
    from tandem.codecs import CODECS

    if cls.exact_exchange:
        return f"dense only ({cls.exact_exchange})"
    if cls.peer_codes:
        ok = ", ".join(sorted(n for n, c in CODECS.items() if c.self_contained))
        return f"self-contained ones ({ok}): each peer decodes its neighbours' codes alone"
    return "any"
