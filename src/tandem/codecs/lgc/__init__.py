"""LGC (method M1): learned gradient compression that exploits the correlation between the
workers' gradients. The codec is :class:`~tandem.codecs.lgc.codec.LGCCodec`; its rounds live in
one module per stage and variant (``stages``, ``rar``, ``ps``), its autoencoder in
``autoencoder``."""

from tandem.codecs.lgc.codec import LGCCodec, LGCOptions
from tandem.codecs.lgc.plan import Plan

__all__ = ["LGCCodec", "LGCOptions", "Plan"]
