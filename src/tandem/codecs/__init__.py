"""Gradient codecs: each file one codec, registered by name in :data:`CODECS` (found without any
import line here).

``dense``, ``fp16``, ``bf16``, ``topk``, ``randomk``, ``qsgd``, ``powersgd``, ``signsgd`` and
``lgc`` (M1, :mod:`tandem.codecs.lgc`); :func:`ddp_hook` runs any of them as a
``DistributedDataParallel`` comm hook; :func:`describe_codecs` lists them with their options
(``tandem codecs``).
"""

from tandem.codecs.base import (
    CODECS,
    Codec,
    CodecOptions,
    Message,
    describe_codecs,
    make_codec,
    register,
)
from tandem.codecs.ddp_hook import ddp_hook
from tandem.transport.process_group import ProcessGroupTransport

__all__ = ["CODECS", "Codec", "CodecOptions", "Message", "ProcessGroupTransport",
           "ddp_hook", "describe_codecs", "make_codec", "register"]
