"""A hand-written decoder (no Hugging Face): its own attention ``softmax(q @ k^T * scale + mask) @ v``,
a list of ``(k, v)`` tuples as the cache, and its own greedy loop.

Run it eager and compiled with the kvdrive backend and compare the tokens:

    python examples/handwritten_model.py
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TinyConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    max_len: int = 2048


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor]):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)          # [B, H, T, D]
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = torch.cat([past[0], k], dim=-2)                                          # [B, Hkv, P+T, D]
        v = torch.cat([past[1], v], dim=-2)
        p = k.shape[-2] - t
        mask = torch.full((t, p + t), float("-inf"), device=x.device).triu(p + 1)    # causal, offset p
        rep = self.heads // self.kv_heads
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ kk.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.softmax(scores, dim=-1) @ vv                                     # [B, H, T, D]
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x, past):
        a, kv = self.attn(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def empty_cache(self, batch: int) -> Cache:
        d = self.cfg.dim // self.cfg.heads
        shape = (batch, self.cfg.kv_heads, 0, d)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]

    def forward(self, ids: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        p = cache[0][0].shape[-2]
        x = self.embed(ids) + self.pos(torch.arange(p, p + ids.shape[1], device=ids.device))
        new_cache = []
        for block, past in zip(self.blocks, cache):
            x, kv = block(x, past)
            new_cache.append(kv)
        return self.head(x[:, -1]), new_cache


@torch.no_grad()
def greedy(forward, model: TinyLM, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the model's own cache; ``forward`` is ``model.forward`` or a compiled one."""
    cache = model.empty_cache(ids.shape[0])
    logits, cache = forward(ids, cache)
    out = [logits.argmax(-1)]
    for _ in range(new_tokens - 1):
        logits, cache = forward(out[-1][:, None], cache)
        out.append(logits.argmax(-1))
    return torch.stack(out, dim=1)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM(TinyConfig()).eval()
    ids = torch.randint(0, model.cfg.vocab, (2, 300))
    eager = greedy(model.forward, model, ids, 20)
    compiled = torch.compile(model.forward, backend="kvdrive",
                             options={"device_memory": "160KiB", "host_memory": "48KiB", "token_budget": None})
    ours = greedy(compiled, model, ids, 20)
    print("eager:  ", eager[0].tolist())
    print("kvdrive:", ours[0].tolist())
    print("identical" if torch.equal(eager, ours) else "DIFFERENT")


if __name__ == "__main__":
    main()
