"""A vectorised single-process simulator of GOCO on the ``regression`` workload.

It runs the same algorithm as the ``gossip`` strategy for M devices at once (M up to a few
thousand) with numpy: parameters are an (M, dim) array, one gossip round is ``X <- W X``, and a
partition's gradient is exact and cheap because the loss is least squares:
``g_k(x) = (2/n_k) X_k^T (X_k x - y_k) = A_k x - b_k`` with A_k, b_k computed once.

It builds everything the strategy builds from the same functions and seeds: the workload
(:func:`tandem.workloads.build_workload`), the initial model (:func:`build_model`), the data
partitions (:func:`~tandem.strategies.gossip.data_partitions`), the allocation, the topology and,
with ``exact_draws``, the straggler draws
(:func:`tandem.trainer.stragglers.straggler_mask`, the very function each process consults). With
``batch_size=None`` (the strategy's ``full_batch=true``) the
trajectory therefore equals a multi-process run's up to float32 rounding; with minibatches the
batches are drawn by the simulator's own generator (same distribution, different samples).

Tune: ``exact_draws`` costs ~30 us per device per step (one seeded generator each, as in the
processes); past 64 devices it defaults to one vectorised generator, statistically the same.
Memory grows as M^2 (the mixing matrix) and as M d dim^2 (the per-device full-batch operators, or
M d B dim with minibatches); :meth:`SimConfig.check` refuses a config past
:data:`MAX_DEVICES` or :data:`MAX_BYTES` before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from pydantic import ValidationError
from torch.nn.utils import parameters_to_vector

from tandem.coding import SCHEMES, make_allocation, sgc_weight
from tandem.config import StragglerConfig, WorkloadConfig
from tandem.errors import ConfigError
from tandem.topology import GRAPHS, WEIGHTS, Topology, make_topology
from tandem.trainer import build_model
from tandem.trainer.partitions import data_partitions
from tandem.trainer.stragglers import straggler_mask
from tandem.workloads import WORKLOADS, build_workload

MODES = ("goco", "dsgd", "redundant", "wait")
#: the most devices one simulation takes: the dense mixing matrix is M^2 doubles (128 MiB here)
MAX_DEVICES = 4096
#: the most memory the largest arrays of one simulation may take (raise it on a big machine)
MAX_BYTES = 4 * 2**30


@dataclass
class SimConfig:
    """One simulated run; fields mirror the gossip strategy's options and the run config."""

    devices: int = 8
    d: int = 1
    p: float = 0.1
    mode: str = "goco"
    steps: int = 200
    lr: float = 0.05
    lr_decay: float = 0.0
    topology: str = "ring"
    weights: str = "metropolis"
    edge_p: float | None = None
    gossip_rounds: int = 1
    allocation: str = "cyclic"
    p_weight: float | None = None  # p in GOCO's 1/(d(1-p)); default p
    seed: int = 0
    batch_size: int | None = None  # None: full partition gradients
    exact_draws: bool | None = None
    workload_options: dict[str, Any] = field(default_factory=dict)
    keep_params: bool = False
    overlap: bool = False  # the gossip option: x_{t+1} = W x_t - lr e(x_t)
    mix_every: int = 1  # the gossip option: mix on every N-th step only, local steps between

    def check(self, name: Callable[[str], str] = str) -> None:
        """Refuse a config that cannot run, before anything is built or allocated.

        Raises :class:`ConfigError` naming the field as ``name(field)`` (the CLI passes one that
        returns its flags, e.g. ``lr_decay`` -> ``--lr-decay``) and the allowed values.
        """

        def bad(key: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"{name(key)}: {value!r} is not allowed; {allowed}")

        def number(key: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                   hi_open: bool = False, integer: bool = False, allowed: str = "",
                   value: Any = None) -> None:
            v = getattr(self, key) if value is None else value
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) \
                and (not integer or float(v).is_integer())
            if not ok:
                what = "an integer" if integer else "a number"
                raise bad(key, v, allowed or f"{what} in {'(' if lo_open else '['}{lo:g}, "
                          f"{hi:g}{')' if hi_open else ']'}")

        number("devices", 1, MAX_DEVICES, integer=True,
               allowed=f"the number of devices, 1 to {MAX_DEVICES} (the mixing matrix is M^2)")
        number("steps", 1, integer=True, allowed="at least 1 iteration")
        number("p", 0, 1, hi_open=True, allowed="a straggling probability in [0, 1)")
        number("lr", 0, lo_open=True, allowed="a positive finite learning rate")
        number("lr_decay", 0, allowed="a finite decay >= 0 (lr_t = lr / (1 + lr_decay t))")
        number("gossip_rounds", 1, 1000, integer=True, allowed="1 to 1000 rounds per step")
        number("mix_every", 1, 1000, integer=True, allowed="mix every 1 to 1000 steps")
        number("seed", 0, 2**63 - 1, integer=True, allowed="an integer in [0, 2^63)")
        for key, choices in (("mode", MODES), ("topology", GRAPHS), ("weights", WEIGHTS),
                             ("allocation", SCHEMES)):
            if getattr(self, key) not in choices:
                raise bad(key, getattr(self, key), f"choose one of {', '.join(choices)}")
        if self.overlap and self.mode == "wait":
            raise bad("overlap", True, f"not with {name('mode')} wait (the gossip strategy "
                      "refuses it too: wait's barrier comes before the exchange)")
        # in every mode: dsgd ignores d, but a d that no run could have is a mistake there
        # too (the CLI refuses a bad value whatever the other flags)
        number("d", 1, self.devices, integer=True,
               allowed=f"a redundancy from 1 to {name('devices')} ({self.devices})")
        # dsgd holds one partition per device whatever d says
        if self.mode != "dsgd" and self.allocation == "fractional" and self.devices % self.d:
            raise bad("d", self.d, f"{name('allocation')} fractional needs d to divide "
                      f"{name('devices')} ({self.devices}); use cyclic or another d")
        if self.batch_size is not None:
            number("batch_size", 1, integer=True, allowed="a minibatch of at least 1 sample")
        if self.edge_p is not None:
            number("edge_p", 0, 1, lo_open=True, allowed="an edge probability in (0, 1]")
        if self.p_weight is not None:
            number("p_weight", 0, 1, hi_open=True, allowed="a probability in [0, 1)")
        opts = {"n": max(2048, 16 * self.devices), **self.workload_options}
        try:
            WORKLOADS["regression"].options.model_validate(opts)
        except ValidationError as err:
            e = err.errors()[0]
            keys = [str(e["loc"][0])] if e["loc"] else ["n", "dim"]  # n >= dim: both at fault
            where = ", ".join(name(f"workload_options.{k}") for k in keys)
            raise ConfigError(f"{where}: {e['msg'].removeprefix('Value error, ')} "
                              f"(regression option; got {opts})") from None
        number("workload_options.n", self.devices, integer=True, value=opts["n"],
               allowed=f"at least one sample per device ({name('devices')} {self.devices})")
        need = self.memory_bytes()
        if need > MAX_BYTES:
            culprits = ", ".join(name(k) for k in ("devices", "d", "workload_options.dim",
                                                   "workload_options.n", "batch_size"))
            raise ConfigError(
                f"{culprits}: this simulation needs ~{need / 2**30:.1f} GiB "
                f"(> {MAX_BYTES / 2**30:g} GiB): fewer devices, a smaller d or dim, or a small "
                "minibatch (the limit is tandem.sim.goco.MAX_BYTES)")

    def memory_bytes(self) -> int:
        """The size of the largest arrays :func:`simulate` allocates, in bytes (an estimate)."""
        M = self.devices
        d = 1 if self.mode == "dsgd" else self.d
        dim = int(self.workload_options.get("dim", 20))
        n = int(self.workload_options.get("n", max(2048, 16 * M)))
        per_device = d * self.batch_size * (dim + 1) if self.batch_size else 2 * d * dim * dim
        return 8 * (3 * M * M + M * per_device + n * dim + 2 * M * dim)


