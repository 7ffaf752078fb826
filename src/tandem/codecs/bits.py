"""Bit packing: small integer codes of ``width`` bits each, stored densely in uint8 bytes.

``pack_bits(codes, width)`` returns exactly ``ceil(n * width / 8)`` bytes: the codes are stored as
``width`` bit planes of ``n`` bits each (plane b holds bit b of every code; little-endian bit
order inside each byte), which keeps packing to contiguous vector operations. A 1-bit sign costs
1/8 byte and QSGD's 5-bit codes 5/8 byte per element: the message size on the wire is the
information content, not a padded integer type.

How (cost: a handful of whole-tensor integer operations, no per-bit loop): packing views every
8 bits (one uint8 each, 0 or 1) as one little-endian int64 and gathers their low bits into one
byte with a single multiplication (``* MAGIC >> 56``: the eight shifted copies land on bits
56..63 and every cross term lands below bit 56 or above bit 63, so no carries) and copies each
product's top byte out through a strided uint8 view (:func:`bits_to_bytes` can write straight
into a slice of a wire buffer); unpacking looks each byte up in a 256-entry table of int64
"spread" values (bit j of the byte in byte j; an int32 index, ~1 ns per byte, the dominant
cost of unpacking) and views the result as uint8 bits. :func:`unpack_bits` takes a 2-D tensor
of equally long buffers too (one row per message), so decoding N gathered codes is one call.
Callers on a hot path (QSGD, signSGD) write their bits into a reused, zero-padded buffer and
call :func:`bits_to_bytes` directly, skipping :func:`pack_bits`' fresh zeroed buffer. On large
buffers (millions of bytes) fresh temporaries cost more in page faults (~3 ms per 4 MB) than
the arithmetic: :func:`bits_to_bytes` can multiply in place and the unpackers can look up
through caller-owned ``index``/``out`` buffers.
"""

from __future__ import annotations

import math
import sys

import torch


def packed_size(n: int, width: int) -> int:
    """Bytes that ``n`` codes of ``width`` bits occupy."""
    return math.ceil(n * width / 8)


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**width) into a uint8 tensor (bool codes are
    1-bit)."""
    if not 1 <= width <= 16:
        raise ValueError(f"width must be in 1..16, got {width}")
    codes = codes.reshape(-1)
    n = codes.numel()
    nbytes = packed_size(n, width)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8)
    if width == 1:
        bits[:n] = codes.to(torch.uint8)
    else:
        src = codes.to(torch.int32)
        planes = src.unsqueeze(0).bitwise_right_shift(_SHIFTS[:width].unsqueeze(1))
        bits[: n * width].view(width, n).copy_(planes.bitwise_and_(1))
    return bits_to_bytes(bits)


def bits_to_bytes(bits: torch.Tensor, out: torch.Tensor | None = None, *,
                  in_place: bool = False) -> torch.Tensor:
    """uint8 bits (0/1, a multiple of 8 of them, contiguous) -> their bytes, LSB first.

    ``out``: an optional uint8 tensor of ``bits.numel() // 8`` elements to write into (e.g. a
    slice of a wire buffer; saves a copy). Two operations: the magic multiplication, then a
    strided copy of each product's top byte (byte 7 of a little-endian int64). ``in_place``:
    multiply in ``bits`` itself (it is garbage afterwards; on a large buffer this saves a fresh
    product buffer and its page faults)."""
    word = bits.view(torch.int64)
    word = word.mul_(_MAGIC) if in_place else word.mul(_MAGIC)
    if _LITTLE:
        top = word.view(torch.uint8)[7::8]
    else:
        top = word.bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)
    if out is None:
        return top.clone() if _LITTLE else top
    return out.copy_(top)


def bytes_to_bits(buf: torch.Tensor, *, index: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 bytes (any shape ``(..., b)``) -> their bits as uint8 0/1 ``(..., 8 b)``.

    ``index`` (int32) and ``out`` (int64), at least one entry per byte: reused buffers for the
    lookup's indices and result (on a large buffer fresh ones cost more in page faults than the
    lookup itself); the result is then a view of ``out``."""
    spread = _lookup(_SPREAD, buf, index, out)
    return spread.view(torch.uint8).view(*buf.shape[:-1], buf.shape[-1] * 8)


