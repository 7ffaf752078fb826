"""A parameter server's half of the checkpoint barrier (see :mod:`.param_server`): save once
every live worker's checkpoint mark has arrived (so every push before it has been applied and
answered), load on ``--resume``. Mixed into :class:`~.server.PSServer`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.transport.store_barrier import CheckpointAbandoned

if TYPE_CHECKING:
    from tandem.strategies.param_server.pull import PullSender


class ServerCheckpoints:
    """State a server saves and restores; the attributes are :class:`~.server.PSServer`'s."""

    ctx: Any
    params: list[torch.nn.Parameter]
    opt: Any
    sched: Any
    codecs: dict[int, Any]
    ranks: list[int]
    clock: dict[int, int]
    pull: PullSender
    lgc: Any
    active: set[int]
    lost: dict[int, str]
    marked: dict[int, int]
    ckpt: Any
    saves: int
    _tag: str

    # ---- checkpoints ----------------------------------------------------------------------------
    _SAVED = ("version", "clock", "staleness", "local_steps", "max_gap", "deferred_count",
              "updates_recorded")

    def _load(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state["params"], strict=True):
                p.copy_(v)
        if self.opt is not None:  # None under local_step=optimizer: the workers step
            self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and "scheduler" in state:
            self.sched.load_state_dict(state["scheduler"])
        for w, cs in zip(self.ranks, state["codecs"], strict=True):
            self.codecs[w].load_state_dict(cs)
        server = state["server"]
        for key in self._SAVED:
            setattr(self, key, server[key])
        self.clock = {w: int(c) for w, c in zip(self.ranks, server["clock"], strict=True)}
        self.pull.load_state_dict(state.get("pull", {}))
        if self.lgc is not None:
            self.lgc.load_state_dict(state["lgc"])

    def _checkpoint(self) -> None:
        """Save once every live worker has stopped at the checkpoint (its mark arrived)."""
        if not self.active or not self.active <= self.marked.keys():
            return
        next_step = max(self.marked[w] for w in self.active)  # the same for all: the workers'
        self._tag = str(next_step)
        state = {"params": [p.detach().clone() for p in self.params],
                 **({"optimizer": self.opt.state_dict()} if self.opt is not None else {}),
                 **({"scheduler": self.sched.state_dict()} if self.sched is not None else {}),
                 "codecs": [self.codecs[w].state_dict() for w in self.ranks],
                 "server": {**{k: getattr(self, k) for k in self._SAVED},
                            "clock": [self.clock[w] for w in self.ranks]},
                 "pull": self.pull.state_dict(),
                 **({"lgc": self.lgc.state_dict()} if self.lgc is not None else {})}
        self.marked.clear()
        with self.ctx.recorder.evaluating():
            try:
                self.ckpt.save(next_step, state)
                self.saves += 1
            except CheckpointAbandoned as err:
                self.ctx.recorder.info(checkpoint_abandoned=next_step, reason=str(err)[:300])

    def _mark(self, w: int, step: int, expected: dict[int, float]) -> None:
        """Worker ``w`` stopped for the checkpoint after ``step`` steps; save once all have."""
        if w in self.lost:
            return
        self.marked[w] = step
        expected.pop(w, None)
        self._checkpoint()
        if not self.marked:  # saved (or abandoned): every worker pushes next
            now = time.monotonic()
            for j in self.active:
                expected[j] = now

