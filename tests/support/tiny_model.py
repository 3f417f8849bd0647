"""A tiny encoder-decoder with the parts of a real WeNet ASR model that make
consolidation hard, each one on purpose:

- ``encoder.global_cmvn.mean/istd``: persistent buffers (WeNet's GlobalCMVN);
- ``encoder.pos_enc.pe``: a NON-persistent buffer, which must not be saved;
- ``encoder.embed``: a frozen front-end (``requires_grad=False``, as with LoRA);
- ``encoder.norm``: BatchNorm statistics that differ between ranks, and an
  int64 ``num_batches_tracked`` buffer that must keep its dtype;
- ``decoder.embed.0.weight`` tied to ``decoder.output_layer.weight``, the way
  WeNet's Whisper ties them (``tie_word_embedding: true``);
- nested modules (``encoder.encoders.N.*``).
"""

from __future__ import annotations

import torch
from torch import nn

FEAT_DIM = 8
VOCAB = 16
D_MODEL = 32
# A parameter whose element 0 the matrix job sets to -0.0 (tests/jobs/consolidate_matrix.py).
NEGATIVE_ZERO = "encoder.encoders.0.linear.bias"


class GlobalCMVN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, dim))
        self.register_buffer("istd", torch.linspace(0.5, 2.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.istd


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(self.norm(x)))


class Encoder(nn.Module):
    def __init__(self, num_blocks: int, max_len: int = 64, d_model: int = D_MODEL) -> None:
        super().__init__()
        self.global_cmvn = GlobalCMVN(FEAT_DIM)
        self.embed = nn.Linear(FEAT_DIM, d_model)
        self.embed.requires_grad_(False)
        self.norm = nn.BatchNorm1d(d_model)
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        self.register_buffer("pe", torch.sin(pos / 10.0).expand(max_len, d_model).clone(), persistent=False)
        self.encoders = nn.ModuleList(Block(d_model) for _ in range(num_blocks))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.global_cmvn(feats))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2) + self.pe[: x.size(1)]
        for block in self.encoders:
            x = block(x)
        return x


class Decoder(nn.Module):
    def __init__(self, d_model: int = D_MODEL) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Embedding(VOCAB, d_model))
        self.block = Block(d_model)
        self.output_layer = nn.Linear(d_model, VOCAB)
        nn.init.normal_(self.embed[0].weight, std=d_model**-0.5)
        self.output_layer.weight = self.embed[0].weight

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + memory.mean(dim=1, keepdim=True)
        return self.output_layer(self.block(x))


class TinyASR(nn.Module):
    """Features (B, T, FEAT_DIM) and tokens (B, U) in, logits (B, U, VOCAB) out."""

    def __init__(self, num_blocks: int = 2, d_model: int = D_MODEL) -> None:
        super().__init__()
        self.encoder = Encoder(num_blocks, d_model=d_model)
        self.decoder = Decoder(d_model)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.encoder(feats))


def make_batch(seed: int, batch: int = 2, frames: int = 12, tokens: int = 5) -> tuple[torch.Tensor, ...]:
    """A deterministic (feats, tokens, targets) batch; ``seed`` picks which."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, frames, FEAT_DIM, generator=g)
    ys = torch.randint(0, VOCAB, (batch, tokens + 1), generator=g)
    return feats, ys[:, :-1], ys[:, 1:]


def build_model(seed: int = 0, num_blocks: int = 2, d_model: int = D_MODEL) -> TinyASR:
    """The same initial weights on every rank, as WeNet gets from ``--checkpoint``.

    An odd ``d_model`` (e.g. 33) gives parameters of odd sizes, whose fragments
    straddle partition boundaries at any world size."""
    torch.manual_seed(seed)
    return TinyASR(num_blocks, d_model)
