"""Gradient codecs: each file one codec, registered by name in :data:`CODECS`.

``dense``, ``fp16``, ``bf16``, ``topk``, ``randomk``, ``qsgd``, ``powersgd``, ``signsgd`` and
``lgc`` (M1); :func:`ddp_hook` runs any of them as a ``DistributedDataParallel`` comm hook;
:func:`describe_codecs` lists them with their options (``tandem codecs``).
"""

from tandem.codecs import (  # noqa: F401  (importing registers them)
    bf16,
    dense,
    fp16,
    lgc,
    powersgd,
    qsgd,
    randomk,
    signsgd,
    topk,
)
from tandem.codecs.base import (
    CODECS,
    Codec,
    CodecOptions,
    Message,
    describe_codecs,
    make_codec,
    register,
)
from tandem.codecs.ddp import ddp_hook
from tandem.transport.adapter import ProcessGroupTransport

__all__ = ["CODECS", "Codec", "CodecOptions", "Message", "ProcessGroupTransport",
           "ddp_hook", "describe_codecs", "make_codec", "register"]
