"""Codecs over real gloo processes: packed sizes equal the formulas and the transport's meter,
every rank gets the same result, LGC's autoencoder copies agree across processes, and a DDP
run with Tandem's dense comm hook equals plain DDP."""

from __future__ import annotations

import math

import pytest
import torch

from codec_jobs import (
    codec_bytes_job,
    ddp_hook_error_job,
    ddp_job,
    ddp_lgc_job,
    lgc_expected_sent,
)
from tandem.codecs import make_codec
from tandem.codecs.qsgd import bucket_counts, level_bits
from tandem.codecs.topk import keep_count
from tandem.launch import spawn
from tandem.transport import costs

SHAPES = [(16, 8), (16,), (64, 48), (64,), (10, 64), (10,)]
LGC = {"ratio": 0.02, "innovation_ratio": 1e-3, "warmup_steps": 2, "ae_steps": 3}
LGC_STEPS = 7


def expected_nbytes(name: str) -> int:
    """The code size each codec must have, from its documented formula."""
    d = sum(math.prod(s) for s in SHAPES)
    if name == "dense":
        return 4 * d
    if name in ("fp16", "bf16"):
        return 2 * d
    if name == "topk":
        return 8 * sum(keep_count(math.prod(s), 0.01) for s in SHAPES)
    if name == "randomk":
        return 4 * keep_count(d, 0.01)
    if name == "qsgd":
        return 4 * len(bucket_counts(tuple(SHAPES), 512)) + math.ceil(d * (level_bits(15) + 1) / 8)
    if name == "signsgd":
        return 4 * len(SHAPES) + math.ceil(d / 8)
    if name == "powersgd":
        mats = [s for s in SHAPES if len(s) == 2 and 4 * (s[0] + s[1]) < s[0] * s[1]]
        dense = d - sum(math.prod(s) for s in mats)
        return 4 * (sum(4 * (n + m) for n, m in mats) + dense)
    raise KeyError(name)


def test_packed_sizes_equal_formula_and_meter():
    """Breaks if a code's ``nbytes`` differs from its formula (bits not really packed), if the
    meter charges an exchange other than the collective's cost for those bytes (all-gather:
    (N-1) * nbytes; all-reduce: 2(N-1)/N * nbytes; PowerSGD: its two all-reduces), if the ranks
    get different results, or if LGC's per-step bytes or cross-process AE copies disagree."""
    world = 3
    res = spawn(codec_bytes_job, world, SHAPES, LGC, LGC_STEPS, timeout_s=120)
    for name in ("dense", "fp16", "bf16", "topk", "randomk", "qsgd", "powersgd", "signsgd"):
        nb = expected_nbytes(name)
        for r in res:
            assert r[name]["nbytes"] == nb, name
            if name == "powersgd":
                mats = [s for s in SHAPES if len(s) == 2 and 4 * (s[0] + s[1]) < s[0] * s[1]]
                q = 4 * sum(4 * m for _, m in mats)
                want = costs.all_reduce(nb - q, world).sent + costs.all_reduce(q, world).sent
            elif make_codec(name).transfer == "sum":
                want = costs.all_reduce(nb, world).sent
            else:
                want = costs.all_gather(nb, world).sent
            assert r[name]["sent"] == want, name
            assert torch.equal(r[name]["result"], res[0][name]["result"]), name
    lgc = make_codec("lgc", LGC)
    plan = lgc.plan(SHAPES)
    for variant in ("rar", "ps"):
        key = f"lgc-{variant}"
        for rank, r in enumerate(res):
            want = [lgc_expected_sent(plan, variant, s, rank, world, 2, 3,
                                      sum(keep_count(n, lgc.warmup_ratio(s)) for n in plan.sizes))
                    for s in range(LGC_STEPS)]
            assert r[key]["sent"] == want, (variant, rank)
            assert r[key]["resyncs"] == 0
            assert torch.equal(r[key]["checksum"], res[0][key]["checksum"])


def test_ddp_dense_hook_equals_plain_ddp():
    """Breaks if ``ddp_hook`` does not return the bucket mean in DDP's layout (per-bucket codec
    instances with small buckets), so that 20 steps with the dense hook drift from plain DDP,
    overlapped (the exchanges on the hook's thread) or inline; or if a compressing hook (top-k)
    stops running or stops saving bytes."""
    res = spawn(ddp_job, 2, 20, timeout_s=120)
    for r in res:
        assert r["buckets"] > 1
        assert "tandem-ddp-hook" in r["threads"]  # the overlapped hook did use its thread
        for a, b, c in zip(r["plain"], r["hooked"], r["inline"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
        assert 0 < r["topk_sent"] < r["dense_sent"] / 4  # 8 bytes x 10% vs 4 bytes
        assert all(math.isfinite(x) for x in r["topk_losses"])
    for a, b in zip(res[0]["hooked"], res[1]["hooked"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("overlap", [True, False])
def test_ddp_hook_error_surfaces_from_backward(overlap):
    """Breaks if an exchange that fails inside the hook is lost (the overlapped hook runs it on
    another thread): backward must raise at that step, with the codec's message."""
    for msg in spawn(ddp_hook_error_job, 2, overlap, timeout_s=90):
        assert msg.startswith("step 2:") and "codec failed at step 2" in msg, msg


@pytest.mark.parametrize("overlap", [True, False])
def test_ddp_hook_runs_lgc_through_every_stage(overlap):
    """Breaks if LGC cannot run as a DDP hook: DDP calls the hook inside backward, where
    autograd is off, and LGC's autoencoder trains in stage 2 (inline, that raised "does not
    require grad"); the ranks must end with the same parameters."""
    res = spawn(ddp_lgc_job, 2, overlap, timeout_s=120)
    for r in res:
        # DDP rebuilds its bucket after step 1: that layout's codec runs steps 1-9 (stage 2 =
        # steps 2-5: one autoencoder step each), the first layout's only step 0
        assert max(r["steps"]) == 10
        assert r["ae_losses"] == [4]
        assert all(bool(torch.isfinite(p).all()) for p in r["params"])
    for a, b in zip(res[0]["params"], res[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_every_transport_provides_the_codecs_collectives():
    """Breaks if the transport, the DDP adapter or the tests' thread transport lose a method
    or a keyword that codecs call (``tandem.codecs.collectives.Collectives``)."""
    import inspect

    from codec_jobs import ThreadTransport, ThreadWorld
    from tandem.codecs.collectives import Collectives
    from tandem.transport.process_group import ProcessGroupTransport
    from tandem.transport.transport import Transport

    for cls in (Transport, ProcessGroupTransport, ThreadTransport):
        for name in ("all_reduce", "all_gather", "broadcast"):
            want = inspect.signature(getattr(Collectives, name)).parameters
            got = inspect.signature(getattr(cls, name)).parameters
            assert set(want) <= set(got), (cls.__name__, name, set(want) - set(got))
    assert isinstance(ThreadWorld(1).transports[0], Collectives)  # rank, world, world_group
