"""QSGD and signSGD against plain reference implementations, bit for bit.

The codecs' fast paths (levels cut into bit planes through int64 lanes, signs decoded in int8,
per-bucket / per-layer scaling through foreach views, an ``exchange`` that decodes the gathered
buffers as rows) must give exactly what the straightforward per-entry formulation gives: the
same message bytes, the same decoded mean (signed zeros included), the same error-feedback and
momentum state. The references below are that formulation, written with the public
:mod:`tandem.codecs.bits` functions. Shapes are odd on purpose (layer and plane boundaries
inside bytes, empty layers, buckets that straddle nothing); every test runs on the small-model
and on the large-model paths (see ``size_path``)."""

from __future__ import annotations

import math

import pytest
import torch

from codec_jobs import run_threads
from tandem.codecs import make_codec, qsgd, signsgd
from tandem.codecs.base import Message, step_generator
from tandem.codecs.bits import pack_bits, unpack_bits
from tandem.codecs.qsgd import bucket_counts, level_bits, uniform16

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,), (0,), (131,), (9, 9)]


@pytest.fixture(params=["small", "large", "large-gather"])
def size_path(request, monkeypatch):
    """Runs a test on the small-model path, then with every model counted as large (encode
    scratch reused in place, messages decoded one at a time; per run of buckets, or, with too
    many runs, through the per-entry bucket gather)."""
    if request.param != "small":
        monkeypatch.setattr(qsgd, "_LARGE", 1)
        monkeypatch.setattr(signsgd, "_LARGE", 1)
    if request.param == "large-gather":
        monkeypatch.setattr(qsgd, "_runs", lambda counts, most=32: None)
    return request.param


def grads(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen) for s in shapes]
    if seed % 3 == 1:  # signed zeros, an all-zero layer, a layer of tiny negatives
        out[0].view(-1)[:3] = torch.tensor([-0.0, 0.0, -0.0])
        out[2].zero_()
        out[1].fill_(-1e-45)
    return out


def bits_of(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(torch.int32) if t.dtype == torch.float32 else t for t in ts]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality (``-0.0`` differs from ``0.0``)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(p, q)
        for x, y, p, q in zip(a, b, bits_of(a), bits_of(b), strict=True))


def ref_qsgd_encode(flat: torch.Tensor, shapes, s: int, bucket: int, seed: int, rank: int,
                    step: int) -> list[torch.Tensor]:
    counts = torch.tensor(bucket_counts(tuple(shapes), bucket), dtype=torch.int64)
    mag = flat.abs()
    norms = torch.segment_reduce(mag * mag, "sum", lengths=counts).sqrt()
    per = torch.repeat_interleave(norms, counts).clamp_min(1e-30)
    gen = step_generator(seed, rank, step, 0x51534744)
    level = (mag / per * s + uniform16(flat.numel(), gen)).floor().clamp(0, s)
    w = level_bits(s)
    codes = level.to(torch.int64) | ((flat < 0).to(torch.int64) << w)
    return [norms, pack_bits(codes, w + 1)]


def ref_qsgd_mean(msgs: list[list[torch.Tensor]], shapes, s: int, bucket: int) -> torch.Tensor:
    counts = torch.tensor(bucket_counts(tuple(shapes), bucket), dtype=torch.int64)
    dim, w = int(counts.sum()), level_bits(s)
    rows = []
    for norms, packed in msgs:
        codes = unpack_bits(packed, dim, w + 1)
        sign = (codes >> w).to(torch.float32) * -2.0 + 1.0
        rows.append((codes & ((1 << w) - 1)).to(torch.float32) * sign
                    * torch.repeat_interleave(norms, counts))
    out = torch.stack(rows).sum(0) if len(rows) > 1 else rows[0]
    return out * (1.0 / (s * len(rows)))


@pytest.mark.parametrize("opts", [{}, {"momentum": 0.9}, {"levels": 1, "bucket_size": 0},
                                  {"levels": 127, "bucket_size": 10},
                                  {"levels": 255, "bucket_size": 7},
                                  {"levels": 1000, "bucket_size": 64}])
