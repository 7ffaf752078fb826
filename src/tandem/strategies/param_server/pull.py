"""Pulls: how the global model travels from a server back to a worker (option ``pull``).

* ``dense`` / ``fp16`` (whole-model pulls, as always): the server sends its shard's parameters
  in fp32 or fp16 with :meth:`~tandem.transport.transport.Transport.send_packed`; the worker
  knows the specs. fp16 rounds the worker's model at each merge.
* any other self-contained codec (``pull=topk``, ``pull_options={ratio: 0.01}``; ``bf16``,
  ``qsgd``, ``randomk``, ``signsgd``): the server sends each worker the *change* of its shard
  since what that worker holds, encoded by the codec, and keeps per worker the view ``v_w`` the
  worker holds (the sum of everything it decoded). Error feedback lives on the server: the
  delta it encodes is ``theta - v_w``, i.e. the change since the last pull plus what earlier
  pulls did not carry, so nothing is lost, only delayed: after every pull
  ``theta - (worker's model) == theta - v_w``, the residual, exactly (both ends add the same
  decoded code to the same view). The codec's own error feedback is switched off (the server's
  view plays that part) and ``codec.step`` travels in the header (random-k's positions). The
  last answer of the run is the whole model in fp32, so every worker ends on the server's
  parameters. Codecs that are not self-contained (PowerSGD, LGC) are refused before start: a
  pull is one message that a worker decodes alone.

Wire: a whole-model pull is ``[header, *pieces]`` (``send_packed``); a coded pull (and any pull
that carries LGC-PS extras) is a self-describing message (``send_message``)
``[header, (meta JSON), *code or pieces, *extras]`` with the header
``[version, flags, codec step, number of extras]``. The worker receives it on a small thread that
chains the three receives (count, header, payload) and polls a :class:`Pending` like any other.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from tandem.codecs.base import CODECS, Codec, Message
from tandem.errors import ConfigError
from tandem.strategies.param_server.options import WHOLE_MODEL_PULLS
from tandem.strategies.param_server.sharding import ShardPlan, split
from tandem.strategies.param_server.wire import (
    FLAG_FINAL,
    FLAG_META,
    PULL_HEADER,
    meta_from_bytes,
    meta_to_bytes,
    pull_dtype,
    pull_specs,
)
from tandem.transport.liveness import Pending
from tandem.transport.packing import specs_from_header
from tandem.transport.store_barrier import wait_on

#: pull flag: the shard's parameters follow whole (fp32), not a code of their change
FLAG_WHOLE = 8
#: seed offset of the pull codecs (random-k's positions), apart from the push codecs'
PULL_SEED = 7919


def check_pull(opts: Any) -> None:
    """Refuse a pull codec that cannot work, before any process starts."""
    name = opts.pull
    if name in WHOLE_MODEL_PULLS:
        if opts.pull_options:
            raise ConfigError(f"strategy.options.pull_options: pull={name} takes no options")
        return
    if name not in CODECS:
        raise ConfigError(f"strategy.options.pull: unknown codec {name!r}; choose one of "
                          f"{sorted(CODECS.names())}")
    cls = CODECS[name]
    if not cls.self_contained:
        ok = sorted(n for n, c in CODECS.items() if c.self_contained)
        raise ConfigError(f"strategy.options.pull: {name!r} is not self-contained (its decode "
                          "needs state or a protocol shared among the workers), but a pull is "
                          "one message that a worker decodes alone; use one of "
                          f"{ok}")
    try:
        codec_opts = cls.Options.model_validate(opts.pull_options)
    except Exception as err:  # noqa: BLE001 - pydantic's message names the option
        raise ConfigError(f"strategy.options.pull_options: {name}: {err}") from None
    if getattr(codec_opts, "momentum", 0.0):
        raise ConfigError("strategy.options.pull_options: momentum: a pull codes the model's "
                          "change, not a gradient; leave momentum at 0")


def make_pull_codec(opts: Any, seed: int) -> Codec:
    codec = CODECS[opts.pull](dict(opts.pull_options), seed=seed + PULL_SEED)
    codec.feedback = False  # the server's per-worker view is the error feedback
    return codec


def coded(opts: Any) -> bool:
    """Whether pulls carry a code of the model's change (not the whole model)."""
    return opts.pull not in WHOLE_MODEL_PULLS


