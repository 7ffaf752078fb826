"""LGC (M1) tests: plan and stages, the autoencoder (latent ~K/4, loss falls, identical copies),
reconstruction of the true mean of correlated gradients, and exact per-step bytes. Workers are
threads of this process (``codec_jobs.run_threads``); the spawned-process check is in
``test_codecs_dist.py``."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch

from codec_jobs import correlated_grads, mean_of, run_threads
from tandem.codecs import make_codec
from tandem.codecs.lgc.autoencoder import latent_size
from tandem.codecs.positions import positions_nbytes
from tandem.codecs.topk import keep_count
from tandem.errors import ConfigError
from tandem.transport import costs

SHAPES = [(8, 8), (8,), (128, 128), (128,), (64, 128), (64,), (10, 64), (10,)]
N, WARM, AE, COMP = 2, 3, 60, 25
#: ef_clip off: these tests check the exact error-feedback bookkeeping (nothing forgotten)
OPTS = {"ratio": 0.01, "innovation_ratio": 1e-4, "warmup_steps": WARM, "ae_steps": AE,
        "ae_iters": 2, "ae_lr": 3e-3, "ef_clip": 0}


@lru_cache(maxsize=2)
def run(variant: str) -> tuple:
    """Run WARM+AE+COMP steps of LGC on N threads; keep what the tests inspect."""
    grads = correlated_grads(SHAPES, N, WARM + AE + COMP, noise=0.05)

    def job(t):
        c = make_codec("lgc", {**OPTS, "variant": variant}, seed=0)
        cors, outs, sent = [], [], []
        for step in grads:
            cors.append(c.memory.corrected(step[t.rank]))
            outs.append(c.exchange(step[t.rank], t))
            sent.append(t.end_step().sent)
        return c, cors, outs, sent

    return grads, run_threads(N, job)


def flat(ts, idx):
    return torch.cat([ts[i].reshape(-1) for i in idx])


def test_plan_keeps_first_and_last_layers_dense_and_latent_is_quarter_k():
    """Breaks if the dense first/last layers (weight + bias) or K = sum ceil(rho * n_l) change,
    or if the encoder stops reducing K to ~K/4 floats (4 stride-2 convs to 4 channels)."""
    c = make_codec("lgc", OPTS)
    p = c.plan(SHAPES)
    assert p.dense == [0, 1, 6, 7] and p.comp == [2, 3, 4, 5]
    assert p.k == sum(math.ceil(0.01 * math.prod(SHAPES[i])) for i in p.comp)
    assert p.z == latent_size(p.k) and p.k / 4 <= p.z <= p.k / 4 + 4
    c.trainer(p, 1)
    z = c.ae.encode(torch.randn(p.k))
    assert z.numel() == p.z
    assert c.ae.decode(z).numel() == p.k


def test_stage_lengths_follow_total_steps():
    """Breaks if the 10% / 20% / rest schedule or ``set_total_steps`` stop working, or if an
    unknown run length is silently guessed."""
    c = make_codec("lgc")
    with pytest.raises(ConfigError, match="total_steps"):
        c.stage_lengths()
    c.set_total_steps(1000)
    assert c.stage_lengths() == (100, 200)
    assert [c.stage_at(s) for s in (0, 99, 100, 299, 300)] == [1, 1, 2, 2, 3]
    assert make_codec("lgc", {"total_steps": 50}).stage_lengths() == (5, 10)


@pytest.mark.parametrize("variant", ["rar", "ps"])
def test_autoencoder_learns_and_copies_stay_identical(variant):
    """Breaks if online training stops reducing the loss (lambda1 * recon + lambda2 * code
    similarity), or if the workers' copies drift apart (same seed, same gathered data, same
    order: no weight exchange is needed, so any drift would silently corrupt decoding)."""
    _, res = run(variant)
    losses = res[0][0].ae.losses
    assert len(losses) == AE
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    for c, *_ in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res[0][0].ae.model.parameters(),
                                                     c.ae.model.parameters(), strict=True))
        assert c.resyncs == 0
    info = res[0][0].describe()
    assert info["ae_params"] > 0 and info["ae_train_ms_per_step"] > 0
    assert info["codec_ms_per_step"] > 0 and info["ae_memory_bytes"] == 16 * info["ae_params"]


@pytest.mark.parametrize("variant", ["rar", "ps"])
def test_reconstructs_mean_of_correlated_gradients(variant):
    """Correlated synthetic gradients (common direction + 5% per-worker noise). Breaks if the
    compressed stage stops reconstructing the workers' mean on the shared positions within 25%
    relative error, if stage 2 is not exact there, if the ranks disagree, or if error feedback
    lets the sum of the updates drift from the sum of the true mean gradients (within 25%,
    top-k's own delay included)."""
    grads, res = run(variant)
    comp = [2, 3, 4, 5]
    errs = []
    for s in range(WARM + AE + COMP):
        out = flat(res[0][2][s], comp)
        assert all(torch.equal(out, flat(r[2][s], comp)) for r in res[1:])
        true = torch.stack([flat(r[1][s], comp) for r in res]).mean(0)
        sup = out != 0
        errs.append(float((out[sup] - true[sup]).norm() / true[sup].norm()))
    assert max(errs[WARM: WARM + AE]) < 1e-6
    assert max(errs[WARM + AE:]) < 0.25, errs[WARM + AE:]
    total_out = sum(flat(res[0][2][s], comp) for s in range(len(grads)))
    total_true = sum(flat(mean_of(g), comp) for g in grads)
    assert float((total_out - total_true).norm() / total_true.norm()) < 0.25


@pytest.mark.parametrize("variant", ["rar", "ps"])
def test_per_step_bytes_match_m1(variant):
    """Breaks if LGC sends more (or less) than M1 says, counted exactly by the meter. Per rank:
    dense layers all-reduced; stage 1 top-k all-gathered (fp32 value + a ceil(log2 D)-bit
    position per entry); stage 2 the leader's positions broadcast + fp32 values all-gathered;
    stage 3 the leader broadcasts positions + scale (+ its ~K/4-float latent in PS, + the m
    fix-up positions in RAR); then PS all-gathers each worker's innovation (a gain, m values,
    m positions) and RAR all-reduces the ~K/4-float latent with the m fix-up values and the
    dense layers."""
    c = make_codec("lgc", OPTS)
    p = c.plan(SHAPES)
    dense = 4 * sum(math.prod(SHAPES[i]) for i in p.dense)
    k, z, m = p.k, p.z, p.m
    d = sum(p.sizes)
    assert m == math.ceil(1e-4 * d)
    # positions travel in ceil(log2 D) bits (into the compressed range) or ceil(log2 K) bits
    # (into the leader's K-vector)
    pk, pm = positions_nbytes(k, d), positions_nbytes(m, k)
    assert pk == math.ceil(k * math.ceil(math.log2(d)) / 8) < 4 * k
    _, res = run(variant)
    for rank, (_, _, _, sent) in enumerate(res):
        for s, got in enumerate(sent):
            lead = rank == s % N
            ar = costs.all_reduce(dense, N).sent
            if s < WARM:  # the DGC ramp: k from warmup_start down to the plan's K
                kw = sum(keep_count(n, c.warmup_ratio(s)) for n in p.sizes)
                assert kw > k if s else kw == sum(keep_count(n, 0.05) for n in p.sizes)
                want = ar + costs.all_gather(4 * kw + positions_nbytes(kw, d), N).sent
            elif s < WARM + AE:
                want = ar + costs.broadcast(pk, N, lead).sent + costs.all_gather(4 * k, N).sent
            elif variant == "ps":
                want = (ar + costs.broadcast(pk + 4 + 4 * z, N, lead).sent
                        + costs.all_gather(4 + 4 * m + pm, N).sent)
            else:
                want = (costs.broadcast(pk + 4 + pm, N, lead).sent
                        + costs.all_reduce(dense + 4 * z + 4 * m, N).sent)
            assert got == want, (rank, s)


def test_whole_run_bytes_far_below_dense():
    """A 400k-parameter model at rho = 1e-3, N = 2, default 10% / 20% / 70% stages, all layers
    compressed. Breaks if the compressed stage costs more than 1/1000 of dense bytes per worker
    per step, or the whole run (top-k warm-up included) more than 1/100."""
    shapes = [(500, 400), (500,), (400, 500), (400,)]
    d = sum(math.prod(s) for s in shapes)
    opts = {"variant": "rar", "ratio": 1e-3, "dense_first_last": False, "warmup_steps": 2,
            "ae_steps": 2}
    gen = torch.Generator().manual_seed(0)
    g = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(N)]

    def job(t):
        c = make_codec("lgc", opts)
        per = []
        for _ in range(6):
            c.exchange(g[t.rank], t)
            per.append(t.end_step().sent)
        return per

    per = run_threads(N, job)
    avg = [sum(r[s] for r in per) / N for s in range(6)]
    dense = costs.all_reduce(4 * d, N).sent
    stage = [(avg[0] + avg[1]) / 2, (avg[2] + avg[3]) / 2, (avg[4] + avg[5]) / 2]
    assert stage[2] <= dense / 1000
    assert 0.1 * stage[0] + 0.2 * stage[1] + 0.7 * stage[2] <= dense / 100


