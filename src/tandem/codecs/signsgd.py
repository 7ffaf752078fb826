"""signsgd: scaled sign compression with error feedback (EF-signSGD, Karimireddy et al. 2019):
one bit per entry plus one fp32 scale per layer.

Each layer of the error-corrected gradient ``c`` is sent as ``mean(|c|) * sign(c)`` (zero counts
as positive): 32x fewer bytes than fp32. The error feedback (default on, and needed: plain
signSGD is biased and can diverge) carries the difference into the next step.

When to use: very slow links where even top-k's 8 bytes per kept entry cost too much per step,
and dense-ish gradients (convolutional nets). Tuning: there is little to tune; keep
``error_feedback`` on. With heavy momentum use the codec's ``momentum=0.9`` (momentum
correction, see :mod:`.memory`) and the optimizer's momentum 0: the optimizer's momentum on the
decoded mean re-integrates the delayed residuals and the run collapsed to chance accuracy on the
Fashion CNN (lr 0.05, momentum 0.9); the scale itself, ``||c||_1 / n_l``, is EF-signSGD's.

Cost (bit for bit the same codes, means and residuals as the per-entry formulation): the
layer scales come from one ``segment_reduce`` (a sequential fp32 sum, kept for its exact
rounding); the signs are written by one comparison into a reused zero-padded bit buffer and
packed straight into the wire buffer (scales then bits, the layout :meth:`Message.pack` gives);
what the receivers decode is ``(2 bit - 1)`` computed in int8, converted once, and scaled per
layer by one ``_foreach_mul_`` over the layers' views (no per-entry gather, no ``where``).
``exchange`` sends the wire buffer and decodes the gathered ones (one table lookup per byte,
then the same int8 / foreach steps, then the sum over the messages). Small models (the
46k-entry CNN: ~0.5 ms with 4 ranks) decode the stacked messages as one ``(k, D)`` batch; large
ones (>= 2^20 entries; ResNet-18 with 4 ranks: ~0.6x the batched code's time) reuse per-entry
scratch (5 bytes per entry plus the bit buffer, held between steps: fresh 50-200 MB temporaries
cost more in page faults than the work) and decode one message at a time into it, adding each
into the mean in the order ``sum(0)`` does. The rest of the time is the shared error-feedback
and momentum bookkeeping in :mod:`.memory` (concatenation, momentum, the fresh residual).

Transfer: gathered (the scales differ per worker). Bytes per code: ``4 * L + ceil(D / 8)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register
from tandem.codecs.bits import bits_to_bytes, bytes_to_signs, packed_size
from tandem.codecs.gathered import LARGE as _LARGE
from tandem.codecs.gathered import ScaledBitsGather
from tandem.codecs.memory import ErrorFeedback
from tandem.codecs.topk import numel
from tandem.flat import unflatten


class SignSGDOptions(CodecOptions):
    error_feedback: bool = Field(True, description="accumulate the sign-compression error")


@register
class SignSGDCodec(ScaledBitsGather, Codec):
    """signsgd: mean-|g| scale (fp32) per layer + 1 bit per entry, error feedback; gathered."""

    name = "signsgd"
    transfer = "gather"
    error_feedback = True
    Options = SignSGDOptions

    def new_memory(self) -> ErrorFeedback:
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=o.error_feedback)

    def _large(self, k: int, dim: int) -> bool:
        return dim >= _LARGE

    def _bits(self, dim: int) -> torch.Tensor:
        """This instance's scratch bit buffer (one bool per entry, padded to whole bytes with
        zeros; a large model's is also the decode's lookup buffer and the in-place magic
        product, so its padding is re-zeroed before each use): written on every call, so
        never shared between instances."""
        buf = self.__dict__.get("_bitbuf")
        if buf is None or buf.numel() != packed_size(dim, 1) * 8:
            buf = self._bitbuf = torch.zeros(packed_size(dim, 1) * 8, dtype=torch.bool)
        return buf

    def _scratch(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A large model's reused buffers: fp32 per entry (magnitudes, what we transmitted,
        one decoded message) and one byte per entry (the +-1 of our signs, the lookup's int32
        indices); fresh ones would cost more in page faults than the work done in them."""
        buf = self.__dict__.get("_scratchbuf")
        if buf is None or buf[0].numel() != dim:
            buf = self._scratchbuf = (torch.empty(dim),
                                      torch.empty(-(-dim // 8), dtype=torch.int64))
        return buf

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        key = tuple(shapes)
        flat = self.memory.corrected_flat(grads)
        n, nl = flat.numel(), len(shapes)
        counts = layer_counts(key)
        wire = torch.empty(4 * nl + packed_size(n, 1), dtype=torch.uint8)
        scales = wire[: 4 * nl].view(torch.float32)
        large = n >= _LARGE
        fbuf, raw = self._scratch(n) if large else (None, None)
        torch.div(torch.segment_reduce(flat.abs() if fbuf is None else torch.abs(flat, out=fbuf),
                                       "sum", lengths=counts, unsafe=True),
                  _clamped(key), out=scales)
        bits = self._bits(n)
        if large and bits.numel() > n:  # the zero padding, overwritten last time
            bits[n:].zero_()
        positive = torch.ge(flat, 0, out=bits[:n])
        msg = Message([scales, wire[4 * nl:]], {"shapes": shapes, "dim": n})
        if self.memory.needs_transmitted:
            # what the receivers decode, computed directly (no unpack of our own bits):
            # (2 bit - 1) in int8, as float, times its layer's scale (one foreach call)
            if fbuf is None:
                sent = positive.view(torch.uint8).mul(2).sub_(1).view(torch.int8).to(
                    torch.float32)
            else:
                pm = torch.mul(positive.view(torch.uint8), 2, out=raw.view(torch.uint8)[:n])
                sent = fbuf.copy_(pm.sub_(1).view(torch.int8))
            _scale_layers(sent.unsqueeze(0), scales.unsqueeze(0), layer_sizes(key))
            self.memory.keep_flat(flat, transmitted=sent)
        else:
            self.memory.keep_flat(flat, transmitted=flat)
        bits_to_bytes(bits.view(torch.uint8), out=wire[4 * nl:], in_place=large)
        self._wire = wire
        return msg

    def _decode_rows(self, scales: torch.Tensor, bits: torch.Tensor,
                     shapes: list[tuple[int, ...]], dim: int) -> list[torch.Tensor]:
        """The mean of ``k`` codes given as rows (``(k, layers)`` scales, ``(k, bytes)`` sign
        bits), in one batch: all bits unpacked at once, ``(2 bit - 1) * scale`` summed over the
        messages."""
        k = scales.shape[0]
        out = bytes_to_signs(bits)[:, :dim].to(torch.float32)
        _scale_layers(out, scales, layer_sizes(tuple(shapes)))
        return unflatten(out.sum(0).div_(k) if k > 1 else out.view(-1), shapes)

    def _decode_each(self, codes: list[tuple[torch.Tensor, torch.Tensor]],
                     shapes: list[tuple[int, ...]], dim: int) -> list[torch.Tensor]:
        """:meth:`_decode_rows` for ``k`` > 1 codes of a large model, one message at a time
        into reused buffers (the lookup's indices and result, the fp32 values), each added to
        the sum in the order of ``sum(0)``: bounded scratch memory and no page faults."""
        value, raw = self._scratch(dim)
        spread = self._bits(dim).view(torch.uint8).view(torch.int64)
        sizes = layer_sizes(tuple(shapes))
        out = None
        for scales, packed in codes:
            value.copy_(bytes_to_signs(packed, index=raw.view(torch.int32), out=spread)[:dim])
            _scale_layers(value.unsqueeze(0), scales.unsqueeze(0), sizes)
            # the sum in the order of sum(0): (0 + v0) + v1 + ...; 0 + v0 = v0 + 0
            out = torch.add(value, 0.0) if out is None else out.add_(value)
        assert out is not None
        return unflatten(out.div_(len(codes)), shapes)

    def _decode_mean(self, msgs: list[Message]) -> list[torch.Tensor]:
        if len(msgs) > 1 and msgs[0].meta["dim"] >= _LARGE:
            return self._decode_each([(m.tensors[0], m.tensors[1]) for m in msgs],
                                     msgs[0].meta["shapes"], msgs[0].meta["dim"])
        bits = torch.stack([m.tensors[1] for m in msgs])
        scales = torch.stack([m.tensors[0] for m in msgs])
        return self._decode_rows(scales, bits, msgs[0].meta["shapes"], msgs[0].meta["dim"])

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return self._decode_mean([msg])

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        return self._decode_mean(msgs)


def _scale_layers(values: torch.Tensor, scales: torch.Tensor, sizes: tuple[int, ...]) -> None:
    """``values[:, layer] *= scales[:, layer]`` in place: one ``_foreach_mul_`` over the layers'
    column views (cheaper than gathering a scale for every entry, ~0.5 ns per entry, and than
    a Python loop of slices and multiplications)."""
    torch._foreach_mul_(values.split(sizes, dim=1), list(scales.split(1, dim=1)))


@lru_cache(maxsize=16)
def layer_sizes(shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    return tuple(numel(s) for s in shapes)


@lru_cache(maxsize=16)
def _clamped(shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    return layer_counts(shapes).clamp_min(1)


@lru_cache(maxsize=16)
def layer_counts(shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Entries per layer (int64), cached per model."""
    return torch.tensor([numel(s) for s in shapes], dtype=torch.int64)