class PullSender:
    """A server's pulls: the whole shard, or per worker a code of its change (with the view)."""

    def __init__(self, opts: Any, params: list[torch.Tensor], workers: list[int],
                 seed: int) -> None:
        self.coded = coded(opts)
        self.dtype = pull_dtype(opts.pull)
        self.codecs: dict[int, Codec] = {}
        self.views: dict[int, list[torch.Tensor]] = {}
        self.last_meta: dict[int, bytes | None] = {}
        if self.coded:
            for w in workers:
                self.codecs[w] = make_pull_codec(opts, seed)
                self.views[w] = [p.detach().float().clone() for p in params]
                self.last_meta[w] = None

    def message(self, w: int, version: int, params: list[torch.Tensor], final: bool,
                extras: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], bool]:
        """What to send worker ``w``: ``(tensors, self_describing)``."""
        flags = FLAG_FINAL if final else 0
        if not self.coded and extras is None:  # today's whole-model pull, byte for byte
            header = torch.tensor([version, flags] + [0] * (PULL_HEADER - 2), dtype=torch.int64)
            return [header, *[p.detach().to(self.dtype) for p in params]], False
        extras = extras or []
        body: list[torch.Tensor]
        step = 0
        if not self.coded or final:
            flags |= FLAG_WHOLE
            dtype = self.dtype if not self.coded else torch.float32
            body = [p.detach().to(dtype) for p in params]
            if self.coded:
                self.views[w] = [p.detach().float().clone() for p in params]
        else:
            codec, view = self.codecs[w], self.views[w]
            step = codec.step
            delta = [p.detach().float() - v for p, v in zip(params, view, strict=True)]
            msg = codec.encode(delta)
            codec.step = step
            for v, d in zip(view, codec.decode(msg), strict=True):
                v.add_(d.float().reshape(v.shape))
            codec.step = step + 1
            meta = meta_to_bytes(msg.meta)
            body = list(msg.tensors)
            if meta != self.last_meta[w]:
                flags |= FLAG_META
                body = [torch.frombuffer(bytearray(meta), dtype=torch.uint8), *body]
                self.last_meta[w] = meta
        header = torch.tensor([version, flags, step, len(extras)], dtype=torch.int64)
        return [header, *body, *extras], True

    def residual(self, w: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``theta - v_w``: what worker ``w`` still lacks of this shard (zeros when whole)."""
        if not self.coded:
            return [torch.zeros_like(p, dtype=torch.float32) for p in params]
        return [p.detach().float() - v for p, v in zip(params, self.views[w], strict=True)]

    def residual_norm(self, w: int, params: list[torch.Tensor]) -> float:
        if not self.coded:
            return 0.0
        return float(torch.stack([r.norm() for r in self.residual(w, params)]).norm())

    def state_dict(self) -> dict[str, Any]:
        return {"views": {str(w): [v.clone() for v in vs] for w, vs in self.views.items()},
                "steps": {str(w): c.step for w, c in self.codecs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for w, vs in state.get("views", {}).items():
            self.views[int(w)] = [v.clone() for v in vs]
        for w, step in state.get("steps", {}).items():
            self.codecs[int(w)].step = int(step)
        self.last_meta = dict.fromkeys(self.last_meta)  # the meta is sent again


class PullReceiver:
    """A worker's pulls from every server: posts the receive, and turns what arrived into the
    shard's model (the worker's view of it) plus the extras (LGC-PS) the server appended."""

    def __init__(self, opts: Any, plan: ShardPlan, servers: list[int], base: list[torch.Tensor],
                 seed: int, message: bool = False) -> None:
        self.coded = coded(opts)
        self.message = self.coded or message
        self.plan, self.servers = plan, servers
        self.specs = [pull_specs(plan.shapes_of(s), pull_dtype(opts.pull))
                      for s in range(len(servers))]
        self.codecs = [make_pull_codec(opts, seed) for _ in servers] if self.coded else []
        self.meta: list[dict[str, Any]] = [{} for _ in servers]
        self.stop = threading.Event()
        self.reset(base)

    def reset(self, base: list[torch.Tensor]) -> None:
        """The views from the worker's model of the global parameters (start, resume)."""
        self.views = [[t.float().clone() for t in part] for part in split(base, self.plan)]

    def post(self, transport: Any, s: int) -> Pending:
        rank = self.servers[s]
        if not self.message:
            return transport.recv_packed(self.specs[s], rank)
        return recv_message(transport, rank, self.stop)

    def take(self, s: int, got: list[torch.Tensor]) -> tuple[int, list[torch.Tensor],
                                                             list[torch.Tensor]]:
        """``(version, this shard's pieces, extras)`` from what server ``s`` sent."""
        header = [int(v) for v in got[0].tolist()]
        if not self.message:
            return header[0], list(got[1:]), []
        n_extra = header[3]
        body = list(got[1: len(got) - n_extra])
        extras = list(got[len(got) - n_extra:]) if n_extra else []
        if header[1] & FLAG_WHOLE:
            self.views[s] = [t.float().clone() for t in body]
            return header[0], body, extras
        if header[1] & FLAG_META:
            self.meta[s] = meta_from_bytes(body[0].numpy().tobytes())
            body = body[1:]
        codec = self.codecs[s]
        codec.step = header[2]
        for v, d in zip(self.views[s], codec.decode(Message(body, dict(self.meta[s]))),
                        strict=True):
            v.add_(d.float().reshape(v.shape))
        return header[0], self.views[s], extras


def recv_message(transport: Any, src: int, stop: threading.Event) -> Pending:
    """Receive one :meth:`~tandem.transport.transport.Transport.send_message` from ``src``
    without blocking the caller: the first receive is posted now (so tags stay in order), a
    thread chains the header's and the payload's, and the returned handle completes with the
    tensors (or the error). Its waits last as long as ``src`` lives."""
    out = Pending(f"pull from rank {src}", transport.liveness, [src], transport.timeout_s)
    count = transport.recv(torch.empty(1, dtype=torch.int64), src)

    def chain() -> None:
        try:
            n = wait_on(count, transport, src, None, stop)
            header = torch.empty(int(n.item()), dtype=torch.int64)
            wait_on(transport.recv(header, src), transport, src, None, stop)
            out.set_result(wait_on(transport.recv_packed(specs_from_header(header), src),
                                   transport, src, None, stop))
        except BaseException as err:  # noqa: BLE001 - the caller's wait raises it
            out.set_error(err)

    threading.Thread(target=chain, daemon=True, name=f"ps-pull-{src}").start()
    return out
