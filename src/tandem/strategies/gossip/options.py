"""Options of ``gossip`` (``--strategy-opt key=value``); the package docstring explains each
one and how to tune it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tandem.strategies.base import StrategyOptions


class GossipOptions(StrategyOptions):
    mode: Literal["goco", "dsgd", "redundant", "wait"] = Field(
        "goco", description="goco: unbiased weight 1/(d(1-p)); redundant: 1/d; dsgd: d=1, "
        "stragglers skipped; wait: wait for every gradient")
    topology: Literal["ring", "torus", "exponential", "erdos_renyi", "complete"] = Field(
        "ring", description="the peers' graph (tandem.topology)")
    weights: Literal["metropolis", "max_degree"] = Field(
        "metropolis", description="mixing weights on the graph")
    edge_p: float | None = Field(default=None, gt=0, le=1,
                                 description="erdos_renyi: edge probability")
    gossip_rounds: int = Field(default=1, ge=1, description="mixing rounds per step; a small "
                               "spectral gap wants more")
    mix_every: int = Field(default=1, ge=1, le=1000, description="mix with the neighbours on "
                           "every N-th step only (steps N-1, 2N-1, ...); the steps between are "
                           "local: 1/N of the bytes, the peers drift further apart between "
                           "mixings (mode=wait: its barrier before each mixing only)")
    allocation: Literal["cyclic", "fractional"] = Field(
        "cyclic", description="which partitions each peer holds (redundancy d)")
    p: float | None = Field(default=None, ge=0, lt=1, description="straggling probability in "
                            "GOCO's weight; default the injected --stragglers p, else 0")
    deadline_s: float | None = Field(default=None, gt=0, description="real deadline per step: "
                                     "a gradient not ready by then counts as straggled")
    deadline_factor: float = Field(default=1.5, ge=1.0, description="without deadline_s: an "
                                   "injected straggler's step ends at this multiple of its "
                                   "normal compute (the deadline it misses); its work is lost")
    compute_floor_s: float = Field(default=0.0, ge=0, description="pad each gradient "
                                   "computation to at least this long (emulates a heavier model)")
    full_batch: bool = Field(False, description="whole-partition gradients instead of "
                             "minibatches")
    lr_decay: float = Field(default=0.0, ge=0, description="lr_t = lr / (1 + lr_decay * t)")
    save_peers: bool = Field(False, description="also write each peer's own model "
                             "(model.peer<R>.pt) beside the network average (model.pt)")
    overlap: bool = Field(False, description="mix x_t with the neighbours while the gradient "
                          "at x_t computes (D-PSGD's order, x_{t+1} = W x_t - lr e(x_t)): a "
                          "step costs about max(compute, exchange); not with mode=wait")
    average_dtype: Literal["float32", "float16"] = Field(
        "float32", description="the network average (the saved model, each evaluation): "
        "float32 all-reduces the parameters exactly; float16 all-reduces each peer's change "
        "since the shared initial model in half precision, half the bytes, with an error "
        "of at most about world * 2**-10 of the largest change")
    consensus_step: float | None = Field(default=None, gt=0, le=1, description="compressed "
                                         "gossip (CHOCO) step size; default per codec")
