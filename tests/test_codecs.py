"""Codec tests in one process: round trips, error-feedback invariants, unbiasedness, exactness,
packed sizes, state_dict round trips. Multi-worker exchanges run on threads (``codec_jobs``)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_jobs import run_threads
from tandem.codecs import CODECS, describe_codecs, make_codec
from tandem.codecs.bits import pack_bits, packed_size, unpack_bits
from tandem.codecs.qsgd import bucket_counts, level_bits
from tandem.errors import ConfigError

SHAPES = [(32, 16), (32,), (64, 32), (64,), (10, 64), (10,)]
D = sum(math.prod(s) for s in SHAPES)
ALL = ["dense", "fp16", "bf16", "topk", "randomk", "qsgd", "powersgd", "signsgd", "lgc"]
LGC_SMALL = {"ratio": 0.05, "warmup_steps": 1, "ae_steps": 2}


def grads(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_registry_lists_every_codec_with_documented_options():
    """Breaks if a codec is not registered, or the `tandem codecs` listing loses options."""
    assert set(ALL) <= set(CODECS)
    rows = {r["name"]: r for r in describe_codecs()}
    assert rows["topk"]["transfer"] == "gather" and rows["randomk"]["transfer"] == "sum"
    assert rows["topk"]["options"]["ratio"]["default"] == 0.01
    assert rows["lgc"]["options"]["variant"]["default"] in ("ps", "rar")
    for r in rows.values():
        assert r["summary"]
        for opt in r["options"].values():
            assert opt["description"], r["name"]
    with pytest.raises(Exception, match="extra"):
        make_codec("topk", {"ratoi": 0.1})
    with pytest.raises(ConfigError):
        make_codec("nope")


def test_dense_round_trip_exact():
    """Breaks if dense loses or reorders anything (it is the DDP-equivalent baseline)."""
    c = make_codec("dense")
    g = grads(0)
    assert all(torch.equal(a, b) for a, b in zip(g, c.decode(c.encode(g)), strict=True))


@pytest.mark.parametrize("name,tol", [("fp16", 1e-3), ("bf16", 8e-3)])
def test_half_precision_within_tolerance(name, tol):
    """Breaks if the cast codecs lose more than their format's rounding (2^-11 / 2^-8 rel.),
    or if the prescaled all-reduce stops returning the mean."""
    c = make_codec(name)
    g = grads(1)
    for a, b in zip(g, c.decode(c.encode(g)), strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=1e-6)
    per = [grads(10 + r) for r in range(3)]
    outs = run_threads(3, lambda t: make_codec(name).exchange(per[t.rank], t))
    mean = [torch.stack(p).mean(0) for p in zip(*per, strict=True)]
    for a, b in zip(mean, outs[0], strict=True):
        torch.testing.assert_close(b, a, rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_topk_keeps_the_k_largest(scope):
    """Breaks if top-k keeps anything but the largest |entries| (per layer or overall), or if
    its message is not 8 bytes per kept entry."""
    c = make_codec("topk", {"ratio": 0.1, "scope": scope, "error_feedback": False})
    g = grads(2)
    msg = c.encode(g)
    out = flat(c.decode(msg))
    f = flat(g)
    if scope == "global":
        k = math.ceil(0.1 * D)
        assert set(out.nonzero().flatten().tolist()) == set(f.abs().topk(k).indices.tolist())
    else:
        k, off = 0, 0
        for s in SHAPES:
            n, kl = math.prod(s), math.ceil(0.1 * math.prod(s))
            want = f[off: off + n].abs().topk(kl).indices + off
            got = out[off: off + n].nonzero().flatten().add(off)
            assert set(got.tolist()) == set(want.tolist())
            off, k = off + n, k + kl
    assert torch.equal(out[out != 0], f[out != 0])
    assert msg.nbytes == 8 * k


def test_topk_packed_positions_send_the_same_entries_in_fewer_bytes():
    """Breaks if packed positions change what top-k sends (decode, aggregate and the threaded
    all-gather must equal the int32 code's exactly), or if the code is not ``4k + P(k, D)``
    bytes (LGC's position encoding, so the two compare at equal bytes)."""
    from tandem.codecs.positions import positions_nbytes

    g = grads(4)
    plain = make_codec("topk", {"ratio": 0.05})
    packed = make_codec("topk", {"ratio": 0.05, "positions": "packed"})
    a, b = plain.encode(g), packed.encode(g)
    k = a.tensors[0].numel()
    assert b.nbytes == 4 * k + positions_nbytes(k, D) < a.nbytes == 8 * k
    assert all(torch.equal(x, y) for x, y in zip(plain.decode(a), packed.decode(b), strict=True))
    assert all(torch.equal(x, y) for x, y in
               zip(plain.aggregate([a, a]), packed.aggregate([b, b]), strict=True))
    per = [grads(20 + r) for r in range(3)]
    outs = {mode: run_threads(3, lambda t, mode=mode: make_codec(
        "topk", {"ratio": 0.05, "positions": mode}).exchange(per[t.rank], t))
        for mode in ("int32", "packed")}
    for x, y in zip(outs["int32"][0], outs["packed"][0], strict=True):
        assert torch.equal(x, y)


def test_randomk_residual_cap_bounds_the_residual_and_keeps_the_sent_values():
    """Breaks if random-k's ``ef_clip`` does not cap the residual at ``ef_clip`` x the step's
    gradient norm, or if it changes what is sent (the cap acts only on what is kept)."""
    capped = make_codec("randomk", {"ratio": 0.05, "ef_clip": 1.0})
    plain = make_codec("randomk", {"ratio": 0.05})
    for step in range(5):
        g = grads(30 + step)
        a, b = plain.encode(g), capped.encode(g)
        if step == 0:
            assert torch.equal(a.tensors[0], b.tensors[0])
        r = flat(capped.memory.residuals)
        assert float(r.norm()) <= 1.0 * float(flat(g).norm()) * (1 + 1e-6)
        plain.step += 1
        capped.step += 1
    assert float(flat(plain.memory.residuals).norm()) > float(flat(g).norm())


def test_topk_warmup_ramp_is_exponential():
    """Breaks if the DGC ramp does not start at warmup_start and reach ratio on schedule."""
    c = make_codec("topk", {"ratio": 0.001, "warmup_steps": 4, "warmup_start": 0.25})
    got = [c.ratio_at(s) for s in range(6)]
    assert got[0] == 0.25 and got[4] == got[5] == 0.001
    assert all(math.isclose(got[i + 1] / got[i], (0.001 / 0.25) ** 0.25) for i in range(3))


@pytest.mark.parametrize("name", ["topk", "randomk", "signsgd", "powersgd", "lgc"])
def test_error_feedback_invariant(name):
    """original (g + r_prev) == transmitted + residual. Breaks if a codec drops or double-counts
    the part it did not send. Top-k and random-k split the entries between transmitted and
    residual, so the identity holds bitwise. Sign, PowerSGD and LGC's compressed stage (a
    decoded approximation on the shared positions) subtract a dense approximation, where IEEE
    arithmetic allows exactly one rounding: there the residual must be bitwise
    ``corrected - transmitted`` and the sum within 1e-5 of the original."""
    opts = LGC_SMALL if name == "lgc" else {}
    shapes = SHAPES

    def job(t):
        c = make_codec(name, opts, seed=0)
        c.memory.track_transmitted = True
        checks = []
        for step in range(4):
            g = grads(100 * step + t.rank, shapes)
            cor = c.memory.corrected(g)
            c.exchange(g, t)
            for a, tr, r in zip(cor, c.memory.transmitted, c.memory.residuals, strict=True):
                checks.append((torch.equal(r, a - tr), torch.equal(a, tr + r),
                               float((a - (tr + r)).abs().max())))
        return checks

    for checks in run_threads(2, job):
        assert all(c[0] for c in checks)
        if name in ("topk", "randomk"):
            assert all(c[1] for c in checks)
        else:
            assert max(c[2] for c in checks) < 1e-5


def test_qsgd_is_unbiased():
    """Breaks if QSGD's stochastic rounding is biased. One 64-entry bucket is tiled M times
    (each copy its own bucket, so M independent roundings per encode). Each decoded entry has
    variance at most (||bucket|| / s)^2 / 4, so the mean of the M*steps draws lies within
    5 * ||bucket|| / (2 s sqrt(M*steps)) of the truth (5 sigma; deterministic seeds)."""
    s, m, steps = 3, 2000, 4
    base = torch.randn(64, generator=torch.Generator().manual_seed(3))
    c = make_codec("qsgd", {"levels": s, "bucket_size": 64})
    acc = torch.zeros(64)
    for i in range(steps):
        c.step = i
        acc += c.decode(c.encode([base.repeat(m)]))[0].view(m, 64).sum(0)
    mean = acc / (m * steps)
    bound = 5 * base.norm() / (2 * s * math.sqrt(m * steps))
    assert ((mean - base).abs() <= bound).all()
    assert (mean - base).abs().mean() < 0.3 * bound
    one = c.decode(c.encode([base]))[0]
    assert set((one.abs() * s / base.norm()).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("levels,bucket", [(15, 512), (1, 0), (127, 100)])
def test_qsgd_packed_size_formula(levels, bucket):
    """Breaks if QSGD's bits are not really packed: 4 bytes per norm + ceil(D*(w+1)/8)."""
    c = make_codec("qsgd", {"levels": levels, "bucket_size": bucket})
    g = grads(4)
    msg = c.encode(g)
    w = level_bits(levels)
    assert msg.tensors[1].dtype == torch.uint8
    assert msg.nbytes == 4 * len(bucket_counts(tuple(SHAPES), bucket)) + math.ceil(D * (w + 1) / 8)


def test_signsgd_packs_one_bit_per_entry():
    """Breaks if sign codes are not 1 bit per entry plus one fp32 scale per layer, or if the
    decoded value is not mean|g| * sign(g)."""
    c = make_codec("signsgd", {"error_feedback": False})
    g = grads(5)
    msg = c.encode(g)
    assert msg.nbytes == 4 * len(SHAPES) + math.ceil(D / 8)
    for a, b in zip(g, c.decode(msg), strict=True):
        want = a.abs().mean() * torch.where(a >= 0, 1.0, -1.0)
        torch.testing.assert_close(b, want)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), min_size=0, max_size=50))
