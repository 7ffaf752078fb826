"""A small GPT-style decoder-only transformer for byte-level language modelling.

:class:`TinyGPT` maps ``(N, T)`` int64 token ids (``T <= context``) to ``(N, T, vocab)`` logits:
token and learned positional embeddings, ``layers`` pre-LN blocks (causal multi-head
self-attention, then a GELU MLP of width ``4 * d_model``, each on a residual branch), a final
LayerNorm and a linear output head, bias-free, optionally tied to the token embedding.

Parameters (:func:`parameter_count`), with ``d = d_model``, ``L = layers``, ``C = context``,
``V = vocab``::

    V*d (tokens) + C*d (positions) + L*(12*d^2 + 13*d) (blocks) + 2*d (final norm)
    + V*d more when the head is not tied

Each block holds ``qkv`` (3d^2 + 3d), ``proj`` (d^2 + d), two LayerNorms (4d) and the MLP
(8d^2 + 5d). ``textlm``'s defaults (d 128, 4 layers, 4 heads, context 64, untied, V 256) give
**867,072** parameters (tied: 834,304); d 192 with 6 layers 2,780,160; d 256 with 6 layers
4,886,528; d 256 with 12 layers and context 128 9,641,472.

Initialisation (why a fresh model's loss is ~ln V): every linear and embedding weight is drawn
from N(0, 0.02^2) and biases start at zero; the final LayerNorm gives features of norm ~sqrt(d),
so an untied head's logits are ~N(0, 0.02^2 * d) -- near zero -- and the softmax is near
uniform: loss ~ ln 256 = 5.545 (measured 5.55-5.58). A *tied* head starts lower (~5.4 on code):
the logit of the input byte itself is up to ~0.02 * d (2.6 at d 128), a built-in "repeat the
last byte" guess. The two projections that write into the residual stream (attention ``proj``,
MLP ``out``) are scaled down by ``1/sqrt(2 L)`` so the residual's variance does not grow with
depth (GPT-2's recipe).

Tuning: keep ``d_model / heads`` at 32 or 64; grow width and depth together. Forward plus
backward costs about ``6 * parameters + 6 * L * C * d`` floating-point operations per token
(the second term is attention), so a longer ``context`` costs little per token while ``C`` stays
well below ``12 * d``; it does cost memory (attention is ``C^2`` per head) and fewer windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.02


def parameter_count(d_model: int, layers: int, context: int, tie_weights: bool = False,
                    vocab: int = 256) -> int:
    """The exact number of parameters :class:`TinyGPT` has for these sizes (see module doc)."""
    d = d_model
    total = vocab * d + context * d + layers * (12 * d * d + 13 * d) + 2 * d
    return total if tie_weights else total + vocab * d


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``0..t`` only."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        # (N, T, 3d) -> three (N, heads, T, d/heads)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(n, t, d)))


class MLP(nn.Module):
    """Position-wise ``Linear(d, 4d) -> GELU -> Linear(4d, d)``."""

    def __init__(self, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer: ``(N, T)`` token ids -> ``(N, T, vocab)`` next-token logits.

    ``context`` is the longest sequence it accepts (the positional table's length);
    ``tie_weights`` shares the token embedding with the output head (saves ``vocab * d_model``
    parameters, small with a 256-byte vocabulary; off by default, since code that walks a
    ``state_dict`` would meet the shared tensor twice);
    ``dropout`` applies to the embeddings, the attention weights and both residual branches
    (0 by default: short runs on plenty of text do not overfit).
    """

    def __init__(self, vocab: int = 256, context: int = 64, d_model: int = 128, layers: int = 4,
                 heads: int = 4, tie_weights: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.context = vocab, context
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self._init_weights(layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, layers: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for residual_out in (block.attn.proj, block.mlp.out):
                nn.init.normal_(residual_out.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * layers))

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"TinyGPT takes (N, T) token ids; got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context "
                             f"({self.context})")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Extend ``prompt`` ((N, T) or (T,) ids) by ``new_tokens`` sampled tokens.

        Sees at most the last ``context`` tokens; ``temperature`` 0 picks the most likely
        token (greedy). For a byte model, ``bytes(out.tolist())`` is the text.
        """
        single = prompt.dim() == 1
        seq = prompt[None] if single else prompt
        was_training = self.training
        self.eval()
        try:
            for _ in range(new_tokens):
                logits = self(seq[:, -self.context:])[:, -1]
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                seq = torch.cat([seq, nxt], dim=1)
        finally:
            self.train(was_training)
        return seq[0] if single else seq


__all__ = ["Block", "CausalSelfAttention", "MLP", "TinyGPT", "parameter_count"]
