"""powersgd: rank-r approximation of every weight matrix by one step of power iteration, with
warm start and error feedback (Vogels, Karimireddy & Jaggi, NeurIPS 2019).

Each layer of shape (n, ...) is viewed as an ``n x m`` matrix ``M`` (error-corrected gradient).
With the previous step's ``Q`` (m x r; random at step 0, the same on every worker):

1. ``P = M Q``, all-reduced (mean) together with the layers sent dense (1-D tensors and matrices
   too small to gain);
2. ``P`` is orthonormalised (QR) -- identically on every worker;
3. ``Q = M^T P``, all-reduced (mean); the decoded mean is ``P Q^T``.

Worker i's share of that mean is ``P Q_i^T`` (linear), which is what its error feedback subtracts.
The result is exact whenever the workers' mean matrix has rank <= r.

When to use: large dense layers (convolutions, transformers) on slow links; the codes are summed by
all-reduce, so per-worker bandwidth does not grow with N. Tuning: ``rank`` 1-4 for convnets
(the paper uses 2 for ResNet-18), higher for transformers; keep ``warm_start`` (it turns the single
power step per iteration into a power method across iterations) and ``error_feedback`` on.

Bytes per worker per step: two all-reduces carrying ``4 * (sum r*n + dense)`` and
``4 * sum r*m`` bytes.

Dense start (``dense_steps``, default 0): the first ``dense_steps`` steps send the whole gradient
(one all-reduce, 4 bytes per parameter) and keep no residual; compression starts after them. This
is torch's ``powerSGD_hook`` with ``start_powerSGD_iter`` (torch's default is 1000): it lets the
first, largest and fastest-changing gradients pass exactly, which can matter to accuracy on a
short run, at the dense cost for those steps. Leave it at 0 unless the first steps of your run
train worse than with the dense codec, or to compare with torch's hook step for step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, group_rank, register, step_generator
from tandem.codecs.memory import ErrorFeedback
from tandem.codecs.topk import numel
from tandem.flat import flatten, unflatten

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


class PowerSGDOptions(CodecOptions):
    rank: int = Field(4, ge=1, description="rank r of the approximation")
    warm_start: bool = Field(True, description="start each power step from the last mean Q")
    error_feedback: bool = Field(True, description="accumulate the approximation error")
    dense_steps: int = Field(0, ge=0, description="first steps sent whole, uncompressed "
                             "(torch's start_powerSGD_iter)")


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p, mode="reduced").Q


@register
class PowerSGDCodec(Codec):
    """powersgd: rank-r P and Q factors of every weight matrix, all-reduced in two rounds."""

    name = "powersgd"
    transfer = "sum"
    error_feedback = True
    self_contained = False  # P and Q need the group's all-reduces
    Options = PowerSGDOptions

    def __init__(self, options: Any = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.qs: list[torch.Tensor] | None = None

    def new_memory(self) -> ErrorFeedback:
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=o.error_feedback)

    # ---- plan -------------------------------------------------------------------------------
    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(n, m) when the layer is worth compressing, else None (sent dense)."""
        if len(shape) < 2:
            return None
        n = shape[0]
        m = numel(shape) // max(n, 1)
        r = self.opts.rank
        return (n, m) if r * (n + m) < n * m else None

    def _start_qs(self, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        if self.qs is not None and self.opts.warm_start:
            return self.qs
        qs = []
        for i, s in enumerate(shapes):
            nm = self.matrix_shape(s)
            if nm is not None:
                key = 0 if self.opts.warm_start else self.step
                gen = step_generator(self.seed, i, key, 0x505753)
                qs.append(torch.randn(nm[1], self.opts.rank, generator=gen))
        return qs

    def _split(self, corrected: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor],
                                                             list[int]]:
        comp, mats, dense = [], [], []
        for i, c in enumerate(corrected):
            nm = self.matrix_shape(tuple(c.shape))
            if nm is None:
                dense.append(i)
            else:
                comp.append(i)
                mats.append(c.float().reshape(nm))
        return comp, mats, dense

    # ---- exchange (the two all-reduces) -----------------------------------------------------
    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        self.rank, size = group_rank(transport, group)

        def mean(buf: torch.Tensor) -> torch.Tensor:
            if size > 1 and buf.numel():
                transport.all_reduce(buf, group=group).wait()
                buf /= size
            return buf

        if self.step < self.opts.dense_steps:
            return self._dense_step(grads, mean)
        return self._run(grads, mean)

    def _dense_step(self, grads: list[torch.Tensor], mean: Any) -> list[torch.Tensor]:
        """One of the first ``dense_steps``: the whole gradient, no residual kept."""
        corrected = self.memory.corrected(grads)
        self.memory.keep(corrected, corrected)
        out = unflatten(mean(flatten([c.float() for c in corrected])),
                        [tuple(g.shape) for g in grads])
        self.step += 1
        return out

    def _run(self, grads: list[torch.Tensor], mean: Any) -> list[torch.Tensor]:
        shapes = [tuple(g.shape) for g in grads]
        corrected = self.memory.corrected(grads)
        comp, mats, dense = self._split(corrected)
        qs = self._start_qs(shapes)
        ps = [m @ q for m, q in zip(mats, qs, strict=True)]
        dense_flat = flatten([corrected[i].float() for i in dense])
        buf = mean(torch.cat([p.reshape(-1) for p in ps] + [dense_flat]))
        offset, p_hat = 0, []
        for p in ps:
            p_hat.append(orthonormalise(buf[offset: offset + p.numel()].view_as(p)))
            offset += p.numel()
        dense_mean = buf[offset:]
        q_local = [m.T @ p for m, p in zip(mats, p_hat, strict=True)]
        transmitted = list(corrected)
        for i, p, q in zip(comp, p_hat, q_local, strict=True):
            transmitted[i] = (p @ q.T).view(shapes[i])
        for i in dense:
            transmitted[i] = corrected[i].float()
        self.memory.keep(corrected, transmitted)
        qbuf = mean(torch.cat([q.reshape(-1) for q in q_local]) if q_local else torch.empty(0))
        out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
        offset, q_mean = 0, []
        for i, p, q in zip(comp, p_hat, q_local, strict=True):
            qm = qbuf[offset: offset + q.numel()].view_as(q).clone()
            offset += q.numel()
            q_mean.append(qm)
            out[i] = (p @ qm.T).view(shapes[i])
        for i, part in zip(dense, unflatten(dense_mean, [shapes[i] for i in dense]), strict=True):
            out[i] = part
        if self.opts.warm_start:
            self.qs = q_mean
        self.step += 1
        return out

    # ---- message level: a one-worker power step (for point-to-point strategies) --------------
    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        corrected = self.memory.corrected(grads)
        if self.step < self.opts.dense_steps:  # the meta says so: a receiver decodes alone
            self.memory.keep(corrected, corrected)
            return Message([flatten([c.float() for c in corrected])],
                           {"shapes": shapes, "whole": True})
        comp, mats, dense = self._split(corrected)
        qs = self._start_qs(shapes)
        p_hat = [orthonormalise(m @ q) for m, q in zip(mats, qs, strict=True)]
        q_loc = [m.T @ p for m, p in zip(mats, p_hat, strict=True)]
        if self.opts.warm_start:
            self.qs = [q.clone() for q in q_loc]
        tensors = [flatten(p_hat), flatten(q_loc), flatten([corrected[i].float() for i in dense])]
        msg = Message(tensors, {"shapes": shapes, "comp": comp, "dense": dense})
        self.memory.keep(corrected, self.decode(msg))
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        if msg.meta.get("whole"):
            return unflatten(msg.tensors[0], [tuple(s) for s in msg.meta["shapes"]])
        shapes, comp, dense = msg.meta["shapes"], msg.meta["comp"], msg.meta["dense"]
        out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
        po = qo = 0
        r = self.opts.rank
        for i in comp:
            n, m = self.matrix_shape(shapes[i])  # type: ignore[misc]
            p = msg.tensors[0][po: po + n * r].view(n, r)
            q = msg.tensors[1][qo: qo + m * r].view(m, r)
            po, qo = po + n * r, qo + m * r
            out[i] = (p @ q.T).view(shapes[i])
        for i, part in zip(dense, unflatten(msg.tensors[2], [shapes[i] for i in dense]),
                           strict=True):
            out[i] = part
        return out

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["qs"] = None if self.qs is None else [q.clone() for q in self.qs]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs = None if state.get("qs") is None else [q.clone() for q in state["qs"]]

    def describe(self) -> dict[str, Any]:
        return {"rank": self.opts.rank, "warm_start": self.opts.warm_start,
                "dense_steps": self.opts.dense_steps}
