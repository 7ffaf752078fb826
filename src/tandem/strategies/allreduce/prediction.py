"""``delay=1, predict=true``: compute each gradient at the weights it will be applied to.

With ``delay=1`` the gradient computed on ``w[t]`` is applied one update later, to ``w[t+1]``
(:mod:`.delayed`). The update in between is the mean still in flight, so ``w[t+1]`` is not
known when step ``t`` starts; the last update is, and it is its best guess (linear weight
prediction, Kosson et al. 2021, "Pipelined Backpropagation at Scale", with the momentum's
velocity replaced by the last applied change so it holds for any optimizer):

    g[t] = grad L(w[t] + (w[t] - w[t-1]))

The worker moves its parameters by the last change, runs forward and backward, and copies the
parameters back bit for bit before anything else reads them: evaluation, checkpoints and the
saved model see ``w[t]``. The step's training loss is the one at the predicted weights.

Why: a stale gradient with heavy momentum feeds back one step late, and that loop can
oscillate. On mnist5k's CNN (``hidden=360``, 4 workers, SGD lr 0.05, momentum 0.9, 200 steps)
plain ``delay=1`` ended at chance (0.10-0.14) in 8 of 9 runs (three codecs, three seeds); see
``bench/delay.py`` for what prediction and Nesterov momentum change, codec by codec.

Cost: two copies of the parameters per step (the saved weights and the last change), a few
passes over them, and that memory. The last change is part of the checkpoint, so a resumed
run predicts as the uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightPrediction:
    """The last applied change of ``params`` and the shift of the next compute by it."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self._saved = [p.detach().clone() for p in params]
        #: ``w[t] - w[t-1]``, the last applied change (None before the first update)
        self.delta: list[torch.Tensor] | None = None
        self._shifted = False

    @torch.no_grad()
    def shift(self) -> None:
        """Before forward/backward: keep ``w[t]`` and move to ``w[t] + delta``."""
        torch._foreach_copy_(self._saved, self.params)
        if self.delta is not None:
            torch._foreach_add_(self.params, self.delta)
            self._shifted = True

    @torch.no_grad()
    def restore(self) -> None:
        """After backward: the parameters are ``w[t]`` again, exactly (copied back)."""
        if self._shifted:
            torch._foreach_copy_(self.params, self._saved)
            self._shifted = False

    @torch.no_grad()
    def applied(self) -> None:
        """After the optimizer step: ``delta = w[t+1] - w[t]``."""
        if self.delta is None:
            self.delta = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(self.delta, self.params)
        torch._foreach_sub_(self.delta, self._saved)

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else [d.clone() for d in self.delta]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else [d.clone() for d in delta]
