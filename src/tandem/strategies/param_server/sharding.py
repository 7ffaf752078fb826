"""Balanced sharding of a model's parameters over S parameter servers, by size.

Why: a parameter server's link carries every worker's push and every pull of the parameters it
holds, so the server holding the most bytes sets the pace. Giving each server the same number of
elements spreads that traffic evenly.

How: every parameter tensor is cut along its first dimension into *pieces* of at most
``ceil(D / S)`` elements (whole rows, so a piece of a weight matrix is still a matrix and
per-layer codecs keep working); then the pieces go to servers largest first, each to the server
holding the fewest elements so far (the LPT rule, within 4/3 of the best possible balance, and
near-perfect here because no piece exceeds the ideal share). With ``S = 1`` every parameter is one
whole piece. The plan is a pure function of the shapes and ``S``: workers and servers compute the
same plan independently, so it never travels.

Tune: more servers lower the bytes per server link; past a few servers the per-message latency
dominates and more servers only add messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` (along dim 0) of parameter ``param``; a 0-d parameter counts as (1,)."""

    param: int
    start: int
    stop: int


def _base(shape: Shape) -> Shape:
    return shape if len(shape) else (1,)


@dataclass
class ShardPlan:
    """Which pieces each server holds (``servers[s]``, in (param, start) order)."""

    shapes: list[Shape]
    servers: list[list[Piece]]

    def piece_shape(self, piece: Piece) -> Shape:
        base = _base(self.shapes[piece.param])
        return (piece.stop - piece.start, *base[1:])

    def shapes_of(self, server: int) -> list[Shape]:
        return [self.piece_shape(p) for p in self.servers[server]]

    def loads(self) -> list[int]:
        """Elements held by each server."""
        return [sum(math.prod(self.piece_shape(p)) for p in pieces) for pieces in self.servers]


def plan_shards(shapes: list[Shape], servers: int) -> ShardPlan:
    """Cut the parameters into pieces and spread them over ``servers`` by size (see module doc)."""
    if servers < 1:
        raise ConfigError(f"servers must be at least 1, got {servers}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    total = sum(math.prod(_base(s)) for s in shapes)
    cap = max(1, math.ceil(total / servers))
    pieces: list[Piece] = []
    for i, shape in enumerate(shapes):
        base = _base(shape)
        rows, row = base[0], math.prod(base[1:])
        if rows == 0 or row == 0:
            continue
        step = rows if servers == 1 else max(1, cap // row)
        pieces += [Piece(i, a, min(rows, a + step)) for a in range(0, rows, step)]
    size = {p: (p.stop - p.start) * math.prod(_base(shapes[p.param])[1:]) for p in pieces}
    loads = [0] * servers
    assigned: list[list[Piece]] = [[] for _ in range(servers)]
    for p in sorted(pieces, key=lambda q: (-size[q], q.param, q.start)):
        s = min(range(servers), key=lambda j: (loads[j], j))
        assigned[s].append(p)
        loads[s] += size[p]
    if any(not a for a in assigned):
        raise ConfigError(f"servers={servers} is more than this model's {len(pieces)} parameter "
                          "pieces can fill; use fewer servers")
    return ShardPlan(shapes, [sorted(a, key=lambda q: (q.param, q.start)) for a in assigned])


def split(tensors: list[torch.Tensor], plan: ShardPlan) -> list[list[torch.Tensor]]:
    """Per server, the pieces of ``tensors`` (views, no copy) in the plan's order."""
    out = []
    for pieces in plan.servers:
        part = []
        for p in pieces:
            t = tensors[p.param]
            part.append((t.reshape(1) if t.dim() == 0 else t)[p.start:p.stop])
        out.append(part)
    return out


def join(parts: list[list[torch.Tensor]], plan: ShardPlan,
         dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Inverse of :func:`split`: whole tensors (new memory) from every server's pieces."""
    out = [torch.empty(_base(s), dtype=dtype) for s in plan.shapes]
    for pieces, values in zip(plan.servers, parts, strict=True):
        for p, v in zip(pieces, values, strict=True):
            out[p.param][p.start:p.stop].copy_(v.reshape(plan.piece_shape(p)))
    return [o.reshape(s) for o, s in zip(out, plan.shapes, strict=True)]
