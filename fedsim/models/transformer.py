"""A small causal character-level transformer, vmappable across clients.

Decoder-only, GPT-style with pre-LayerNorm: ``h_0 = embed(x) + pos_embed(0..L-1)``; per block
``h <- h + proj(attn(ln_1(h)))`` and ``h <- h + mlp(ln_2(h))`` with ``mlp = fc_2(GELU(fc_1(.)))`` (4x width);
then ``ln_f`` and the output ``head``. Attention is written out (``softmax(q k^T / sqrt(d) + causal mask) v``,
no fused kernels, no ``nn.MultiheadAttention``) so ``torch.func.vmap(functional_call)`` runs many clients'
copies at once. No dropout and no running statistics.

For the engine's classification loss the forward returns the logits of the character that FOLLOWS the input
window, i.e. the last position's logits ``[B, vocab]``; :meth:`CharTransformer.hidden` gives every
position's final hidden state (causal: position ``t`` depends on ``x[:, :t+1]`` only).

Parameter names: ``embed`` (token ``nn.Embedding``), ``pos_embed`` (learned positions, ``nn.Embedding``),
``blocks.{i}.{ln_1,qkv,proj,ln_2,fc_1,fc_2}``, ``ln_f``, ``head`` (output ``nn.Linear``), so optimizers can
treat the embeddings and the head apart from the hidden matrices.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor, nn

from fedsim.core.components import option
from fedsim.core.errors import FedsimError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        b, length, width = h.shape
        d = width // self.heads
        qkv = self.qkv(h).reshape(b, length, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # [3, B, H, L, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # [B, H, L, L]
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, length, width)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then a GELU MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.fc_1 = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU()
        self.fc_2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.fc_2(self.act(self.fc_1(self.ln_2(h))))


class CharTransformer(nn.Module):
    """Causal decoder-only transformer over character indices ``[B, L]`` (any float or integer dtype)."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        num_classes: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """GPT-2's initialization: N(0, 0.02) weights, zero biases, residual projections scaled by
        ``1/sqrt(2 layers)``; LayerNorms at (1, 0)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "fc_2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def hidden(self, x: Tensor) -> Tensor:
        """Final (``ln_f``-normalized) hidden states of every position, ``[B, L, width]``."""
        tokens = x.long()
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        h = self.embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the next character after each input window, ``[B, num_classes]``."""
        return self.head(self.hidden(x)[:, -1])


def char_transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    width: Annotated[int, option("embedding width (a multiple of heads)", ge=1)] = 128,
    layers: Annotated[int, option("transformer blocks", ge=1)] = 2,
    heads: Annotated[int, option("attention heads", ge=1)] = 4,
    mlp_ratio: Annotated[int, option("MLP width / embedding width", ge=1)] = 4,
    vocab_size: Annotated[int | None, option("token vocabulary (default: num_classes)", ge=1)] = None,
) -> nn.Module:
    """Character-level causal transformer for next-character prediction (dataset ``shakespeare``).

    ``input_shape`` is ``(L,)``: windows of ``L`` character indices; the learned positional embedding has
    ``L`` rows. The vocabulary defaults to ``num_classes`` (the next character is one of the input
    characters). Defaults: 2 layers, width 128, 4 heads, MLP 4x (about 0.43 M parameters with 81 characters).
    Options: ``width``, ``layers``, ``heads``, ``mlp_ratio``, ``vocab_size``.
    """
    if len(input_shape) != 1:
        raise FedsimError(
            "model 'char_transformer' needs sequences of character indices (shape (L,), e.g. dataset "
            f"'shakespeare'); the dataset gives shape {tuple(input_shape)}"
        )
    for label, value in (("width", width), ("layers", layers), ("heads", heads), ("mlp_ratio", mlp_ratio)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FedsimError(f"char_transformer {label} must be an integer >= 1, got {value!r}")
    if width % heads:
        raise FedsimError(f"char_transformer width {width} is not divisible by heads {heads}")
    vocab = num_classes if vocab_size is None else int(vocab_size)
    return CharTransformer(int(input_shape[0]), vocab, num_classes, width, layers, heads, mlp_ratio)
