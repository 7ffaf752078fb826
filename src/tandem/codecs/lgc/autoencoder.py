"""LGC's autoencoder: a small 1-D convolutional encoder over the top-k value vector and one or
more transposed-convolution decoders, trained online on the workers' gathered vectors.

Shapes: a K-vector is zero-padded to ``L = 16 * ceil(K / 16)`` and seen as one channel. The
encoder has 4 stride-2 convolutions (kernel 4, padding 1: each halves the length) ending in 4
channels, so the latent has ``4 * L / 16 = L / 4`` floats (about K/4). Each decoder mirrors it
with 4 stride-2 transposed convolutions back to one channel of length L.

Loss (M1): ``lambda1 * reconstruction + lambda2 * code similarity``, with means instead of sums
(the same minimiser up to a rescaling of the lambdas, and independent of N and K):
reconstruction = mean_i MSE(D_i(E(v_i)), v_i) (plus, with per-worker decoders, MSE(D_i(E(v_r)),
v_i): the leader's code is what the decoders see in use); code similarity = mean over ordered
pairs i != j of MSE(E(v_i), E(v_j)).

Determinism: every worker builds the model from the same seed and trains it on the same gathered
tensors in the same order, so all copies stay bit-identical without exchanging weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives, Handle
    from tandem.transport.transport import Group

#: the largest K whose frozen linear autoencoder runs as matrices (a few MB); see AETrainer.linear
AFFINE_MAX_K = 1024


def padded_length(k: int) -> int:
    return 16 * max(1, math.ceil(k / 16))


def latent_size(k: int) -> int:
    """Floats in the latent of a K-vector: 4 channels x L/16."""
    return padded_length(k) // 4


def _act(kind: str) -> nn.Module:
    return nn.LeakyReLU(0.1) if kind == "leaky_relu" else nn.Identity()


def _stack(conv: type[nn.Module], sizes: list[int], act: str) -> nn.Sequential:
    """Four stride-2 (transposed) convolutions through ``sizes`` channels, ``act`` between."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(conv(sizes[i], sizes[i + 1], 4, stride=2, padding=1))
        if i < 3:
            layers.append(_act(act))
    return nn.Sequential(*layers)


def _encoder(ch: int, act: str) -> nn.Sequential:
    return _stack(nn.Conv1d, [1, ch, ch, ch, 4], act)


def _decoder(ch: int, act: str) -> nn.Sequential:
    return _stack(nn.ConvTranspose1d, [4, ch, ch, ch, 1], act)


class Autoencoder(nn.Module):
    """Encoder E and ``decoders`` decoders D_j (one for LGC-RAR, one per worker for LGC-PS)."""

    def __init__(self, k: int, decoders: int, channels: int, activation: str, seed: int) -> None:
        super().__init__()
        self.k, self.length = k, padded_length(k)
        self.encoder = _encoder(channels, activation)
        self.decoders = nn.ModuleList(_decoder(channels, activation) for _ in range(decoders))
        # PyTorch's default init (uniform, bound 1/sqrt(fan_in)) from a private generator, so
        # that copies built concurrently (threads) or anywhere else start identical.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, nn.Conv1d | nn.ConvTranspose1d):
                    bound = 1.0 / math.sqrt(mod.weight.shape[1] * mod.weight.shape[2])
                    mod.weight.uniform_(-bound, bound, generator=gen)
                    mod.bias.uniform_(-bound, bound, generator=gen)

    def pad(self, v: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, 1, L)."""
        return nn.functional.pad(v, (0, self.length - self.k)).unsqueeze(1)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, Z) latents."""
        return self.encoder(self.pad(v)).flatten(1)

    def decode(self, z: torch.Tensor, j: int = 0) -> torch.Tensor:
        """(B, Z) -> (B, K) through decoder ``j``."""
        out = self.decoders[j](z.view(z.shape[0], 4, -1))
        return out[:, 0, : self.k]


