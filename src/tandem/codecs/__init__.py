"""Gradient codecs: each file one codec, registered by name in :data:`CODECS`."""

from tandem.codecs.base import CODECS, Codec, CodecOptions, Message, make_codec, register
from tandem.codecs import dense  # noqa: F401  (registers)

__all__ = ["CODECS", "Codec", "CodecOptions", "Message", "make_codec", "register"]
