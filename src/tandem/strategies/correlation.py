"""How alike are the workers' gradients? The question LGC (method M1) stands on, measured.

Every ``every`` steps the workers all-gather their raw gradients (metered as ``telemetry``, never
as the method's bytes) and rank 0 records, per layer and over the whole model:

* ``grad_cos``: the mean over worker pairs of the cosine similarity of their gradients (1: the
  workers agree; 0: unrelated; with N workers on iid data it falls as the minibatch noise grows);
* ``topk_overlap``: the mean over pairs of ``|I_i & I_j| / k``, the overlap of the positions of
  their top-k entries by magnitude (``ratio`` of each layer): how much a leader's support (LGC's
  shared index set) covers another worker's largest entries.

High values mean one worker's code can stand for the common part (where LGC should help); low
values mean each worker's gradient is mostly its own (where per-worker codecs are as good). Costs
one all-gather of the whole gradient per measured step; measure every few tens of steps.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from tandem.flat import flatten


def layer_slices(shapes: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    out, offset = [], 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        out.append((offset, offset + n))
        offset += n
    return out


def pairwise(vectors: list[torch.Tensor], ratio: float) -> tuple[float, float]:
    """(mean pairwise cosine, mean pairwise top-k overlap) of equally long vectors."""
    n = vectors[0].numel()
    k = max(1, int(round(ratio * n)))
    tops = [set(v.abs().topk(k).indices.tolist()) for v in vectors]
    cos, overlap = [], []
    for i, j in itertools.combinations(range(len(vectors)), 2):
        a, b = vectors[i], vectors[j]
        denom = float(a.norm() * b.norm())
        cos.append(float(a @ b) / denom if denom > 0 else 0.0)
        overlap.append(len(tops[i] & tops[j]) / k)
    if not cos:
        return 1.0, 1.0
    return sum(cos) / len(cos), sum(overlap) / len(overlap)


def gradient_correlation(grads: list[torch.Tensor], names: list[str], transport: Any,
                         ratio: float = 0.01) -> dict[str, Any]:
    """Record fields for rank 0 (every rank must call it: it is one collective)."""
    flat = flatten(grads)
    gathered = [g.double() for g in transport.all_gather(flat, category="telemetry").wait()]
    fields: dict[str, Any] = {"grad_cos": {}, "topk_overlap": {}}
    for name, (lo, hi) in zip(names, layer_slices([tuple(g.shape) for g in grads]),
                              strict=True):
        c, o = pairwise([g[lo:hi] for g in gathered], ratio)
        fields["grad_cos"][name] = round(c, 6)
        fields["topk_overlap"][name] = round(o, 6)
    c, o = pairwise(gathered, ratio)
    fields["grad_cos_model"], fields["topk_overlap_model"] = round(c, 6), round(o, 6)
    return fields