def test_qsgd_matches_reference_bitwise(opts, size_path):
    """Breaks if QSGD's bytes, decoded mean (1 or 3 messages) or momentum state differ in any
    bit from the per-entry reference (e.g. a wrong plane, sign or bucket norm)."""
    s, bucket = opts.get("levels", 15), opts.get("bucket_size", 512)
    c = make_codec("qsgd", opts, seed=5)
    m = opts.get("momentum", 0.0)
    vel = torch.zeros(sum(math.prod(x) for x in SHAPES))
    for step in range(4):
        g = grads(step)
        flat = torch.cat([t.reshape(-1) for t in g])
        flat = m * vel + flat if m else flat
        vel = flat
        c.step = step
        msg = c.encode([t.clone() for t in g])
        want = ref_qsgd_encode(flat, SHAPES, s, bucket, 5, 0, step)
        assert same(msg.tensors, want)
        other = ref_qsgd_encode(flat * 0.5 - 0.1, SHAPES, s, bucket, 5, 1, step)
        for group in ([want], [want, other, want]):
            got = c.aggregate([Message(list(t), msg.meta) for t in group])
            assert same(got, [x.view(sh) for x, sh in zip(
                ref_qsgd_mean(group, SHAPES, s, bucket).split(
                    [math.prod(x) for x in SHAPES]), SHAPES, strict=True)])
        if m:
            assert same([t.reshape(-1) for t in c.memory.velocity],
                        list(vel.split([math.prod(x) for x in SHAPES])))


@pytest.mark.parametrize("opts", [{}, {"momentum": 0.9}, {"error_feedback": False}])
def test_signsgd_matches_reference_bitwise(opts, size_path):
    """Breaks if signSGD's bytes, decoded mean, transmitted values or residuals differ in any
    bit from the reference (``where(c >= 0, scale, -scale)`` per layer, zero positive)."""
    c = make_codec("signsgd", opts, seed=0)
    c.memory.track_transmitted = True
    ef, m = opts.get("error_feedback", True), opts.get("momentum", 0.0)
    sizes = [math.prod(x) for x in SHAPES]
    counts = torch.tensor(sizes)
    res = vel = torch.zeros(sum(sizes))
    for step in range(4):
        g = grads(step)
        flat = torch.cat([t.reshape(-1) for t in g])
        if m:
            flat = vel = m * vel + flat
        corrected = flat + res if ef else flat
        scales = torch.segment_reduce(corrected.abs(), "sum", lengths=counts) / counts.clamp_min(1)
        per = torch.repeat_interleave(scales, counts)
        sent = torch.where(corrected >= 0, per, -per)
        res = corrected - sent if ef else res
        msg = c.encode([t.clone() for t in g])
        assert same(msg.tensors, [scales, pack_bits(corrected >= 0, 1)])
        assert same([t.reshape(-1) for t in c.memory.transmitted], list(sent.split(sizes)))
        if ef:
            assert same([t.reshape(-1) for t in c.memory.residuals], list(res.split(sizes)))
        for k in (1, 3):
            want = torch.stack([sent] * k).sum(0) / k if k > 1 else sent
            assert same([t.reshape(-1) for t in c.aggregate([msg] * k)], list(want.split(sizes)))


@pytest.mark.parametrize("name,opts", [("qsgd", {"bucket_size": 16}), ("signsgd", {})])
def test_exchange_equals_aggregate_of_gathered_codes(name, opts, size_path):
    """Breaks if the overridden ``exchange`` (gathered buffers decoded as rows) differs from
    ``aggregate`` of the ranks' messages, or the ranks disagree."""
    world = 3
    per_rank = [grads(10 + r) for r in range(world)]

    def job(t):
        c = make_codec(name, opts, seed=2)
        return [x.clone() for x in c.exchange([x.clone() for x in per_rank[t.rank]], t)]

    outs = run_threads(world, job)
    msgs = []
    for r in range(world):
        c = make_codec(name, opts, seed=2)
        c.rank = r
        msgs.append(c.encode([x.clone() for x in per_rank[r]]))
    want = make_codec(name, opts, seed=2).aggregate(msgs)
    for out in outs:
        assert same(out, want)
