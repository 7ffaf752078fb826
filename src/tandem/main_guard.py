"""Refuse a launch from a script's top level that every worker would repeat.

The local launcher's workers come from multiprocessing's ``forkserver`` (or ``spawn``), which
imports the launching script again in each worker, as ``__mp_main__``, before running the worker.
A script that calls ``tandem.train`` outside ``if __name__ == "__main__":`` then launches again
from inside every worker; multiprocessing stops that with a RuntimeError in each child, which the
user sees as a long traceback per worker and then "worker 0 exited with code 1 without
reporting". :func:`check_main_guard` (the first thing :func:`tandem.job.run_job` does, under
``tandem.train``, ``compare`` and ``sweep``) finds the call's line in the script (the
``<module>`` frame of ``__main__`` on this thread's stack) and refuses, before anything is
written, when that line is not inside such a guard. A script run from stdin, ``-c`` or a
notebook has no file to re-import and is let through, as is any script whose source cannot be
read or parsed (the check never blocks a launch it cannot judge); the ``tandem`` command's own
script makes its call under the guard.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import FrameType

from tandem.errors import ConfigError


def check_main_guard() -> None:
    """Raise :class:`ConfigError` when Tandem's workers are launched from the top level of the
    ``__main__`` script, outside ``if __name__ == "__main__":`` (see the module docstring)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or not Path(path).is_file():
        return
    frame = _module_frame(main.__dict__)
    if frame is None:
        return
    try:
        tree = ast.parse(Path(path).read_text(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return
    line = frame.f_lineno
    if any(_guards(node, line) for node in ast.walk(tree)):
        return
    raise ConfigError(
        f"{path}, line {line}: this line starts Tandem's workers (tandem.train, compare, "
        "sweep) from the top level of the script, outside `if __name__ == \"__main__\":`. Each "
        "worker process imports the script again before it starts (multiprocessing's "
        "forkserver or spawn), so every worker would launch again. Put the call, or the code "
        "that leads to it, under `if __name__ == \"__main__\":`.")


def _module_frame(namespace: dict) -> FrameType | None:
    """The frame running the ``__main__`` module's own top-level code, if it is on this stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is namespace:
            return frame
        frame = frame.f_back
    return None


def _guards(node: ast.AST, line: int) -> bool:
    """Whether ``node`` is ``if __name__ == "__main__":`` and ``line`` is in its body."""
    if not isinstance(node, ast.If) or not _is_main_test(node.test) or not node.body:
        return False
    return node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno)


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1