def test_bit_packing_round_trip(width, values):
    """Breaks if pack/unpack lose bits or the buffer is not exactly ceil(n*width/8) bytes."""
    codes = torch.tensor([v % (1 << width) for v in values], dtype=torch.int64)
    buf = pack_bits(codes, width)
    assert buf.dtype == torch.uint8 and buf.numel() == packed_size(len(values), width)
    assert torch.equal(unpack_bits(buf, len(values), width), codes)


@pytest.mark.parametrize("workers", [1, 2])
def test_powersgd_exact_on_rank_r(workers):
    """Breaks if the P all-reduce, orthogonalisation or Q all-reduce are wrong: when the
    workers' mean matrix has rank <= r, one PowerSGD step returns it exactly."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(40, 3, generator=gen)
    per = [[a @ torch.randn(3, 30, generator=gen), torch.randn(40, generator=gen)]
           for _ in range(workers)]
    outs = run_threads(workers, lambda t: make_codec("powersgd", {"rank": 3}).exchange(
        per[t.rank], t))
    for i in range(2):
        want = torch.stack([p[i] for p in per]).mean(0)
        for out in outs:
            torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-4)


def test_powersgd_dense_steps_send_the_whole_gradient_first():
    """Breaks if ``dense_steps`` (torch's start_powerSGD_iter) does not return the exact mean
    for its first steps, keeps a residual from them, charges other than one dense all-reduce,
    or does not compress afterwards; and if a point-to-point receiver cannot decode a whole
    message on its own."""
    per = [[grads(40 + r + 10 * s) for s in range(3)] for r in range(2)]
    total = sum(math.prod(s) for s in SHAPES)

    def job(t):
        c = make_codec("powersgd", {"rank": 1, "dense_steps": 2}, seed=3)
        outs, sent = [], []
        for s in range(3):
            before = t.meter.sent_total()
            outs.append(c.exchange(per[t.rank][s], t))
            sent.append(t.meter.sent_total() - before)
            if s == 1:
                assert all(not r.any() for r in c.residuals)  # nothing owed after dense steps
        return outs, sent

    res = run_threads(2, job)
    for s in range(2):
        want = [torch.stack([per[r][s][i] for r in range(2)]).mean(0) for i in range(len(SHAPES))]
        for outs, _ in res:
            for got, w in zip(outs[s], want, strict=True):
                torch.testing.assert_close(got, w)
    dense_bytes = res[0][1][0]
    assert res[0][1][1] == dense_bytes and dense_bytes >= 4 * total  # 2(N-1)/N = 1 at N = 2
    assert res[0][1][2] < dense_bytes / 4  # compressed from step 2 on
    enc, dec = make_codec("powersgd", {"dense_steps": 1}), make_codec("powersgd")
    g = grads(50)
    msg = enc.encode(g)
    assert msg.meta["whole"] and len(msg.tensors) == 1
    assert all(torch.equal(a, b) for a, b in zip(g, dec.decode(msg), strict=True))


def test_randomk_workers_share_positions_and_sum():
    """Breaks if random-k's workers pick different positions (then all-reduced values would
    be summed at the wrong places) or the exchange is not the mean of the transmitted parts."""
    per = [grads(20 + r) for r in range(3)]

    def job(t):
        c = make_codec("randomk", {"ratio": 0.1}, seed=7)
        c.memory.track_transmitted = True
        out = c.exchange(per[t.rank], t)
        return out, c.memory.transmitted

    res = run_threads(3, job)
    supports = [flat(tr).nonzero().flatten() for _, tr in res]
    assert all(torch.equal(supports[0], s) for s in supports)
    want = torch.stack([flat(tr) for _, tr in res]).mean(0)
    torch.testing.assert_close(flat(res[0][0]), want)


@pytest.mark.parametrize("name", ["topk", "qsgd", "signsgd", "powersgd"])
def test_exchange_is_mean_of_what_workers_transmitted(name):
    """Breaks if a codec's exchange disagrees with its own decode (gathered codes decoded in
    the wrong order, factors averaged wrongly): every rank gets the same mean of the
    workers' reconstructions."""
    per = [grads(30 + r) for r in range(3)]

    def job(t):
        c = make_codec(name, {}, seed=0)
        c.memory.track_transmitted = True
        if name == "qsgd":
            c.rank = t.rank
            mine = c.decode(c.encode(per[t.rank]))
            c.rank = 0
            out = c.exchange(per[t.rank], t)
            return out, mine
        out = c.exchange(per[t.rank], t)
        return out, c.memory.transmitted

    res = run_threads(3, job)
    want = torch.stack([flat(m) for _, m in res]).mean(0)
    for out, _ in res:
        torch.testing.assert_close(flat(out), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(flat(out), flat(res[0][0]))


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    """Breaks if a checkpoint misses codec state (residuals, PowerSGD's Q, LGC's autoencoder
    and optimiser, the step): after save/load, encode and exchange equal an uninterrupted run."""
    opts = LGC_SMALL if name == "lgc" else {}

    def job(t):
        a = make_codec(name, opts, seed=3)
        for step in range(3):
            a.exchange(grads(step * 10 + t.rank), t)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b = make_codec(name, opts, seed=3)
        b.load_state_dict(torch.load(buf, weights_only=False))
        same = []
        for step in range(3, 5):
            g = grads(step * 10 + t.rank)
            sa, sb = a.state_dict(), b.state_dict()
            ma, mb = a.encode(g), b.encode(g)
            same.append(all(torch.equal(x, y)
                            for x, y in zip(ma.tensors, mb.tensors, strict=True)))
            a.load_state_dict(sa)
            b.load_state_dict(sb)
            oa, ob = a.exchange(g, t), b.exchange(g, t)
            same.append(all(torch.equal(x, y) for x, y in zip(oa, ob, strict=True)))
        return same

    assert all(all(s) for s in run_threads(2, job))


@pytest.mark.parametrize("name", ALL)
def test_message_level_decodes_on_a_separate_receiver(name):
    """The parameter-server path: a worker encodes, a server's own codec instance (same seed,
    ``step`` set from the push header) decodes. Breaks if a code needs state that never
    travels, or if ``meta`` changes from step to step (the PS strategy sends meta only when it
    changes, so per-step metadata, e.g. random-k positions, would be charged every push)."""
    opts = {"total_steps": 30} if name == "lgc" else {}
    worker, server = make_codec(name, opts, seed=5), make_codec(name, opts, seed=5)
    metas = []
    for step in range(3):
        worker.step = server.step = step
        msg = worker.encode(grads(40 + step))
        metas.append(repr(msg.meta))
        mine, theirs = worker.decode(msg), server.decode(msg)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert metas[0] == metas[1] == metas[2]


def test_momentum_correction_equals_optimizer_momentum_for_dense():
    """DGC momentum correction in the codec with the optimizer's momentum at 0 must equal the
    optimizer's momentum for a linear codec (the mean of the velocities is the velocity of the
    mean). Breaks if the codec's velocity is wrong, kept per call instead of across steps, or
    applied twice; also checks that it survives a checkpoint."""
    m = 0.9

    def job(t):
        c = make_codec("dense", {"momentum": m}, seed=0)
        buf, out = torch.zeros(sum(g.numel() for g in grads(0))), []
        for step in range(5):
            g = grads(10 * step + t.rank)
            mean = torch.cat([x.reshape(-1) for x in c.exchange(g, t)])
            if step == 2:  # checkpoint and resume mid-run
                state = c.state_dict()
                c = make_codec("dense", {"momentum": m}, seed=0)
                c.load_state_dict(state)
            out.append(mean)
        return out, buf

    res = run_threads(2, job)
    vel = None
    for step in range(5):
        g = torch.stack([flat(grads(10 * step + r)) for r in range(2)]).mean(0)
        vel = g if vel is None else m * vel + g
        assert torch.allclose(res[0][0][step], vel, atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "randomk"])
