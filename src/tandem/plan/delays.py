"""Per-worker step compute as a random variable: who waits for whom, and for how long.

A worker's compute in one step is ``X = base + J + S``:

* ``base``: the measured (or given) compute of one worker's batch;
* ``J``: noise every worker has every step, exponential with mean ``jitter_s`` (a loaded CPU,
  an OS hiccup), or the measured samples themselves (:meth:`ComputeTime.from_samples`:
  ``bench/plan.py`` gives it each run's own records);
* ``S``: a straggler's delay, with probability ``p`` per worker per step: ``factor x base``
  (``--stragglers P:FACTOR``) or exponential with mean ``mean_s`` (``P:exp:MEAN_S``), the same
  model ``tandem train --stragglers`` injects.

What the strategies need from it: the mean (a worker that never waits: ``bsp_shared``, the
candidate parameter server), the expected maximum over N (everyone waits for the slowest:
all-reduce, wait-for-all gossip; over the neighbourhood for gossip) and the expected k-th order
statistic (a coded parameter server decodes from the first ``n - s``). A deadline truncates the
straggler's delay (``capped``): GOCO's straggler gives up, so it costs at most the deadline.

How: the extra delay ``J + S`` is discretised on a grid fine enough for its scales (a few
thousand points); its CDF ``F`` gives ``E[max_N] = base + sum (1 - F^N) dx`` and the order
statistics through the binomial tail ``P(X_(k) <= x) = I_F(k, N-k+1)``. Exact for the point
masses of the factor model; within a fraction of a percent for the exponential parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from tandem.config import StragglerConfig

_BINS = 4096


@dataclass(frozen=True)
class ComputeTime:
    """``base + J + S`` (see the module docstring); every field in seconds but ``p``/``factor``."""

    base_s: float
    jitter_s: float = 0.0
    p: float = 0.0
    factor: float = 0.0
    mean_s: float = 0.0
    kind: str = "factor"
    #: a deadline on the straggler's delay (seconds beyond base); None: none
    cap_s: float | None = None
    #: measured noise samples (sorted, seconds above base) instead of the exponential
    noise: tuple[float, ...] | None = None

    @classmethod
    def from_samples(cls, samples: list[float], stragglers: StragglerConfig | str | None = None
                     ) -> ComputeTime:
        """The empirical distribution of measured step computes (``bench/plan.py`` feeds it
        each run's own records): base = the smallest, the noise = the rest above it."""
        xs = sorted(float(x) for x in samples)
        base = xs[0]
        noise = tuple(x - base for x in xs)
        ct = cls.of(base, stragglers, float(np.mean(noise)))
        return replace(ct, noise=noise)

    @classmethod
    def of(cls, base_s: float, stragglers: StragglerConfig | str | None = None,
           jitter_s: float = 0.0) -> ComputeTime:
        if isinstance(stragglers, str):
            stragglers = StragglerConfig.parse(stragglers)
        if stragglers is None or stragglers.p <= 0:
            return cls(base_s, jitter_s)
        return cls(base_s, jitter_s, stragglers.p, stragglers.factor, stragglers.mean_s,
                   stragglers.kind)

    def scaled(self, k: float) -> ComputeTime:
        """``k`` batches back to back (a coded worker's ``d`` partitions): ``k`` x the time,
        noise included (a simplification: k independent draws would spread less); a
        straggler's factor delay follows, an exponential one is drawn once."""
        noise = None if self.noise is None else tuple(k * x for x in self.noise)
        return replace(self, base_s=self.base_s * k, jitter_s=self.jitter_s * k, noise=noise)

    def deadline(self, seconds: float | None = None, factor: float = 1.5) -> ComputeTime:
        """What a straggler costs under a deadline: an absolute one (``seconds`` after the step
        began: the delay is cut at ``seconds - base``), else the end of the step at ``factor`` x
        its normal compute (``gossip``'s ``deadline_factor``: the delay becomes at most
        ``factor - 1`` times that compute)."""
        if seconds is not None:
            return self.capped(seconds - self.base_s)
        if self.kind == "factor":
            return replace(self, factor=min(self.factor, max(0.0, factor - 1.0)))
        return self.capped((factor - 1.0) * self.base_s)

    def capped(self, cap_s: float) -> ComputeTime:
        """The straggler's delay cut at ``cap_s`` seconds (a deadline just above the compute:
        ``cap_s = 0``, GOCO's injected stragglers give up at once)."""
        return replace(self, cap_s=max(0.0, cap_s))

    # ---- the delay's distribution -------------------------------------------------------------
    @property
    def straggler_delay(self) -> float:
        """Mean delay of a worker that straggles (after the deadline's cut, if any)."""
        if self.kind == "factor" and self.noise is not None:
            d = self.factor * (self.base_s + np.asarray(self.noise))
            return float(np.mean(d if self.cap_s is None else np.minimum(d, self.cap_s)))
        if self.kind == "factor":  # E[min(factor (base + J), cap)]
            b, j, f = self.base_s, self.jitter_s, self.factor
            if self.cap_s is None or f == 0:
                return f * (b + j)
            if j == 0:
                return min(f * b, self.cap_s)
            j_star = self.cap_s / f - b
            if j_star <= 0:
                return self.cap_s
            # E[f (b + J); J < j*] + cap P(J >= j*), J ~ Exp(j)
            q = math.exp(-j_star / j)
            return f * (b * (1 - q) + j - (j_star + j) * q) + self.cap_s * q
        if self.mean_s <= 0:
            return 0.0
        if self.cap_s is None:
            return self.mean_s
        return self.mean_s * (1.0 - math.exp(-self.cap_s / self.mean_s))  # E[min(Exp, cap)]

    def mean(self) -> float:
        return self.base_s + self.jitter_s + self.p * self.straggler_delay

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Independent draws of ``X`` (for the coupled waits :func:`coupled_step` simulates)."""
        if self.noise is not None:
            j = rng.choice(np.asarray(self.noise), size=shape) if self.noise else np.zeros(shape)
        elif self.jitter_s > 0:
            j = rng.exponential(self.jitter_s, size=shape)
        else:
            j = np.zeros(shape)
        x = self.base_s + j
        if self.p > 0:
            hit = rng.random(shape) < self.p
            if self.kind == "factor":
                d = self.factor * x
            else:
                d = rng.exponential(self.mean_s, size=shape) if self.mean_s > 0 else 0.0 * x
            if self.cap_s is not None:
                d = np.minimum(d, self.cap_s)
            x = x + hit * d
        return x

    def _grid(self) -> tuple[np.ndarray, float]:
        return _extra_cdf(self.jitter_s, self.p, self.base_s, self.factor, self.mean_s,
                          self.kind, self.cap_s, self.noise)

    def expected_max(self, n: int) -> float:
        """E[max of n independent draws]: the step of a group that waits for its slowest."""
        if n <= 1:
            return self.mean()
        cdf, dx = self._grid()
        if dx == 0.0:
            return self.base_s
        return self.base_s + float(np.sum(1.0 - np.power(cdf, n)) * dx)

    def expected_order(self, k: int, n: int) -> float:
        """E[k-th smallest of n draws] (k = n: the maximum)."""
        if not 1 <= k <= n:
            raise ValueError(f"order statistic {k} of {n}")
        if k == n:
            return self.expected_max(n)
        cdf, dx = self._grid()
        if dx == 0.0:
            return self.base_s
        from scipy.special import betainc  # scikit-learn's dependency; only here

        below = betainc(k, n - k + 1, np.clip(cdf, 0.0, 1.0))  # P(X_(k) <= x)
        return self.base_s + float(np.sum(1.0 - below) * dx)

    def describe(self) -> str:
        parts = [f"{self.base_s * 1e3:.3g} ms"]
        if self.noise is not None:
            parts.append(f"+ measured noise (mean {self.jitter_s * 1e3:.3g} ms)")
        elif self.jitter_s:
            parts.append(f"+ Exp({self.jitter_s * 1e3:.3g} ms) noise")
        if self.p:
            what = (f"{self.factor:g}x" if self.kind == "factor"
                    else f"Exp({self.mean_s * 1e3:.3g} ms)")
            parts.append(f"+ straggler p={self.p:g} delay {what}")
        return " ".join(parts)


@lru_cache(maxsize=256)
def _extra_cdf(jitter: float, p: float, base: float, factor: float, mean: float, kind: str,
               cap: float | None, noise: tuple[float, ...] | None = None
               ) -> tuple[np.ndarray, float]:
    """CDF of the extra delay ``J + S`` at the grid points ``(i + 1) dx``, and ``dx`` (0: no
    delay at all). Factor model: ``S = factor (base + J)``, the same draw of the noise scaled
    (the injected delay is a multiple of that step's compute); ``cap`` cuts ``S``."""
    const = factor * base if kind == "factor" else 0.0
    # how far the noise reaches: 40 means of an exponential, or the largest sample
    reach = 40.0 * jitter if noise is None else (noise[-1] if noise else 0.0) * 1.001
    spread = reach * (1.0 + (factor if kind == "factor" else 0.0)) + (
        40.0 * mean if kind == "exp" else 0.0)
    top = (const if cap is None else min(const, cap)) + spread
    if kind == "exp" and cap is not None:
        top = cap + reach
    if p <= 0:
        top = reach
    if top <= 0:
        return np.ones(1), 0.0
    dx = top / _BINS
    x = (np.arange(_BINS) + 1.0) * dx

    def f_j(t: np.ndarray) -> np.ndarray:  # the noise's CDF
        if noise is not None:
            return np.searchsorted(np.asarray(noise), t, side="right") / max(1, len(noise))
        if jitter <= 0:
            return (t >= 0).astype(float)
        return np.where(t >= 0, -np.expm1(-np.maximum(t, 0.0) / jitter), 0.0)

    if p <= 0:
        return f_j(x), dx
    if kind == "factor":
        # J + min(factor (base + J), cap) is increasing in J: invert it
        lim = math.inf if cap is None else cap
        j_star = lim / factor - base if factor > 0 else math.inf  # J where the cap binds
        if j_star <= 0:
            inv = x - lim
        else:
            inv = np.where(x < j_star * (1 + factor) + factor * base,
                           (x - factor * base) / (1 + factor), x - lim)
        return (1 - p) * f_j(x) + p * f_j(inv), dx
    # exponential delay (capped): convolve its distribution with the noise's
    mids = x - 0.5 * dx
    s = np.zeros(_BINS)
    s[0] += 1.0 - p
    if mean > 0:
        dens = np.exp(-mids / mean) / mean * dx
        if cap is not None:
            i = min(_BINS - 1, int(cap / dx))
            dens[i] += max(0.0, 1.0 - dens[:i].sum() - dens[i])
            dens[i + 1:] = 0.0
        s += p * dens / max(dens.sum(), 1e-300)
    else:
        s[0] += p
    if jitter > 0:
        j = np.diff(f_j(np.concatenate([[0.0], x])))
        s = np.convolve(s, j)[:_BINS]
    return np.minimum(np.cumsum(s), 1.0), dx


@lru_cache(maxsize=256)
def coupled_step(compute: ComputeTime, neighbours: tuple[tuple[int, ...], ...], extra_s: float,
                 steps: int | None = None, seed: int = 0) -> float:
    """Mean step time of peers that each wait for their neighbours' messages of the same step.

    Peer i finishes step t at ``F_i(t) = max_{j in N[i]} (F_j(t-1) + X_j(t)) + extra_s`` (N[i]:
    i and its neighbours): a late peer delays its neighbours, they delay theirs, so on a sparse
    graph the wait grows past the expected maximum over one neighbourhood. Simulated (a few
    hundred steps, the first quarter dropped as the transient; cached, since every codec of a
    plan shares the compute); on a complete graph it is ``E[max_N X] + extra_s``."""
    n = len(neighbours)
    if n <= 1:
        return compute.mean() + extra_s
    width = max(len(x) for x in neighbours) + 1
    if width >= n:
        return compute.expected_max(n) + extra_s
    idx = np.array([[i, *x, *([i] * (width - 1 - len(x)))] for i, x in enumerate(neighbours)])
    steps = steps or max(200, min(2000, 20000 // n))
    rng = np.random.default_rng(seed)
    f = np.zeros(n)
    warm = steps // 4
    start = 0.0
    for t in range(steps):
        f = (f + compute.sample(rng, (n,)))[idx].max(axis=1) + extra_s
        if t == warm - 1:
            start = float(f.mean())
    return (float(f.mean()) - start) / (steps - warm)
