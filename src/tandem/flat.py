"""One flat buffer for a list of tensors, and per-tensor views back into it.

Codecs (and strategies that move whole models) treat a gradient as one 1-D fp32 buffer: one
collective instead of one per layer, and whole-buffer arithmetic instead of a few small
operations per layer, whose fixed cost (~2-5 us each) dominates on small models. This module
is the one place that converts between the two forms; it imports only torch, so every layer
may use it.

* :func:`flatten` copies the tensors end to end into a fresh fp32 buffer;
* :func:`unflatten` gives per-tensor views of such a buffer (no copy: writing a view writes the
  buffer);
* :func:`contiguous_span` finds the buffer a list of tensors already tiles (a trainer's flat
  gradient storage), so it can travel without any copy.

Both conversions use torch's C++ flatten / unflatten (DDP's bucket helpers) where they apply:
one call instead of a Python-level ``reshape`` / ``view`` per tensor, about half the cost on
small models and the same values to the bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["contiguous_span", "flatten", "unflatten"]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors end to end in one fresh 1-D fp32 buffer (never a view of an input).

    Several tensors that do not require grad go through torch's C++ flatten (one call); a
    single tensor, or tensors that require grad (detached here), are concatenated, since the
    C++ flatten returns a *view* of a lone contiguous tensor. An empty list gives an empty
    buffer."""
    if not tensors:
        return torch.empty(0)
    if len(tensors) > 1 and not any(t.requires_grad for t in tensors):
        flat = _flatten_dense_tensors(tensors)
    else:
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat.float()


@lru_cache(maxsize=256)
def _templates(shapes: tuple[tuple[int, ...], ...]) -> tuple[list[torch.Tensor], int, bool]:
    """Storage-free (meta) tensors of ``shapes`` (the templates torch's C++ unflatten reads),
    their total size, and whether any is empty (the C++ unflatten turns those into shape
    ``(0,)``, so they take the Python path)."""
    sizes = [math.prod(s) for s in shapes]
    return ([torch.empty(s, device="meta") for s in shapes], sum(sizes),
            any(n == 0 for n in sizes))


def unflatten(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of consecutive pieces of the 1-D ``flat`` with the given shapes (no copy).

    ``flat`` must hold exactly the shapes' entries (ValueError otherwise). The views come
    from torch's C++ unflatten, cached per list of shapes."""
    likes, total, has_empty = _templates(tuple(tuple(s) for s in shapes))
    if flat.numel() != total:
        raise ValueError(f"flat buffer of {flat.numel()} entries for tensors of {total}")
    if has_empty:
        out, offset = [], 0
        for shape, like in zip(shapes, likes, strict=True):
            n = like.numel()
            out.append(flat[offset: offset + n].view(shape))
            offset += n
        return out
    return list(_unflatten_dense_tensors(flat, likes))


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one 1-D tensor the given tensors tile end to end (same storage and dtype,
    contiguous, in order, no gaps), or None. Lets a flat gradient buffer travel (and be
    averaged in place) without a copy, as DDP's ``gradient_as_bucket_view`` does."""
    if not tensors:
        return None
    first = tensors[0]
    storage, start, offset = first.untyped_storage().data_ptr(), first.storage_offset(), 0
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != start + offset):
            return None
        offset += t.numel()
    return first.new_empty(0).set_(first.untyped_storage(), start, (offset,))