def bytes_to_signs(buf: torch.Tensor, one: int = 1, *, index: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 bytes ``(..., b)`` -> one int8 per bit ``(..., 8 b)``: ``one`` where the bit is 1,
    ``-one`` where it is 0 (``one`` = 1: ``2 bit - 1``, what a sign code decodes to; -1: the
    factor ``1 - 2 bit`` of a sign-bit plane), by the same one-lookup-per-byte as
    :func:`bytes_to_bits` with a table of +-1 lanes (saves two passes over the bits);
    ``index``/``out`` as there."""
    if one not in (1, -1):
        raise ValueError(f"one must be 1 or -1, got {one}")
    spread = _lookup(_SIGNS if one == 1 else _NEG_SIGNS, buf, index, out)
    return spread.view(torch.int8).view(*buf.shape[:-1], buf.shape[-1] * 8)


def _lookup(table: torch.Tensor, buf: torch.Tensor, index: torch.Tensor | None,
            out: torch.Tensor | None) -> torch.Tensor:
    """``table[byte]`` for every byte of ``buf`` (int64), through the optional buffers."""
    n = buf.numel()
    if index is None:  # convert first: a strided ``buf`` is then copied once, not twice
        idx = buf.to(torch.int32).reshape(-1)
    else:
        idx = index[:n]
        idx.view(buf.shape).copy_(buf)
    if out is None:
        return table.index_select(0, idx)
    return torch.index_select(table, 0, idx, out=out[:n])


def unpack_bits(buf: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as int64. ``buf`` may be 2-D
    ``(messages, bytes)``: the result is then ``(messages, n)``, all decoded at once."""
    if buf.shape[-1] != packed_size(n, width):
        raise ValueError(f"expected {packed_size(n, width)} bytes for {n} codes of {width} bits, "
                         f"got {buf.shape[-1]}")
    rows = buf.shape[:-1]
    if n == 0:
        return torch.zeros(*rows, 0, dtype=torch.int64)
    planes = unpack_planes(buf.reshape(-1, buf.shape[-1]), n, width)
    return combine_planes(planes).to(torch.int64).view(*rows, n)


def unpack_planes(buf: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """``(m, bytes)`` packed codes -> their ``(m, width, n)`` uint8 bit planes (0/1)."""
    m, nbytes = buf.shape
    return bytes_to_bits(buf).view(m, nbytes * 8)[:, : n * width].view(m, width, n)


def combine_planes(planes: torch.Tensor) -> torch.Tensor:
    """``(m, width, n)`` uint8 bit planes -> ``(m, n)`` codes, in the narrowest integer type
    (uint8 up to 8 bits): one shift-or per plane over contiguous rows."""
    width = planes.shape[1]
    if width == 1:
        return planes[:, 0]
    kind = torch.uint8 if width <= 8 else torch.int32
    acc = planes[:, 0].to(kind)
    for b in range(1, width):
        acc.bitwise_or_(planes[:, b].to(kind).bitwise_left_shift_(b))
    return acc


_LITTLE = sys.byteorder == "little"
#: bytes -> bit-gathering multiplier: sum over j of 2**(56 - 7 j)
_MAGIC = sum(1 << (56 - 7 * j) for j in range(8))
_SHIFTS = torch.arange(16, dtype=torch.int32)
#: _SPREAD[byte] = bit j of byte in byte j of an int64 (little-endian)
_SPREAD = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).mul(
    torch.tensor([1 << (8 * j) for j in range(8)])).sum(1)
#: _SIGNS[byte] = +1 (bit j set) or -1 in int8 lane j of an int64 (little-endian lanes)
_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).mul(2).sub(1).to(
    torch.int8).contiguous().view(torch.int64).reshape(256)
_NEG_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).mul(-2).add(1).to(
    torch.int8).contiguous().view(torch.int64).reshape(256)
