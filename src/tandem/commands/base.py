"""The command registry: a command of ``tandem`` is one module here with a decorator::

    from tandem.commands.base import command

    @command("hello", rank=90)
    def hello(name: str = "world") -> None:
        \"\"\"Say hello (the first docstring line is the command's help).\"\"\"

A typer sub-application (a group of commands, ``tandem sim goco``) registers with
:func:`command_group`. ``tandem.cli`` builds the application from :data:`COMMANDS`, in ``rank``
order (then by name). Commands import the library lazily, inside the function, so that
``tandem --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import typer

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
            app.command(name=self.name)(self.callback)


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


def fail(err: Exception) -> NoReturn:
    """Print a Tandem error as one red line and exit with status 2 (bad input)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


Opt = typer.Option
