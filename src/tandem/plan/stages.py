"""Codecs whose exchange changes over a run: LGC's three stages, each costed as it runs.

Why: a plan that costs only a codec's steady state flatters a codec whose run begins with
dearer rounds. LGC spends the first ``warmup_fraction`` of its steps on top-k at a density
ramped down from ``warmup_start``, and the next ``ae_fraction`` on rounds that also train the
autoencoder (``ae_iters`` Adam steps a round; on the mnist5k CNN at 4 ranks, one thread, 2.9 ms
of computation a round against a compressed round's 0.45 ms). Costing stage 3 alone,
``tandem plan`` predicted LGC's step 22-27 % shorter than ``bench/plan.py`` measured at 2, 4
and 8 workers.

How: the codec runs real stage-1 and stage-2 rounds at the plan's N through
:class:`~tandem.plan.measure.RecordingPeers` (peers that echo this rank), with each stage cut to
:data:`SAMPLES` rounds, so that stage 1's density ramp is sampled at evenly spaced points of its
exponent. Every round's collectives are recorded, and its computation is timed from copies of
the codec's state (the fastest of ``reps``; the round that builds the autoencoder, a one-off, is
not timed). A stage costs the mean of its rounds; it weighs its share of the run: the options'
fractions, or ``warmup_steps`` / ``ae_steps`` over ``total_steps``. Stage 3 is the codec's
steady profile (:func:`tandem.plan.measure.codec_profile`). The bytes a plan reports stay stage
3's, the run's steady rate (``bench/plan.py`` checks them exactly); its step time is the mean over
the stages, the time a run takes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from tandem.codecs.base import make_codec
from tandem.errors import ConfigError
from tandem.plan.measure import Profile, RecordingPeers

#: rounds recorded per early stage
SAMPLES = 4
#: codecs with early stages (name -> the stages' labels)
STAGED = {"lgc": ("warm-up", "autoencoder training")}
#: steps of the run a plan takes stage fractions over (their rounding then vanishes)
_LONG_RUN = 1_000_000


@dataclass(frozen=True)
class Stage:
    """One early stage of a codec's run: its share of the steps, the collectives of each
    recorded round, and the mean computation of a round (this machine, one thread)."""

    name: str
    share: float
    rounds: tuple[tuple[tuple[str, int], ...], ...]
    compute_s: float


def stage_shares(name: str, options: dict[str, Any]) -> tuple[float, ...]:
    """Each early stage's share of a run's steps: the codec's own stage lengths
    (``stage_lengths``) over ``total_steps``, or over a run long enough that their rounding
    vanishes when the options give fractions."""
    if name not in STAGED:
        return ()
    codec = make_codec(name, options)
    o = codec.opts
    if o.total_steps is None and (o.warmup_steps is not None or o.ae_steps is not None):
        raise ConfigError("lgc: a plan needs total_steps with warmup_steps or ae_steps, to know "
                          "what share of the run they are (or give warmup_fraction/ae_fraction)")
    total = o.total_steps or _LONG_RUN
    codec.set_total_steps(total)
    w, a = codec.stage_lengths()
    w = min(total, w)
    return (w / total, min(total - w, a) / total)


def codec_stages(profile: Profile, name: str, n: int, reps: int = 3, seed: int = 0
                 ) -> list[Stage]:
    """``name``'s early stages at ``n`` ranks on the profile's gradient (memoised); empty for a
    codec whose every round is its steady one."""
    key = ("stages", name, n)
    if key in profile.memo:
        return profile.memo[key]
    out: list[Stage] = []
    if name in STAGED and n > 1:
        options = dict(profile.codecs[name].options)
        shares = stage_shares(name, options)
        out = _run_stages(name, options, shares, profile.grads, n, reps, seed)
    profile.memo[key] = out
    return out


def _run_stages(name: str, options: dict[str, Any], shares: tuple[float, ...],
                grads: list[torch.Tensor], n: int, reps: int, seed: int) -> list[Stage]:
    sampled = {**options, "warmup_steps": SAMPLES, "ae_steps": SAMPLES, "leader": "fixed"}
    sampled.pop("total_steps", None)
    codec = make_codec(name, sampled, seed=seed)
    codec.set_total_steps(3 * SAMPLES)
    peers = RecordingPeers(n)
    rounds: list[list[tuple[tuple[str, int], ...]]] = [[] for _ in shares]
    times: list[list[float]] = [[] for _ in shares]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(len(shares) * SAMPLES):
            stage = i // SAMPLES
            took, builds = _best_round(codec, grads, n, reps)
            if not builds:  # the round that builds the autoencoder: a one-off, not timed
                times[stage].append(took)
            peers.ops.clear()
            codec.exchange([g.clone() for g in grads], peers)
            rounds[stage].append(tuple((o.kind, o.nbytes) for o in peers.ops))
    finally:
        torch.set_num_threads(old)
    return [Stage(label, share, tuple(r), sum(t) / len(t) if t else 0.0)
            for label, share, r, t in zip(STAGED[name], shares, rounds, times, strict=True)]


def _best_round(codec: Any, grads: list[torch.Tensor], n: int, reps: int
                ) -> tuple[float, bool]:
    """The fastest of ``reps`` runs of the codec's next round, each on a copy of its state, and
    whether that round builds the codec's autoencoder (LGC builds it in its first stage-2
    round, when the model has a layer to compress)."""
    best, builds = float("inf"), False
    for _ in range(reps):
        twin, peers, g = copy.deepcopy(codec), RecordingPeers(n), [x.clone() for x in grads]
        t0 = time.perf_counter()
        twin.exchange(g, peers)
        best = min(best, time.perf_counter() - t0)
        builds = getattr(codec, "ae", None) is None and getattr(twin, "ae", None) is not None
    return best, builds
