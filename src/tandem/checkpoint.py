"""Checkpoints: atomic, per-rank, consistent across ranks, and never silently ignored.

Layout in the run directory::

    checkpoints/step-00000040/rank0.pt, rank1.pt, ...
    checkpoints/LATEST            {"step": 40, "dir": "step-00000040", "config": "<hash>"}

Every rank writes its own file (its codec memory and data position differ) to a temporary name,
fsyncs it and renames it into place. After a barrier, rank 0 writes ``LATEST`` the same way, so
``LATEST`` only ever names a complete set. Older sets beyond ``keep`` are pruned.

Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code. A corrupt file, a
missing rank, or a checkpoint written by a different configuration raises
:class:`~tandem.errors.CheckpointError`; a resume never falls back to a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tandem.errors import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Callable

# Fields that do not change a run's trajectory: a resume may change them.
_FREE_FIELDS = {
    "name",
    "out",
    "progress",
    "tensorboard",
    "timeout_s",
    "steps",
    "epochs",
    "checkpoint_every",
    "resume",
    "target_accuracy",
    "eval_every",
    "master_addr",
}


def config_fingerprint(cfg_data: dict[str, Any]) -> str:
    """A hash of everything in the config that shapes the trajectory."""
    kept = {k: v for k, v in cfg_data.items() if k not in _FREE_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((3, tuple(state["python"]), state["python_pos"]))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and loads one rank's state; ``barrier`` makes a set complete before LATEST moves."""

    def __init__(
        self, run_dir: Path, rank: int, fingerprint: str, *, every: int = 0, keep: int = 2
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.fingerprint = fingerprint
        self.every = every
        self.keep = keep

    def due(self, step: int, total: int) -> bool:
        """Whether to save after ``step`` (0-based): every ``every`` steps and after the last
        one (so a resume with more steps continues from where the run ended)."""
        return self.every > 0 and ((step + 1) % self.every == 0 or step + 1 == total)

    def save(self, next_step: int, state: dict[str, Any], barrier: Any) -> None:
        """Write this rank's state, wait for every rank (``barrier()``), then move LATEST."""
        name = f"step-{next_step:08d}"
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {"step": next_step, "config": self.fingerprint, **state}, folder / f"rank{self.rank}.pt"
        )
        barrier()
        if self.rank == 0:
            _atomic_write_text(
                json.dumps({"step": next_step, "dir": name, "config": self.fingerprint}),
                self.root / "LATEST",
            )
            sets = sorted(p for p in self.root.glob("step-*") if p.is_dir())
            for old in sets[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def exists(self) -> bool:
        return (self.root / "LATEST").is_file()

    def load(self) -> dict[str, Any]:
        """This rank's state from the set LATEST names; CheckpointError if anything is off."""
        latest = self.root / "LATEST"
        if not latest.is_file():
            raise CheckpointError(
                f"no checkpoint in {self.root.parent}: run it with "
                "--checkpoint-every N to be able to resume"
            )
        try:
            meta = json.loads(latest.read_text())
            path = self.root / meta["dir"] / f"rank{self.rank}.pt"
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{latest} is corrupt ({err})") from None
        if meta.get("config") != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {path.parent} was written by a different configuration "
                f"(fingerprint {meta.get('config')} != {self.fingerprint}); resume with the run's "
                "own config.yaml, changing only steps, timeouts or output options"
            )
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path.parent} has no file for rank {self.rank}: "
                "was the number of workers changed?"
            )
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any unpickling failure means corrupt
            raise CheckpointError(
                f"checkpoint file {path} is corrupt or unreadable: {err}"
            ) from None
        if state.get("step") != meta["step"] or state.get("config") != self.fingerprint:
            raise CheckpointError(f"checkpoint file {path} does not match {latest}")
        return state


def check_resume(cfg: Any) -> None:
    """The check of ``--resume`` that the job runs once, before any process starts: the run
    directory holds a checkpoint written by this configuration. Raises CheckpointError naming the
    fields that changed (the workers check again when they load)."""
    if not cfg.resume:
        return
    run_dir = Path(cfg.run_dir())
    latest = run_dir / "checkpoints" / "LATEST"
    if not latest.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it holds no checkpoint "
                              "(run it with --checkpoint-every N)")
    try:
        saved = json.loads(latest.read_text())["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{latest} is corrupt ({err})") from None
    data = cfg.model_dump(mode="json")
    if saved == config_fingerprint(data):
        return
    changed = _changed_fields(run_dir / "config.yaml", saved, data)
    raise CheckpointError(
        f"cannot resume {run_dir}: its checkpoint was written by a different configuration"
        + (f" (changed: {changed})" if changed else "")
        + "; resume with the run's own config.yaml, changing only steps, timeouts or output "
        "options")


def _changed_fields(path: Path, fingerprint: str, now: dict[str, Any]) -> str:
    """``a.b: old -> new`` for the trajectory-shaping fields that differ from the run's own
    config.yaml, when that file is the one the checkpoint was written with (else empty)."""
    from tandem.config import load_config

    try:
        then = load_config(path=path).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - only used to word the error
        return ""
    if config_fingerprint(then) != fingerprint:
        return ""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if prefix or k not in _FREE_FIELDS:
                out.update(flat(v, f"{prefix}{k}."))
        return out

    a = {k.rstrip("."): v for k, v in flat(then).items()}
    b = {k.rstrip("."): v for k, v in flat(now).items()}
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class StrategyCheckpoints:
    """The save/resume pattern every checkpointing strategy shares.

    Build it in ``setup`` *after* the models (building a model reseeds torch's RNG), then:
    ``state = ckpt.resume()`` gives the saved dict (global RNG states already restored) or None
    on a fresh run; after each step ``if ckpt.due(step, total): ckpt.save(step + 1, state)``
    inside ``rec.evaluating()``. ``state`` is the strategy's own (tensors, numbers, strings,
    lists and dicts of them: ``weights_only`` loading refuses anything else); the RNG states are
    added here. ``barrier`` defaults to the world barrier: every rank must save at the same step.
    """

    def __init__(self, ctx: Any, *, barrier: Callable[[], Any] | None = None) -> None:
        cfg = ctx.cfg
        self.resuming = bool(cfg.resume)
        self.ckpt = Checkpointer(ctx.run_dir, ctx.rank,
                                 config_fingerprint(cfg.model_dump(mode="json")),
                                 every=cfg.checkpoint_every)
        self._barrier = barrier or (lambda: ctx.transport.barrier().wait())

    def resume(self) -> dict[str, Any] | None:
        """The saved state of this rank when resuming (CheckpointError if unusable), else None."""
        if not self.resuming:
            return None
        state = self.ckpt.load()
        set_rng_state(state["rng"])
        return state

    def due(self, step: int, total: int) -> bool:
        return self.ckpt.due(step, total)

    def save(self, next_step: int, state: dict[str, Any]) -> None:
        self.ckpt.save(next_step, {**state, "rng": rng_state()}, self._barrier)