@dataclass
class SimResult:
    """Per-step curves (after the step's gossip) and, optionally, the final parameters."""

    config: SimConfig
    opt_error: np.ndarray  # mean_i ||x_i - x*||^2, shape (steps,)
    avg_opt_error: np.ndarray  # ||mean_i x_i - x*||^2
    consensus_error: np.ndarray  # mean_i ||x_i - mean x||^2
    per_device: np.ndarray | None  # ||x_i - x*||^2, shape (steps, M), when M <= 64
    straggled: np.ndarray  # (steps, M) booleans
    spectral_gap: float
    params: np.ndarray | None = None

    def floor(self, tail: float = 0.2) -> float:
        """The error floor: mean of ``opt_error`` over the last ``tail`` fraction of steps."""
        k = max(1, int(round(len(self.opt_error) * tail)))
        return float(self.opt_error[-k:].mean())


@lru_cache(maxsize=8)
def _topology(name: str, n: int, weights: str, seed: int, edge_p: float | None) -> Topology:
    return make_topology(name, n, weights=weights, seed=seed, edge_p=edge_p)


def _setup(cfg: SimConfig) -> dict[str, Any]:
    cfg.check()
    M = cfg.devices
    opts = dict(cfg.workload_options)
    opts.setdefault("n", max(2048, 16 * M))
    work = build_workload(WorkloadConfig(name="regression", options=opts), cfg.seed)
    x0 = parameters_to_vector(build_model(work, cfg.seed).parameters()).detach().double().numpy()
    d = 1 if cfg.mode == "dsgd" else cfg.d
    alloc = make_allocation(M, d, cfg.allocation)
    parts = data_partitions(work, M, "iid", 2, cfg.seed)
    X = work.train.x.double().numpy()
    Y = work.train.y.double().numpy().reshape(-1)
    topo = _topology(cfg.topology, M, cfg.weights, cfg.seed, cfg.edge_p)
    return {"work": work, "x0": x0, "d": d, "alloc": alloc, "parts": [p.numpy() for p in parts],
            "X": X, "Y": Y, "topo": topo, "opt": work.optimum.double().numpy()}


