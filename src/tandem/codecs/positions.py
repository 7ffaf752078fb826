"""Positions on the wire in ``ceil(log2 D)`` bits each instead of a 32-bit integer.

A position into a vector of ``D`` entries carries ``log2 D`` bits of information; an int32 spends
32. LGC's compressed stage sends little besides the leader's K positions, so their width sets
how many entries fit in a byte budget: on the 46,730-entry benchmark CNN a position takes 16
bits, half an int32, which lets LGC send about twice the entries for the same bytes.

Layout (``w = position_bits(D)``, exact size :func:`positions_nbytes`):

* ``w == 16``: each position as a little-endian 16-bit word (two bytes, no bit twiddling);
* ``w < 16``: :func:`tandem.codecs.bits.pack_bits` at ``w`` bits (bit planes, ``ceil(k w / 8)``);
* ``w > 16``: the low 16 bits as 16-bit words, then the high ``w - 16`` bits bit-packed.

The order of the positions is kept (LGC's leader sends its positions ordered by value). Both
ends know ``k`` and ``D``, so nothing else travels.
"""

from __future__ import annotations

import math

import torch

from tandem.codecs.bits import pack_bits, packed_size, unpack_bits


def position_bits(dim: int) -> int:
    """Bits per position into a vector of ``dim`` entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(dim, 2))))


def positions_nbytes(k: int, dim: int) -> int:
    """Bytes that ``k`` positions into ``dim`` entries occupy on the wire."""
    w = position_bits(dim)
    if w <= 16:
        return 2 * k if w == 16 else packed_size(k, w)
    return 2 * k + packed_size(k, w - 16)


def _words(low: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) -> their 16-bit little-endian bytes."""
    return low.to(torch.int32).to(torch.int16).view(torch.uint8) if low.numel() else \
        torch.empty(0, dtype=torch.uint8)


def pack_positions(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``idx`` (integers in ``[0, dim)``, any int dtype) -> uint8 bytes of
    :func:`positions_nbytes` length."""
    w = position_bits(dim)
    idx = idx.reshape(-1).to(torch.int64)
    if w < 16:
        return pack_bits(idx, w)
    low = _words(idx.bitwise_and(0xFFFF))
    if w == 16:
        return low
    return torch.cat([low, pack_bits(idx.bitwise_right_shift(16), w - 16)])


def unpack_positions(buf: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The inverse of :func:`pack_positions`: int64 positions, in the order they were packed.
    ``buf`` may be 2-D ``(messages, bytes)`` (the result is then ``(messages, k)``), so the
    positions of N gathered messages decode in one call."""
    w = position_bits(dim)
    rows = buf.shape[:-1]
    if k == 0:  # e.g. LGC with every layer dense: nothing to decode (and nothing to reshape)
        return torch.zeros(*rows, 0, dtype=torch.int64)
    buf = buf.reshape(-1, buf.shape[-1])
    if w < 16:
        return unpack_bits(buf, k, w).view(*rows, k)
    words = buf[:, : 2 * k].reshape(-1)
    if words.storage_offset() % 2:  # a 16-bit view needs an even start
        words = words.clone()
    low = words.view(torch.int16).to(torch.int64).bitwise_and_(0xFFFF)
    if w > 16:
        high = unpack_bits(buf[:, 2 * k:].contiguous(), k, w - 16).view(-1, k)
        low.bitwise_or_(high.reshape(-1).bitwise_left_shift_(16))
    return low.view(*rows, k)