class AETrainer:
    """The autoencoder, its optimiser and its cost figures."""

    def __init__(self, k: int, decoders: int, *, channels: int = 16, activation: str = "none",
                 lr: float = 1e-3, lambda1: float = 0.5, lambda2: float = 0.5,
                 seed: int = 0) -> None:
        self.meta = {"k": k, "decoders": decoders, "channels": channels,
                     "activation": activation, "seed": seed}
        self.model = Autoencoder(k, decoders, channels, activation, seed)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.losses: list[float] = []
        self.train_s: list[float] = []
        self._maps: Any = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def memory_bytes(self) -> int:
        """Weights, gradients and Adam's two moments, fp32."""
        return 4 * 4 * self.n_params

    def loss(self, v: torch.Tensor, leader: int, ids: list[int] | None = None) -> torch.Tensor:
        """M1's loss on the workers' vectors ``v`` (N, K), already normalised. ``ids``: the
        decoder of each row (default row i -> decoder i; LGC-PS on a parameter server trains
        on the rows of the workers that pushed, which may be fewer)."""
        ae = self.model
        z = ae.encode(v)
        n = v.shape[0]
        if len(ae.decoders) == 1:
            recon = nn.functional.mse_loss(ae.decode(z, 0), v)
        else:
            rec = []
            for i in range(n):
                out = ae.decode(torch.stack([z[i], z[leader]]), i if ids is None else ids[i])
                rec.append(nn.functional.mse_loss(out[0], v[i]))
                if i != leader:
                    rec.append(nn.functional.mse_loss(out[1], v[i]))
            recon = torch.stack(rec).mean()
        if n > 1:
            diff = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).mean(-1)
            sim = diff.sum() / (n * (n - 1))
        else:
            sim = z.new_zeros(())
        return self.lambda1 * recon + self.lambda2 * sim

    def train_step(self, v: torch.Tensor, leader: int, iters: int = 1,
                   ids: list[int] | None = None) -> float:
        """``iters`` Adam steps on the gathered vectors ``v``. Gradients are enabled here: the
        codec may run where autograd has switched them off (inside a DDP comm hook, which DDP
        calls during backward)."""
        t0 = time.perf_counter()
        self._maps = None
        self.model.train()
        value = 0.0
        for _ in range(iters):
            self.opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = self.loss(v, leader, ids)
                loss.backward()
            self.opt.step()
            value = float(loss.detach())
        self.losses.append(value)
        self.train_s.append(time.perf_counter() - t0)
        return value

    def _affine(self) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, ...]]]:
        """The linear autoencoder as matrices: ``E(v) = W v + b`` and ``D_j(z) = W_j z + b_j``,
        read off the convolutions once (images of 0 and of the unit vectors) and cached until
        the next training step. Four strided convolutions through tiny tensors are a dozen
        module calls each; a matrix-vector product is one small kernel, so the frozen stage's
        encode and decode cost microseconds. Every worker derives the same matrices from the
        same weights the same way, and a matrix map is exactly affine, so the RAR identity
        ``D(mean z) = mean D(z_i)`` still holds (up to the summation order's rounding)."""
        if self._maps is None:
            m, k = self.model, self.model.k
            with torch.inference_mode():
                ze = m.encode(torch.cat([torch.zeros(1, k), torch.eye(k)]))
                z = ze.shape[1]
                basis = torch.cat([torch.zeros(1, z), torch.eye(z)])
                decs = []
                for j in range(len(m.decoders)):
                    out = m.decode(basis, j)
                    decs.append(((out[1:] - out[0]).t().contiguous(), out[0].clone()))
                self._maps = (((ze[1:] - ze[0]).t().contiguous(), ze[0].clone()), decs)
        return self._maps

    @property
    def linear(self) -> bool:
        """Use the matrix form: a linear autoencoder whose matrices stay small. Reading them
        off costs a batch of K + 1 vectors through the encoder and memory O(K^2), so beyond
        :data:`AFFINE_MAX_K` (a large model's K is in the thousands) the convolutions run."""
        return self.meta["activation"] == "none" and self.meta["k"] <= AFFINE_MAX_K

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        if self.linear:
            w, b = self._affine()[0]
            return torch.addmv(b, w, v)
        with torch.inference_mode():
            return self.model.encode(v.unsqueeze(0))[0]

    def decode(self, z: torch.Tensor, j: int = 0) -> torch.Tensor:
        if self.linear:
            w, b = self._affine()[1][j]
            return torch.addmv(b, w, z)
        with torch.inference_mode():
            return self.model.decode(z.unsqueeze(0), j)[0]

    def decode_all(self, z: torch.Tensor) -> torch.Tensor:
        """``(decoders, K)``: every decoder's output for the one latent ``z`` (LGC-PS's
        predictions). With the linear autoencoder this is one matrix-vector product through the
        decoders' matrices stacked; the result equals :meth:`decode` per decoder."""
        if self.linear:
            w, b = self._stacked()
            return torch.addmv(b, w, z).view(len(self.model.decoders), -1)
        return torch.stack([self.decode(z, j) for j in range(len(self.model.decoders))])

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        decs = self._affine()[1]
        if len(self._maps) == 2:  # stack once per frozen autoencoder (cleared with _maps)
            w = torch.cat([d[0] for d in decs]).contiguous()
            self._maps = (*self._maps, (w, torch.cat([d[1] for d in decs])))
        return self._maps[2]

    def checksum(self) -> torch.Tensor:
        """Three float64 sums of the weights: equal on all workers iff (almost surely) in sync."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        w = torch.arange(flat.numel(), dtype=torch.float64) / flat.numel()
        return torch.stack([flat.sum(), (flat * flat).sum(), (flat * w).sum()])

    def state_dict(self) -> dict[str, Any]:
        return {"meta": dict(self.meta), "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._maps = None
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.losses = list(state["losses"])


# ---- small helpers of lgc.py -------------------------------------------------------------

def rms(v: torch.Tensor) -> torch.Tensor:
    r = v.pow(2).mean().sqrt() if v.numel() else torch.ones(())
    return torch.where(r > 0, r, torch.ones(()))


def mean_ms(xs: list[float]) -> float | None:
    return 1000 * sum(xs) / len(xs) if xs else None


@dataclass
class Ctx:
    """One exchange's communication context."""

    transport: Collectives
    group: Group | None
    n: int
    me: int
    leader: int
    src: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum", category: str = "train") -> Handle:
        return self.transport.all_reduce(t, op, group=self.group, category=category)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.transport.all_gather(t, group=self.group).wait()

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return self.transport.broadcast(t, self.src, group=self.group).wait()
