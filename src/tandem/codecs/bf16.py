"""bf16: gradients cast to bfloat16 and summed by all-reduce (2x fewer bytes than fp32).

When to use: like ``fp16`` but with fp32's exponent range (no underflow or overflow worries) and
only 8 significant bits (relative rounding error up to 2^-9 per entry, per worker). Prefer it when
gradients span many orders of magnitude; prefer ``fp16`` when precision matters more than range.
``prescale`` divides by the group size before casting (the all-reduce then sums in bf16).

Bytes per worker per step: all-reduce of ``2 * D`` bytes.
"""

from __future__ import annotations

import torch

from tandem.codecs.base import register
from tandem.codecs.fp16 import CastCodec, CastOptions


class Bf16Options(CastOptions):
    pass


@register
class Bf16Codec(CastCodec):
    """bf16: bfloat16 gradients (fp32 range, 8 significant bits), summed by all-reduce."""

    name = "bf16"
    dtype = torch.bfloat16
    Options = Bf16Options
