"""What travels between ``param_server`` workers and servers: message headers, flags and the
codec metadata (JSON, never pickled: a server never unpickles what arrives from the network).

A push is ``[header, (meta), *codec tensors]`` with the int64 header
``[push index, oldest base version, local steps, flags, codec step]``; a pull is
``[header, *parameter pieces]`` with ``[global version, flags, 0, 0]``. ``FLAG_META`` says the
codec metadata (layer shapes, sizes) follows the header: it is sent when it changes, not every push.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from tandem.transport.packing import TensorSpec

#: push header (int64): [push index, oldest base version, local steps, flags, codec step]
PUSH_HEADER = 5
#: pull header (int64): [global version, flags, 0, 0]
PULL_HEADER = 4
FLAG_FINAL = 1
FLAG_META = 2
FLAG_CKPT = 4   # a worker's checkpoint mark: no gradient, "I have stopped for the checkpoint"


def meta_to_bytes(meta: dict[str, Any]) -> bytes:
    """A codec message's metadata (shapes, sizes: JSON types) as compact JSON bytes. JSON, not
    pickle: a server never unpickles what arrives from the network."""
    return json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()


def meta_from_bytes(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`meta_to_bytes`; layer shapes come back as tuples."""
    meta = json.loads(data.decode())
    if not isinstance(meta, dict):
        raise ValueError("codec metadata must be a JSON object")
    if "shapes" in meta:
        meta["shapes"] = [tuple(s) for s in meta["shapes"]]
    return meta


def pull_specs(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[TensorSpec]:
    return [(torch.int64, (PULL_HEADER,))] + [(dtype, s) for s in shapes]


def pull_dtype(pull: str) -> torch.dtype:
    """The dtype pulled parameters travel in (option ``pull``)."""
    return torch.float16 if pull == "fp16" else torch.float32
