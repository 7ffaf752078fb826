"""Pack several tensors into one byte buffer and back, so one message carries a whole code.

A message travels as raw bytes: its size on the wire is exactly ``sum(t.nbytes)``, which is what
the byte meter charges and what a codec's ``nbytes`` reports.
"""

from __future__ import annotations

import math

import torch

TensorSpec = tuple[torch.dtype, tuple[int, ...]]

DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}


def spec_of(tensors: list[torch.Tensor]) -> list[TensorSpec]:
    return [(t.dtype, tuple(t.shape)) for t in tensors]


def nbytes_of(specs: list[TensorSpec]) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for dt, shape in specs)


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` into one contiguous uint8 tensor."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def unpack(buf: torch.Tensor, specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Split a uint8 buffer made by :func:`pack` back into tensors of the given specs."""
    out, offset = [], 0
    for dtype, shape in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        chunk = buf[offset: offset + n]
        if chunk.numel() != n:
            raise ValueError(f"buffer too short: need {offset + n} bytes, have {buf.numel()}")
        out.append(chunk.clone().view(dtype).reshape(shape))
        offset += n
    if offset != buf.numel():
        raise ValueError(f"buffer has {buf.numel() - offset} trailing bytes")
    return out


def header_of(specs: list[TensorSpec]) -> torch.Tensor:
    """An int64 header describing ``specs`` (count, then dtype code, ndim, dims per tensor)."""
    vals = [len(specs)]
    for dtype, shape in specs:
        vals += [DTYPE_CODE[dtype], len(shape), *shape]
    return torch.tensor(vals, dtype=torch.int64)


def specs_from_header(header: torch.Tensor) -> list[TensorSpec]:
    vals = header.tolist()
    n, i, specs = vals[0], 1, []
    for _ in range(n):
        dtype, ndim = DTYPES[vals[i]], vals[i + 1]
        specs.append((dtype, tuple(vals[i + 2: i + 2 + ndim])))
        i += 2 + ndim
    return specs


#: a point-to-point message travels in pieces of at most this many bytes (Transport.send says why)
P2P_PIECE_BYTES = 64 * 1024


def byte_pieces(t: torch.Tensor, size: int = P2P_PIECE_BYTES) -> list[torch.Tensor]:
    """Views of contiguous ``t``'s bytes, ``size`` bytes each (the last one shorter); one empty
    view for an empty tensor. Both ends of a message cut it the same way, from its byte count."""
    flat = t.reshape(-1).view(torch.uint8)
    return list(flat.split(size)) if flat.numel() else [flat]
