"""A reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed.

Layout: two zero bytes, a type byte (0x08 = unsigned byte, the only one these datasets use), the
number of dimensions, then one big-endian uint32 per dimension, then the data. Anything else (bad
magic, wrong rank, truncated or over-long data, a broken gzip stream) raises DataError naming the
file, so a damaged download is reported as such, not as a shape error later.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from tandem.errors import DataError

UBYTE = 0x08


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed); checks magic, rank and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); the file is damaged, download or "
                        "install it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != UBYTE:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported (only 0x08, ubyte)")
    rank = raw[3]
    if ndim is not None and rank != ndim:
        raise DataError(f"{path}: holds a {rank}-dimensional array, expected {ndim} dimensions")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises {expected} bytes for shape {dims} but the file "
                        f"holds {len(raw) - header}: the file is truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip-compressed if ``path`` ends in ``.gz``); used by tests."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UBYTE, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