def test_momentum_factor_masking_zeroes_sent_entries(name):
    """Sparse codecs with momentum correction: the local velocity is zero exactly where entries
    were sent (DGC's momentum factor masking) and ``m * u + g`` elsewhere; with
    ``momentum_masking=false`` it is never zeroed."""
    for masking in (True, False):
        c = make_codec(name, {"ratio": 0.1, "momentum": 0.5, "momentum_masking": masking})
        c.memory.track_transmitted = True
        g0, g1 = grads(0), grads(1)
        c.encode(g0)
        sent0 = [t != 0 for t in c.memory.transmitted]
        for u, g, s in zip(c.memory.velocity, g0, sent0, strict=True):
            want = g.masked_fill(s, 0.0) if masking else g
            assert torch.equal(u, want)
        u_prev = [u.clone() for u in c.memory.velocity]
        cor = c.memory.corrected(g1)
        c.encode(g1)
        mem = c.memory
        for u, up, g, r, x in zip(mem.velocity, u_prev, g1, mem.residuals, cor, strict=True):
            fresh = 0.5 * up + g
            assert torch.equal(torch.where(r == x, u, fresh), fresh)  # unsent: m * u + g


def test_flat_buffers_round_trip():
    """Breaks if ``tandem.flat`` stops giving a fresh fp32 copy (never a view of a lone input),
    views that write through, exact shapes (empty ones too), or refusing a size mismatch."""
    from tandem.flat import flatten, unflatten

    g = grads(7)
    f = flatten(g)
    assert f.dtype == torch.float32 and torch.equal(f, flat(g))
    one = flatten([g[0]])
    one += 1
    assert not torch.equal(one, g[0].reshape(-1))
    views = unflatten(f, SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(views, g, strict=True))
    views[1].zero_()
    assert not f[512:544].any()
    assert flatten([]).numel() == 0 and flatten([g[0].half()]).dtype == torch.float32
    assert [tuple(v.shape) for v in unflatten(torch.ones(3), [(0, 5), (3,)])] == [(0, 5), (3,)]
    with pytest.raises(ValueError):
        unflatten(f[1:], SHAPES)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_memory_flat_and_per_layer_paths_agree(momentum):
    """Breaks if the two ways of using ``ErrorFeedback`` (per layer, one flat buffer) stop
    computing the same corrected gradient, residual and velocity, if the ``feedback`` switch
    stops turning the residual off, or if the checkpoint keys change."""
    from tandem.flat import unflatten

    per, fl = (make_codec("topk", {"ratio": 0.1, "momentum": momentum}) for _ in range(2))
    for step in range(3):
        g = grads(60 + step)
        cor = per.memory.corrected(g)
        x = fl.memory.corrected_flat(g)
        assert torch.equal(flat(cor), x)
        sent = x.abs().topk(50).indices
        tr = torch.zeros_like(x)
        tr[sent] = x[sent]
        per.memory.keep(cor, unflatten(tr, SHAPES), sent=list(unflatten(tr != 0, SHAPES)))
        fl.memory.keep_flat(x, split=sent)
        assert torch.equal(flat(per.memory.residuals), flat(fl.memory.residuals))
        if momentum:
            assert torch.equal(flat(per.memory.velocity), flat(fl.memory.velocity))
    assert set(fl.state_dict()) == {"step", "total_steps", "rank", "residuals", "velocity"}
    off = make_codec("topk", {"ratio": 0.1})
    off.feedback = False
    off.encode(grads(0))
    assert off.residuals is None and not off.memory.active
