"""Built-in example models for the demo: plain torch, no downloads."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyTransformer", "example_inputs"]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, `layers` pre-norm blocks, final norm, LM head."""

    def __init__(
        self, vocab: int = 97, width: int = 32, heads: int = 4, layers: int = 4, max_len: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos[:, : input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def example_inputs(batch: int = 2, seq: int = 16, vocab: int = 97) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),)