def test_ps_reconstruction_is_contractive_for_each_worker():
    """LGC-PS regression: each worker's reconstruction (the decoder's prediction from the
    leader's latent, plus innovations) must never be farther from its own values than sending
    nothing, or error feedback keeps ``-prediction`` and the residuals grow without bound (the
    benchmark run diverged to NaN). Worker 1's gradients are 1000x smaller than the leader's and
    the decoders barely trained, the worst case for a prediction carrying the leader's scale."""
    opts = {"variant": "ps", "ratio": 0.02, "innovation_ratio": 1e-4, "warmup_steps": 0,
            "ae_steps": 2, "leader": "fixed", "dense_first_last": False}

    def job(t):
        c = make_codec("lgc", opts, seed=0)
        c.memory.track_transmitted = True
        gen = torch.Generator().manual_seed(5 + t.rank)
        scale = 1.0 if t.rank == 0 else 1e-3
        ratios = []
        for step in range(8):
            g = [torch.randn(s, generator=gen) * scale for s in SHAPES]
            cor = c.memory.corrected(g)
            c.exchange(g, t)
            if step >= 2:
                x = torch.cat([a.reshape(-1) for a in cor])
                sent = torch.cat([a.reshape(-1) for a in c.memory.transmitted])
                sup = sent != 0
                ratios.append(float((x[sup] - sent[sup]).norm() / x[sup].norm()))
        return ratios

    for ratios in run_threads(2, job):
        assert max(ratios) <= 1.0 + 1e-5, ratios


