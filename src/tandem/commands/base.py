"""The command registry: a command of ``tandem`` is one module here with a decorator::

    from tandem.commands.base import command

    @command("hello", rank=90)
    def hello(name: str = "world") -> None:
        \"\"\"Say hello (the first docstring line is the command's help).\"\"\"

A typer sub-application (a group of commands, ``tandem sim goco``) registers with
:func:`command_group`. ``tandem.cli`` builds the application from :data:`COMMANDS`, in ``rank``
order (then by name). Commands import the library lazily, inside the function, so that
``tandem --help`` stays fast.

Bad input is refused before anything starts, with exit status 2 and ONE red line that names the
flag: a wrong type or an unknown flag (:class:`OneLineErrors`, every registered command's class),
a value the config refuses (:func:`load_flags` names the flag that broke it), a command's own
checks (:func:`fail`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import typer
from typer.core import TyperCommand

try:  # typer >= 0.24 vendors its own click as typer._click; older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError  # type: ignore[assignment]

from tandem.errors import ConfigError
from tandem.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Command:
    """A registered command: a typer callback or a typer sub-application."""

    name: str
    callback: Callable[..., Any] | None = None
    group: typer.Typer | None = None
    rank: int = 50

    def attach(self, app: typer.Typer) -> None:
        if self.group is not None:
            app.add_typer(self.group, name=self.name)
        else:
            app.command(name=self.name, cls=OneLineErrors)(self.callback)


class OneLineErrors(TyperCommand):
    """A typer command whose usage errors (a value of the wrong type or out of range, an unknown
    or missing flag) print as one red line naming the flag, exit 2: the same shape as every
    other refusal, instead of click's boxed usage panel. Pass it as ``cls=`` to a sub-app's
    ``@app.command`` (registered commands get it already)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as err:
            text = " ".join(err.format_message().split())
            typer.secho(f"error: {text} (`{ctx.command_path} --help` lists the flags)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


#: every ``tandem`` command, by name (discovered under ``tandem.commands``)
COMMANDS: Registry[Command] = Registry("command", "tandem.commands")


def command(name: str, rank: int = 50) -> Callable[[F], F]:
    """Decorator: register a typer callback as ``tandem NAME``."""

    def add(fn: F) -> F:
        COMMANDS.register(Command(name, callback=fn, rank=rank), name=name)
        return fn

    return add


def command_group(name: str, group: typer.Typer, rank: int = 50) -> typer.Typer:
    """Register a typer sub-application as ``tandem NAME ...``."""
    COMMANDS.register(Command(name, group=group, rank=rank), name=name)
    return group


def fail(err: Exception | str) -> NoReturn:
    """Print a Tandem error as one red line and exit with status 2 (bad input)."""
    typer.secho(f"error: {' '.join(str(err).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


#: one flag as the user typed it and the config overrides it makes, e.g.
#: ``("--codec-opt ratio=0.1", {"codec.options.ratio": 0.1})``
Flag = tuple[str, dict[str, Any]]


def load_flags(loader: Callable[..., Any], path: Any, flags: Sequence[Flag]) -> Any:
    """``loader(path=path, **overrides of every flag)``; when that raises a ConfigError, find the
    flag that broke it and name it first: ``--lr abc: invalid configuration: lr: ...``.

    The blame search (the file alone, then one flag more at a time, in the given order) runs
    only on failure, so a valid command line pays for one load."""
    given = [(label, {k: v for k, v in over.items() if v is not None}) for label, over in flags]
    merged = {k: v for _, over in given for k, v in over.items()}
    try:
        return loader(path=path, **merged)
    except ConfigError as err:
        first = err
    so_far: dict[str, Any] = {}
    for label, over in [(f"--config {path}", {})] + given:
        so_far.update(over)
        try:
            loader(path=path, **so_far)
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from None
    raise first


def option_flags(flag: str, pairs: list[str] | None, prefix: str) -> list[Flag]:
    """``--codec-opt ratio=0.1`` (repeatable) -> one :data:`Flag` per pair, each value read as a
    YAML scalar; a pair without ``=`` is a ConfigError naming the flag."""
    from tandem.config import parse_options

    out: list[Flag] = []
    for pair in pairs or []:
        try:
            (key, value), = parse_options([pair]).items()
        except ConfigError as err:
            raise ConfigError(f"{flag} {pair!r}: {err}") from None
        if not key:
            raise ConfigError(f"{flag} {pair!r}: the KEY before '=' is empty")
        out.append((f"{flag} {pair}", {f"{prefix}.{key}": value}))
    return out


Opt = typer.Option
