"""A Whisper-large-v3-shaped encoder-decoder in plain torch, for bench/gpu.py (random weights).

Shapes from WeNet's examples/aishell/whisper/conf/finetune_whisper_largev3.yaml:
d_model 1280, 20 heads, 32 encoder + 32 decoder blocks, FFN 5120, conv1d2 front
end over 128 mel bins, vocabulary 51866 with the decoder embedding tied to the
output layer, a learnable 448-position decoder PE, a CTC projection. Keys
without bias (``key_bias: false``) as in Whisper. About 1.6 B parameters;
WeNet itself is not needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, HEADS, FFN, MELS, VOCAB, MAX_TOKENS = 1280, 20, 5120, 128, 51866, 448


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_q, self.linear_k = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: bool = False) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.size(0), t.size(1), self.heads, -1).transpose(1, 2)

        q, k, v = split(self.linear_q(x)), split(self.linear_k(memory)), split(self.linear_v(memory))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.linear_out(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, cross: bool) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(d), Attention(d, heads)
        self.norm2 = nn.LayerNorm(d) if cross else None
        self.src_attn = Attention(d, heads) if cross else None
        self.norm3 = nn.LayerNorm(d)
        self.feed_forward = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, causal=self.src_attn is not None)
        if self.src_attn is not None:
            x = x + self.src_attn(self.norm2(x), memory)
        return x + self.feed_forward(self.norm3(x))


class WhisperLarge(nn.Module):
    def __init__(self, blocks: int = 32, vocab: int = VOCAB) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(MELS, D_MODEL, 3, padding=1), nn.GELU(),
                                  nn.Conv1d(D_MODEL, D_MODEL, 3, stride=2, padding=1), nn.GELU())
        self.encoders = nn.ModuleList(Block(D_MODEL, HEADS, FFN, cross=False) for _ in range(blocks))
        self.encoder_norm = nn.LayerNorm(D_MODEL)
        self.embed = nn.Embedding(vocab, D_MODEL)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, D_MODEL) * 0.02)
        self.decoders = nn.ModuleList(Block(D_MODEL, HEADS, FFN, cross=True) for _ in range(blocks))
        self.decoder_norm = nn.LayerNorm(D_MODEL)
        self.output_layer = nn.Linear(D_MODEL, vocab, bias=False)
        self.output_layer.weight = self.embed.weight  # tie_word_embedding: true
        self.ctc = nn.Linear(D_MODEL, vocab)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(feats.transpose(1, 2)).transpose(1, 2)
        for block in self.encoders:
            x = block(x)
        memory = self.encoder_norm(x)
        y = self.embed(tokens) + self.pos[: tokens.size(1)]
        for block in self.decoders:
            y = block(y, memory)
        logits = self.output_layer(self.decoder_norm(y))
        ctc = self.ctc(memory)
        return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) + ctc.float().logsumexp(-1).mean() * 0
