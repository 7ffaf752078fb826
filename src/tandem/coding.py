"""Gradient coding: who holds which data partitions, and how their gradients are combined.

The data is cut into ``n`` partitions (one per worker); with redundancy ``d`` each partition is
stored on ``d`` workers, so the gradient of a partition survives the loss of up to ``d - 1`` of its
holders. Two allocations (:func:`make_allocation`):

* ``cyclic``: worker i holds partitions i, i+1, ..., i+d-1 (mod n). Any n, any d <= n.
* ``fractional`` (fractional repetition): workers form n/d groups of d; every member of group g
  holds the same d partitions g*d .. g*d+d-1. Needs d | n; decoding is a plain sum.

Two ways to use the redundancy:

* **Stochastic gradient coding** (Bitar, Wootters and El Rouayheb, "Stochastic Gradient Coding for
  Straggler Mitigation in Distributed Learning", IEEE JSAIT 2020), used by GOCO: a worker that
  finishes sends ``e_i = sum_{k in S_i} g_k / (d (1 - p))`` and a straggler sends nothing. Each
  partition has d holders, each finishing with probability 1 - p, so ``E[sum_i e_i] = sum_k g_k``:
  unbiased for any p, with a variance that falls as d grows (:func:`sgc_weight`,
  :func:`sgc_encode`). Tune ``p`` to the real straggling rate: a too-small p biases the step low.
* **Classic gradient coding** (Tandon, Lei, Dimakis and Karampatziakis, "Gradient Coding: Avoiding
  Stragglers in Distributed Learning", ICML 2017): worker i sends ``c_i = sum_k B[i, k] g_k`` with
  B supported on its partitions; for *every* set F of n - s survivors (s = d - 1) a decoding
  vector a with ``a^T B = 1^T`` (zero outside F) recovers the exact full gradient
  ``sum_i a_i c_i = sum_k g_k`` (:func:`gradient_code`). The cyclic scheme uses Tandon's random
  construction (rows of B span the null space of a random H with H 1 = 0); the fractional one
  uses B = the 0/1 allocation and decodes with one survivor per group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.errors import ConfigError
from tandem.workloads.partition import cyclic_allocation

SCHEMES = ("cyclic", "fractional")


@dataclass(frozen=True)
class Allocation:
    """``held[i]``: the partition ids worker i stores (each partition held by exactly d)."""

    n: int
    d: int
    scheme: str
    held: tuple[tuple[int, ...], ...]

    def holders(self, k: int) -> list[int]:
        return [i for i, parts in enumerate(self.held) if k in parts]

    def matrix(self) -> np.ndarray:
        """0/1 support matrix S (workers x partitions)."""
        s = np.zeros((self.n, self.n))
        for i, parts in enumerate(self.held):
            s[i, list(parts)] = 1.0
        return s


def make_allocation(n: int, d: int, scheme: str = "cyclic") -> Allocation:
    """The ``scheme`` allocation of n partitions over n workers with redundancy d."""
    if not 1 <= d <= n:
        raise ConfigError(f"redundancy d={d} must lie between 1 and the number of workers ({n})")
    if scheme == "cyclic":
        held = cyclic_allocation(n, d)
    elif scheme == "fractional":
        if n % d:
            raise ConfigError(f"fractional repetition needs d to divide n (n={n}, d={d}); "
                              "use scheme=cyclic or change d")
        held = [[(i // d) * d + j for j in range(d)] for i in range(n)]
    else:
        raise ConfigError(f"unknown allocation scheme {scheme!r}; choose one of {list(SCHEMES)}")
    return Allocation(n, d, scheme, tuple(tuple(h) for h in held))


# ---- stochastic gradient coding --------------------------------------------------------------
def sgc_weight(d: int, p: float) -> float:
    """``1 / (d (1 - p))``: makes the sum of the survivors' messages unbiased."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"straggling probability p must lie in [0, 1), got {p}")
    return 1.0 / (d * (1.0 - p))


def sgc_encode(partition_grads: Sequence[torch.Tensor], d: int, p: float,
               straggled: bool = False) -> torch.Tensor:
    """One worker's SGC message from its partitions' gradients (zero if it straggled)."""
    total = torch.stack(list(partition_grads)).sum(0)
    return torch.zeros_like(total) if straggled else total * sgc_weight(d, p)


def sgc_estimate(partition_grads: torch.Tensor, alloc: Allocation, p: float,
                 straggled: Iterable[bool]) -> torch.Tensor:
    """Sum of all workers' SGC messages for one straggler pattern (``partition_grads``: n x D).

    Its expectation over patterns (each worker straggling with probability p) is
    ``partition_grads.sum(0)``.
    """
    out = torch.zeros_like(partition_grads[0])
    for parts, late in zip(alloc.held, straggled, strict=True):
        if not late:
            out += partition_grads[list(parts)].sum(0) * sgc_weight(alloc.d, p)
    return out