def _full_batch_operator(s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per device: C_i = sum_{k in S_i} A_k and c_i = sum b_k, so sum_k g_k(x_i) = C_i x_i - c_i."""
    X, Y = s["X"], s["Y"]
    A = np.stack([2.0 / len(ix) * X[ix].T @ X[ix] for ix in s["parts"]])
    b = np.stack([2.0 / len(ix) * X[ix].T @ Y[ix] for ix in s["parts"]])
    held = np.array(s["alloc"].held)
    return A[held].sum(1), b[held].sum(1)


def _minibatch_gradients(s: dict[str, Any], P: np.ndarray, batch: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Sum over each device's partitions of a minibatch gradient (batch drawn with replacement)."""
    X, Y = s["X"], s["Y"]
    held = np.array(s["alloc"].held)  # (M, d)
    sizes = np.array([len(ix) for ix in s["parts"]])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(s["parts"])
    M, d = held.shape
    u = rng.random((M, d, batch))
    rows = flat[starts[held][..., None] + (u * sizes[held][..., None]).astype(np.int64)]
    Xb, Yb = X[rows], Y[rows]  # (M, d, B, dim), (M, d, B)
    resid = np.einsum("mdbj,mj->mdb", Xb, P) - Yb
    return 2.0 / batch * np.einsum("mdbj,mdb->mj", Xb, resid)


def simulate(cfg: SimConfig) -> SimResult:
    """Run ``cfg.steps`` steps of the gossip algorithm for ``cfg.devices`` devices."""
    s = _setup(cfg)
    M, d, topo, opt = cfg.devices, s["d"], s["topo"], s["opt"]
    exact = cfg.exact_draws if cfg.exact_draws is not None else M <= 64
    strag = StragglerConfig(p=cfg.p) if cfg.p > 0 else None
    p_w = cfg.p_weight if cfg.p_weight is not None else cfg.p
    weight = sgc_weight(d, p_w) if cfg.mode == "goco" else 1.0 / d
    rng = np.random.default_rng([cfg.seed, M, 4242])
    C, c = _full_batch_operator(s) if cfg.batch_size is None else (None, None)
    WQ = np.linalg.matrix_power(topo.W, cfg.gossip_rounds)
    P = np.tile(s["x0"], (M, 1))
    T = cfg.steps
    opt_err, avg_err, cons = np.zeros(T), np.zeros(T), np.zeros(T)
    per_dev = np.zeros((T, M)) if M <= 64 else None
    straggled = np.zeros((T, M), dtype=bool)
    for t in range(T):
        if strag is None:
            mask = np.zeros(M, dtype=bool)
        elif exact:
            mask = straggler_mask(cfg.seed, M, t, strag)
        else:
            mask = rng.random(M) < cfg.p
        if cfg.mode == "wait":
            mask = np.zeros(M, dtype=bool)
        straggled[t] = mask
        if C is not None:
            G = np.einsum("mij,mj->mi", C, P) - c
        else:
            G = _minibatch_gradients(s, P, cfg.batch_size, rng)
        lr = cfg.lr / (1.0 + cfg.lr_decay * t)
        step = (lr * weight) * (~mask)[:, None] * G
        if (t + 1) % cfg.mix_every:  # a local step: no mixing
            P = P - step
        else:
            P = WQ @ P - step if cfg.overlap else WQ @ (P - step)
        dist = ((P - opt) ** 2).sum(1)
        mean = P.mean(0)
        opt_err[t], avg_err[t] = dist.mean(), ((mean - opt) ** 2).sum()
        cons[t] = ((P - mean) ** 2).sum(1).mean()
        if per_dev is not None:
            per_dev[t] = dist
    return SimResult(cfg, opt_err, avg_err, cons, per_dev, straggled, topo.spectral_gap,
                     P if cfg.keep_params else None)


__all__ = ["MODES", "SimConfig", "SimResult", "simulate"]
