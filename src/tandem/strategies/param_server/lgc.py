"""LGC-PS (M1 step 4) on the parameter server: the glue between the worker and server loops
and the codec's two halves, :class:`~tandem.codecs.lgc.remote.PSWorkerCode` (what a worker
pushes, its error feedback) and :class:`~tandem.codecs.lgc.psserver.PSServerCode` (the
schedule, the autoencoder with one decoder per worker, decoding a round at once).

Wire: a push is ``send_message([header, *code])`` with the push header's flags carrying
:data:`FLAG_LEAD` (the leader's latent and next support follow) and its codec slot the stage
the worker encoded for; the server's answer is a self-describing pull whose extras
(:meth:`PSServerCode.extras`) tell the worker its next stage, whether it leads, the support,
the autoencoder (once) and its error-feedback correction. Every byte goes through the
transport, which meters it per direction.

What :func:`check_codec` refuses, before any process starts: ``variant=rar`` (an all-reduce of
latents, which a server does not run), modes that apply pushes one by one (``async``, ``ssp``:
LGC-PS decodes a round at once) and several servers (one autoencoder over the whole support);
any codec that is not self-contained (PowerSGD) as a push codec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tandem.codecs.base import CODECS
from tandem.codecs.lgc.psserver import PSServerCode
from tandem.codecs.lgc.remote import PSWorkerCode
from tandem.errors import ConfigError
from tandem.flat import unflatten
from tandem.strategies.param_server.placement import (
    local_servers,
    placement_for,
    under_torchrun,
)
from tandem.strategies.param_server.wire import FLAG_FINAL

if TYPE_CHECKING:
    from tandem.strategies.param_server.server import PSServer
    from tandem.strategies.param_server.worker import PSWorker

#: push flag: the leader's extras (latent, scale, next support) follow the code
FLAG_LEAD = 16


def check_codec(cfg: Any, options: Any) -> None:
    """Refuse a push codec the parameter server cannot run as documented."""
    name = cfg.codec.name
    cls = CODECS[name]
    if name == "lgc":
        o = cls.Options.model_validate(cfg.codec.options)
        if o.variant != "ps":
            raise ConfigError("codec: 'lgc' variant=rar all-reduces the workers' latents, a "
                              "collective a parameter server does not run; on param_server use "
                              "--codec-opt variant=ps (LGC-PS: the server decodes), or run rar "
                              "under --strategy allreduce")
        if options.mode not in ("sync", "candidate"):
            raise ConfigError(f"codec: 'lgc' (LGC-PS) decodes a round of pushes at once (the "
                              f"leader's latent with every worker's innovation); mode="
                              f"{options.mode} applies pushes one by one: use mode=sync or "
                              "mode=candidate")
        servers = len(placement_for(cfg.workers, options).server_ranks) if under_torchrun() \
            else local_servers(options)
        if servers != 1:
            raise ConfigError(f"codec: 'lgc' (LGC-PS) trains one autoencoder over the whole "
                              f"top-k support on one server; got {servers} servers: use "
                              "servers=1")
        return
    if not cls.self_contained:
        ok = sorted(n for n, c in CODECS.items() if c.self_contained)
        raise ConfigError(f"codec: {name!r}: its documented exchange needs a collective among "
                          "the workers (PowerSGD all-reduces its factors with a shared Q), but a "
                          "parameter server's push is one worker's message that the server "
                          f"decodes alone; use one of {ok}, lgc with variant=ps, or a "
                          "collective strategy (allreduce, bsp_shared, pipeline)")


class LGCWorkerSide:
    """A worker's LGC-PS: encode the unpushed sum per the server's word, take its answer."""

    def __init__(self, worker: PSWorker) -> None:
        shapes = [tuple(p.shape) for p in worker.params]
        self.code = PSWorkerCode(worker.codecs[0], worker.index, worker.ctx.cfg.workers, shapes)
        self.last: dict[str, Any] = {}

    def push(self, worker: PSWorker, final: bool) -> list[torch.Tensor]:
        assert worker.unpushed is not None
        tensors, stage, lead = self.code.encode(worker.unpushed)
        flags = (FLAG_FINAL if final else 0) | (FLAG_LEAD if lead else 0)
        header = torch.tensor([worker.pushes, worker.oldest, worker.k, flags, stage],
                              dtype=torch.int64)
        self.last = {"lgc_stage": stage, "lgc_lead": lead}
        return [header, *tensors]

    def fields(self) -> dict[str, Any]:
        """Step-record fields of the last push."""
        return dict(self.last)

    def pulled(self, extras: list[torch.Tensor]) -> None:
        self.code.pulled(extras)

    def state_dict(self) -> dict[str, Any]:
        return self.code.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.code.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return self.code.describe()


class LGCServerSide:
    """The server's LGC-PS: decode a round of raw pushes at once, and the pulls' extras."""

    def __init__(self, server: PSServer) -> None:
        codec = server.ctx.make_codec()
        codec.set_total_steps(server.total)
        self.shapes = [tuple(p.shape) for p in server.params]
        self.index = {rank: i for i, rank in enumerate(server.ranks)}
        self.code = PSServerCode(codec, self.shapes, len(server.ranks))
        self.server = server
        self.stage = 1

    def decode_round(self, got: dict[int, tuple[list[int], list[torch.Tensor]]]
                     ) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """``{rank: (header, raw tensors)}`` -> ``{rank: (header, per-parameter gradient)}``."""
        pushes = {self.index[w]: (bool(h[3] & FLAG_LEAD), int(h[4]), ts, int(h[2]))
                  for w, (h, ts) in got.items()}
        remaining = [self.index[w] for w in sorted(self.server.active)
                     if not (w in got and got[w][0][3] & FLAG_FINAL)]
        flat = self.code.decode_round(pushes, remaining)
        out = {}
        for w, (h, _) in got.items():
            grads = unflatten(flat[self.index[w]], self.shapes)
            out[w] = (h, [g.reshape(p.shape) for g, p in zip(grads, self.server.params,
                                                              strict=True)])
        stages = sorted({int(h[4]) for h, _ in got.values()})
        if stages and stages[-1] != self.stage:  # a stage event in the run record
            self.stage = stages[-1]
            self.server.ctx.recorder.info(**{f"lgc_stage{self.stage}_round": self.code.round - 1,
                                             f"lgc_stage{self.stage}_progress":
                                             self.code.progress})
        return out

    def fields(self) -> dict[str, Any]:
        """Step-record fields of the round just decoded."""
        return {"lgc_stage": self.stage, "lgc_next_leader": None if self.code.leader_next
                is None else self.server.ranks[self.code.leader_next]}

    def extras(self, w: int, final: bool) -> list[torch.Tensor]:
        return [] if final else self.code.extras(self.index[w])

    def state_dict(self) -> dict[str, Any]:
        return {**self.code.state_dict(), "stage_seen": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.code.load_state_dict(state)
        self.stage = int(state.get("stage_seen", 1))

    def describe(self) -> dict[str, Any]:
        return self.code.describe()