def test_rar_guard_keeps_error_feedback_bounded():
    """LGC-RAR regression: with an autoencoder that has barely trained (2 stage-2 steps), the
    latent round reconstructs the workers' values worse than sending nothing; error feedback
    then keeps ``-reconstruction`` and, with ``rar_fallback="off"``, the residuals grow
    geometrically (checked below: past 100x the sum of all gradient norms). With the guard
    (default ``best``) the leader sees that its own code loses and the round falls back to
    exact values on its largest positions, a split of the entries: every fallback round and
    every leader round is contractive (``||r_next|| <= ||g + r||``), so ``||r_T||`` stays
    below the sum of the gradient norms. Breaks if the guard stops firing, if a fallback round
    is not a plain split, or if the leader's choice is not applied identically everywhere."""
    shapes = [(8, 8), (8,), (128, 128), (128,), (64, 128), (64,), (10, 64), (10,)]
    steps = 2 + 2 + 40
    grads = correlated_grads(shapes, 2, steps, noise=0.05)
    base = {"variant": "rar", "ratio": 0.01, "innovation_ratio": 1e-4, "warmup_steps": 2,
            "ae_steps": 2, "dense_first_last": False, "ef_clip": 0}

    def job(mode):
        def body(t):
            c = make_codec("lgc", {**base, "rar_fallback": mode}, seed=0)
            norms, bound, ok = [], 0.0, True
            for s, step in enumerate(grads):
                x = torch.cat([a.reshape(-1) for a in c.memory.corrected(step[t.rank])])
                before = c.fallbacks
                c.exchange(step[t.rank], t)
                r = float(torch.cat([a.reshape(-1) for a in c.memory.residuals]).norm())
                bound += float(torch.cat([a.reshape(-1) for a in step[t.rank]]).norm())
                if s >= 4 and (c.fallbacks > before or s % 2 == t.rank):
                    ok &= r <= float(x.norm()) * (1 + 1e-6)
                norms.append(r)
            return norms, bound, ok, c.fallbacks
        return body

    for norms, bound, ok, fell in run_threads(2, job("best")):
        assert ok and fell > 0
        assert max(norms) <= bound, (max(norms), bound)
    for norms, bound, _, fell in run_threads(2, job("off")):
        assert fell == 0 and norms[-1] > 100 * bound  # what the guard prevents