# ---- classic gradient coding -------------------------------------------------------------------
@dataclass
class GradientCode:
    """Encoding matrix ``B`` (workers x partitions) tolerating any ``s`` stragglers."""

    alloc: Allocation
    s: int
    B: np.ndarray
    tol: float = 1e-6
    _cache: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.alloc.n

    def encode(self, i: int, partition_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Worker i's coded gradient; ``partition_grads`` in the order of ``alloc.held[i]``."""
        coeffs = self.B[i, list(self.alloc.held[i])]
        out = torch.zeros_like(partition_grads[0])
        for c, g in zip(coeffs.tolist(), partition_grads, strict=True):
            out += c * g
        return out

    def decoder(self, survivors: Iterable[int]) -> np.ndarray:
        """Decoding vector a (length n, zero off ``survivors``) with ``a^T B = 1^T``.

        Uses any ``n - s`` of the survivors (the first ones given, sorted). Raises ConfigError
        if fewer than ``n - s`` survived.
        """
        alive = sorted(set(int(i) for i in survivors))
        if len(alive) < self.n - self.s:
            raise ConfigError(f"gradient code tolerates {self.s} stragglers but only "
                              f"{len(alive)} of {self.n} workers answered")
        key = tuple(alive[: self.n - self.s])
        if key not in self._cache:
            self._cache[key] = self._solve(key)
        return self._cache[key]

    def _solve(self, rows: tuple[int, ...]) -> np.ndarray:
        a = np.zeros(self.n)
        if self.alloc.scheme == "fractional":
            groups = {}
            for i in rows:
                groups.setdefault(i // self.alloc.d, i)
            a[list(groups.values())] = 1.0
        else:
            sol, *_ = np.linalg.lstsq(self.B[list(rows)].T, np.ones(self.n), rcond=None)
            a[list(rows)] = sol
        err = float(np.abs(a @ self.B - 1.0).max())
        if err > self.tol:
            raise ConfigError(f"gradient code cannot decode from workers {list(rows)} "
                              f"(residual {err:.2e}); rebuild it with another seed")
        return a

    def decode(self, coded: dict[int, torch.Tensor]) -> torch.Tensor:
        """``sum_k g_k`` from the coded gradients of at least ``n - s`` workers."""
        a = self.decoder(coded)
        out: torch.Tensor | None = None
        for i, c in coded.items():
            if a[i] != 0.0:
                out = c * float(a[i]) if out is None else out + c * float(a[i])
        assert out is not None
        return out

    def max_decode_error(self, limit: int = 20000) -> float:
        """Largest ``|a^T B - 1|`` over every (n-s)-subset (at most ``limit`` subsets)."""
        worst = 0.0
        for rows in itertools.islice(itertools.combinations(range(self.n), self.n - self.s), limit):
            worst = max(worst, float(np.abs(self.decoder(rows) @ self.B - 1.0).max()))
        return worst


def _cyclic_B(n: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Tandon et al.'s Algorithm 2: rows supported on i..i+s, all in null(H) with H 1 = 0."""
    H = rng.standard_normal((s, n))
    H[:, -1] = -H[:, :-1].sum(1)
    B = np.zeros((n, n))
    for i in range(n):
        cols = [(i + j) % n for j in range(s + 1)]
        B[i, cols[0]] = 1.0
        B[i, cols[1:]] = -np.linalg.solve(H[:, cols[1:]], H[:, cols[0]])
    return B


def gradient_code(n: int, s: int, scheme: str = "cyclic", seed: int = 0,
                  tries: int = 20) -> GradientCode:
    """A code over n workers tolerating any s stragglers (redundancy d = s + 1).

    The random cyclic construction is checked on every (n-s)-subset when there are at most
    20000 of them, and redrawn (up to ``tries`` times) if one decodes badly.
    """
    if not 0 <= s < n:
        raise ConfigError(f"stragglers tolerated s={s} must lie in [0, n-1] (n={n})")
    alloc = make_allocation(n, s + 1, scheme)
    if scheme == "fractional" or s == 0:
        return GradientCode(alloc, s, alloc.matrix())
    rng = np.random.default_rng([seed, n, s])
    last: ConfigError | None = None
    for _ in range(tries):
        try:
            code = GradientCode(alloc, s, _cyclic_B(n, s, rng))
            if math.comb(n, s) <= 20000:
                code.max_decode_error()
            return code
        except (ConfigError, np.linalg.LinAlgError) as err:
            last = ConfigError(str(err))
    raise ConfigError(f"no well-conditioned cyclic gradient code for n={n}, s={s}: {last}")


__all__ = ["SCHEMES", "Allocation", "GradientCode", "gradient_code", "make_allocation",
           "sgc_encode", "sgc_estimate", "sgc_weight"]
