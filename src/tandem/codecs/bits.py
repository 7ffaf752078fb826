"""Bit packing: small integer codes of ``width`` bits each, stored densely in uint8 bytes.

``pack_bits(codes, width)`` returns exactly ``ceil(n * width / 8)`` bytes: the codes are stored as
``width`` bit planes of ``n`` bits each (plane b holds bit b of every code; little-endian bit
order inside each byte), which keeps packing to contiguous vector operations. A 1-bit sign costs
1/8 byte and QSGD's 5-bit codes 5/8 byte per element: the message size on the wire is the
information content, not a padded integer type.
"""

from __future__ import annotations

import math

import torch


def packed_size(n: int, width: int) -> int:
    """Bytes that ``n`` codes of ``width`` bits occupy."""
    return math.ceil(n * width / 8)


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**width) into a uint8 tensor."""
    if not 1 <= width <= 16:
        raise ValueError(f"width must be in 1..16, got {width}")
    codes = codes.reshape(-1)
    n = codes.numel()
    total = packed_size(n, width) * 8
    bits = torch.zeros(total, dtype=torch.uint8)
    src = codes.to(torch.int32)
    for b in range(width):
        bits[b * n: (b + 1) * n] = ((src >> b) & 1).to(torch.uint8)
    rows = bits.view(-1, 8)
    out = rows[:, 0].clone()
    for j in range(1, 8):
        out |= rows[:, j] << j
    return out


def unpack_bits(buf: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as int64."""
    if buf.numel() != packed_size(n, width):
        raise ValueError(f"expected {packed_size(n, width)} bytes for {n} codes of {width} bits, "
                         f"got {buf.numel()}")
    bits = torch.empty(buf.numel(), 8, dtype=torch.uint8)
    for j in range(8):
        bits[:, j] = (buf >> j) & 1
    planes = bits.view(-1)[: n * width].view(width, n)
    out = planes[0].to(torch.int64)
    for b in range(1, width):
        out |= planes[b].to(torch.int64) << b
    return out