@pytest.mark.parametrize("name,variant", [("lgc", "rar"), ("lgc", "ps"), ("topk", None)])
def test_ef_clip_caps_the_residual(name, variant):
    """``ef_clip`` (LGC's default 2; top-k's option, default off): after every exchange the
    residual's norm is at most ``ef_clip * ||u||``, u = this step's momentum-corrected gradient
    ``0.9 v + g``, in every stage, and the cap binds at rho = 1e-3 (without it the residual
    grows past it). Breaks if the cap is skipped, applied to a copy (the per-layer residual
    views must see it) or measured against the wrong norm."""
    shapes = [(8, 8), (8,), (128, 128), (128,), (64, 128), (64,), (10, 64), (10,)]
    grads = correlated_grads(shapes, 2, 16, noise=0.5)
    base = {"ratio": 1e-3, "momentum": 0.9, "ef_clip": 2.0}
    if name == "lgc":
        base.update(variant=variant, warmup_steps=3, ae_steps=5, dense_first_last=False)

    def job(opts):
        def body(t):
            c = make_codec(name, {**base, **opts}, seed=0)
            ratios = []
            for step in grads:
                g = torch.cat([a.reshape(-1) for a in step[t.rank]])
                vel = c.memory.velocity
                v = g * 0 if vel is None else torch.cat([a.reshape(-1) for a in vel])
                c.exchange(step[t.rank], t)
                r = torch.cat([a.reshape(-1) for a in c.memory.residuals])
                ratios.append(float(r.norm() / (0.9 * v + g).norm()))
            return ratios
        return body

    capped = run_threads(2, job({}))
    assert max(max(r) for r in capped) <= 2.0 * (1 + 1e-5)
    free = run_threads(2, job({"ef_clip": 0}))
    assert max(max(r) for r in free) > 2.5


def test_large_k_runs_the_convolutions_and_agrees_with_the_matrix_form(monkeypatch):
    """Breaks if the frozen autoencoder's matrix form (O(K^2) memory: 4 GB of activations to
    read off at ResNet-18's K) were used beyond AFFINE_MAX_K, or if the two forms disagreed."""
    from tandem.codecs.lgc import autoencoder as lgc_ae

    ae = lgc_ae.AETrainer(40, 3, seed=1)
    gen = torch.Generator().manual_seed(2)
    ae.train_step(torch.randn(3, 40, generator=gen), leader=0)
    v = torch.randn(40, generator=gen)
    assert ae.linear
    z, d, all_d = ae.encode(v), ae.decode(v[:12], 2), ae.decode_all(v[:12])
    monkeypatch.setattr(lgc_ae, "AFFINE_MAX_K", 39)
    assert not ae.linear
    torch.testing.assert_close(ae.encode(v), z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ae.decode(v[:12], 2), d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ae.decode_all(v[:12]), all_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(all_d[2], d)


@pytest.mark.parametrize("variant", ["ps", "rar"])
@pytest.mark.parametrize("shapes", [[(5, 7), (3,)], [(2, 3, 4), (), (1,), (40, 9)]])
def test_one_worker_runs_every_stage(variant, shapes):
    """Breaks if LGC cannot run alone (one worker, e.g. ``--workers 1``) through all three
    stages on awkward layer shapes (scalars, one-entry layers): LGC-PS's innovation rows of a
    single message did not view as floats once its byte length was not a multiple of 4.
    Alone, the mean is this worker's own reconstruction, so nothing may come back non-finite."""
    codec = make_codec("lgc", {"variant": variant, "dense_first_last": False, "ratio": 0.2,
                               "warmup_steps": 2, "ae_steps": 3, "total_steps": 8}, seed=0)
    gen = torch.Generator().manual_seed(0)

    def job(t):
        outs = []
        for _ in range(8):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            outs.append(codec.exchange(grads, t))
        return outs

    outs = run_threads(1, job)[0]
    assert codec.stage_at(7) == 3 and codec.step == 8
    for out in outs:
        assert [tuple(o.shape) for o in out] == [tuple(s) for s in shapes]
        assert all(bool(torch.isfinite(o).all()) for o in out)


def test_warns_when_no_layer_is_compressed(caplog):
    """Breaks if LGC silently sends everything dense: with ``dense_first_last`` a two-layer
    model has no compressed layer, and the user must be told how to change that."""
    import logging

    codec = make_codec("lgc", {"total_steps": 10}, seed=0)
    logger = logging.getLogger("tandem.codecs.lgc")
    logger.addHandler(caplog.handler)
    try:
        assert codec.plan([(64, 8), (64,), (10, 64), (10,)]).k == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert "dense_first_last=false" in caplog.text
    caplog.clear()
    logger.addHandler(caplog.handler)
    try:
        assert codec.plan([(4, 8), (4,), (64, 4), (64,), (10, 64), (10,)]).k > 0
    finally:
        logger.removeHandler(caplog.handler)
    assert "no layer" not in caplog.text
