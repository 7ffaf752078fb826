"""LGC-PS on a real parameter server (M1 step 4): the server's half. It holds one autoencoder
with one decoder per worker, runs the three stages on its own schedule, and decodes a round of
pushes at once (the leader's latent stands for every worker's values).

Schedule: the stage of a round follows the training progress the server has applied, the local
steps pushed so far divided by the number of workers (``progress``): in ``sync`` mode one per
round, so the stages fall on the same steps as under all-reduce; in ``candidate`` mode a round
carries several local steps, so the stages cover the same share of training in fewer rounds,
and the compressed stage waits until the autoencoder has had at least ``min(ae_steps, 10)``
training rounds (:data:`MIN_AE_ROUNDS`; raise ``ae_iters`` for more training per round).
The leader rotates over the workers that will push next (``leader="rotating"``) or is the
first of them (``"fixed"``). A stage that needs a support
before one exists (no leader has sent positions yet) falls back to the warm-up's code.

Decoding a round (:meth:`PSServerCode.decode_round`), per worker i:

* warm-up: its top-k values on its own positions (or its whole gradient, ``warmup="dense"``);
* autoencoder training: its exact values on the support ``I``; the server then takes
  ``ae_iters`` Adam steps on the round's vectors (scaled by the leader's RMS), decoder i on
  worker i's row, so a round with a lost worker trains on the others;
* compressed: ``p_i = s * D_i(z)`` from the leader's latent; the gain
  ``a_i = clamp(<u_i, p_i[S_i]> / <p_i[S_i], p_i[S_i]>, 0, 1)``, the least-squares fit of the
  prediction on the innovation's entries (*design choice*: the server does not know ``v_i``
  elsewhere; clamping at 1 never amplifies a prediction, clamping at 0 drops a prediction that
  points the wrong way); reconstruction ``a_i p_i`` with the innovation's entries exact. Without
  the leader's push (it died) the others' innovations are applied alone.

The dense layers are averaged exactly. Each worker's pull then carries its next stage, whether
it leads, the support, the encoder and its decoder once (when the compressed stage begins), and
``(z, s, a_i)`` so it can correct its error feedback (:mod:`.remote`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.codecs.lgc.autoencoder import AETrainer, latent_size, mean_ms, rms
from tandem.codecs.lgc.remote import new_trainer, shipped_parameters
from tandem.codecs.positions import pack_positions, unpack_positions

if TYPE_CHECKING:
    from tandem.codecs.lgc.codec import LGCCodec

#: the compressed stage waits for at least this many autoencoder training rounds (or the
#: stage-2 length in steps, if shorter), however many local steps the rounds carried
MIN_AE_ROUNDS = 10
#: one worker's push as the server sees it: (lead flag, stage, tensors, local steps)
Push = tuple[bool, int, list[torch.Tensor], int]


class PSServerCode:
    """The server's half of LGC-PS over workers ``0 .. workers-1`` (see the module docstring)."""

    def __init__(self, codec: LGCCodec, shapes: list[tuple[int, ...]], workers: int) -> None:
        self.codec, self.opts = codec, codec.opts
        self.p = codec.plan(shapes)
        self.n = workers
        self.progress = 0.0
        self.round = 0
        self.support: torch.Tensor | None = None
        self.stage_next = 1
        self.leader_next: int | None = codec.leader_at(0, workers)
        self.ae_sent = [False] * workers
        self.corr: dict[int, torch.Tensor] = {}
        self.first_round: dict[int, int] = {}  # stage -> the first round decoded in it
        self.leaderless = 0
        self.decode_s: list[float] = []
        self._packed_support: torch.Tensor | None = None
        self.ae: AETrainer | None = None

    def trainer(self) -> AETrainer:
        if self.ae is None:
            self.ae = new_trainer(self.codec, self.p, self.n)
        return self.ae

    # ---- one round -------------------------------------------------------------------------
    @torch.no_grad()
    def decode_round(self, pushes: dict[int, Push], remaining: list[int]
                     ) -> dict[int, torch.Tensor]:
        """Every pusher's flat gradient as the server reconstructs it; then the schedule moves
        on (``remaining``: the workers that will push next round, for the next leader)."""
        t0 = time.perf_counter()
        p = self.p
        dc = p.stop - p.start
        out: dict[int, torch.Tensor] = {}
        comp: dict[int, torch.Tensor] = {}
        trained: list[tuple[int, torch.Tensor, bool]] = []
        leader = next(((ts, i) for i, (lead, st, ts, _) in pushes.items() if lead and st == 3),
                      None)
        new_support = None
        for i in sorted(pushes):
            lead, stage, ts, _ = pushes[i]
            if lead and p.k:
                new_support, ts = unpack_positions(ts[-1], p.k, dc), ts[:-1]
            x = torch.zeros(dc)
            if stage == 1 and len(ts) == 2:  # dense warm-up (or no compressed layer)
                x.copy_(ts[0])
                dense = ts[1]
            elif stage == 1:
                k = ts[0].numel()
                x[unpack_positions(ts[1], k, dc)] = ts[0]
                dense = ts[2]
            elif stage == 2:
                assert self.support is not None
                x[self.support] = ts[0]
                trained.append((i, ts[0], lead))
                dense = ts[1]
            else:
                assert self.support is not None
                x[self.support] = self._reconstruct(i, ts, leader)
                dense = ts[2]
            comp[i] = x
            out[i] = self._join(x, dense.float())
        if trained:
            self._train(trained)
        if any(st == 3 for _, st, _, _ in pushes.values()) and leader is None:
            self.leaderless += 1
        for stage in {st for _, st, _, _ in pushes.values()}:
            self.first_round.setdefault(stage, self.round)
        self._advance(pushes, remaining, new_support)
        self.decode_s.append(time.perf_counter() - t0)
        return out

    def _reconstruct(self, i: int, ts: list[torch.Tensor],
                     leader: tuple[list[torch.Tensor], int] | None) -> torch.Tensor:
        p = self.p
        u, pos = ts[0], unpack_positions(ts[1], p.m, p.k)
        if leader is None:
            rec = torch.zeros(p.k)
            rec[pos] = u
            return rec
        z, s = leader[0][3], leader[0][4][0]
        pred = self.trainer().decode(z, i) * s
        ps = pred[pos]
        den = ps @ ps
        gain = ((u @ ps) / den).clamp(0.0, 1.0) if float(den) > 0 else torch.zeros(())
        gain = gain.to(torch.float32)
        rec = gain * pred
        rec[pos] = u
        self.corr[i] = torch.cat([z.float(), s.reshape(1).float(), gain.reshape(1)])
        return rec

    def _train(self, rows: list[tuple[int, torch.Tensor, bool]]) -> None:
        ids = [i for i, _, _ in rows]
        v = torch.stack([r for _, r, _ in rows])
        lead = next((k for k, (_, _, is_lead) in enumerate(rows) if is_lead), 0)
        self.trainer().train_step(v / rms(v[lead]), lead, self.opts.ae_iters, ids=ids)

    def _join(self, comp: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        p = self.p
        if not p.dense:
            return comp
        return torch.cat([dense[: p.start], comp, dense[p.start:]])

    def _advance(self, pushes: dict[int, Push], remaining: list[int],
                 new_support: torch.Tensor | None) -> None:
        self.round += 1
        self.progress += sum(k for _, _, _, k in pushes.values()) / self.n
        if new_support is not None:
            self.support = new_support
            self._packed_support = None
        stage = self.codec.stage_at(int(self.progress)) if self.p.k else 1
        trained = len(self.ae.losses) if self.ae is not None else 0
        if stage == 3 and trained < min(self.codec.stage_lengths()[1], MIN_AE_ROUNDS):
            stage = 2  # candidate rounds carry many steps: the autoencoder trains first
        self.stage_next = 1 if stage > 1 and self.support is None else stage
        live = sorted(remaining)
        self.leader_next = live[self.codec.leader_at(self.round, len(live))] if live else None

    # ---- what each pull carries --------------------------------------------------------------
    def extras(self, i: int) -> list[torch.Tensor]:
        """Worker ``i``'s pull extras: ``[info, (support), (encoder + D_i), (z, s, a_i)]``."""
        p = self.p
        parts: list[torch.Tensor] = []
        has_support = self.stage_next >= 2 and self.support is not None
        if has_support:
            if self._packed_support is None:
                assert self.support is not None
                self._packed_support = pack_positions(self.support, p.stop - p.start)
            parts.append(self._packed_support)
        has_ae = self.stage_next == 3 and not self.ae_sent[i]
        if has_ae:
            parts.append(torch.nn.utils.parameters_to_vector(
                shipped_parameters(self.trainer(), i)).detach().clone())
            self.ae_sent[i] = True
        corr = self.corr.pop(i, None)
        if corr is not None:
            parts.append(corr)
        info = torch.tensor([self.stage_next, int(i == self.leader_next), int(has_support),
                             int(has_ae), int(corr is not None), int(self.progress)],
                            dtype=torch.int64)
        return [info, *parts]

    # ---- state and report ------------------------------------------------------------------
    _SAVED = ("progress", "round", "support", "stage_next", "leader_next", "ae_sent",
              "first_round", "leaderless")

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._SAVED},
                "first_round": {str(k): v for k, v in self.first_round.items()},
                "corr": {str(k): v for k, v in self.corr.items()},
                "ae": None if self.ae is None else self.ae.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._SAVED:
            setattr(self, k, state[k])
        self.ae_sent = list(self.ae_sent)
        self.first_round = {int(k): int(v) for k, v in state["first_round"].items()}
        self.corr = {int(k): v for k, v in state["corr"].items()}
        self._packed_support = None
        if state["ae"] is not None:
            self.trainer().load_state_dict(state["ae"])

    def describe(self) -> dict[str, Any]:
        p, ae = self.p, self.ae
        info: dict[str, Any] = {
            "variant": "ps-server", "k": p.k, "m": p.m,
            "latent_floats": latent_size(p.k) if p.k else 0,
            "compressed_entries": p.stop - p.start, "rounds": self.round,
            "progress": self.progress, "stage_lengths": list(self.codec.stage_lengths()),
            "stage_first_round": {str(k): v for k, v in sorted(self.first_round.items())},
            "leaderless_rounds": self.leaderless, "decode_ms_per_round": mean_ms(self.decode_s),
            "decode_rounds": len(self.decode_s)}
        if ae is not None:
            info.update(ae_params=ae.n_params, ae_memory_bytes=ae.memory_bytes(),
                        ae_train_ms_per_step=mean_ms(ae.train_s),
                        ae_loss_first=ae.losses[0] if ae.losses else None,
                        ae_loss_last=ae.losses[-1] if ae.losses else None,
                        ae_train_rounds=len(ae.losses))
        return info

