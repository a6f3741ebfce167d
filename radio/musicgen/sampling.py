"""THE sampling of a decode step, for both decode paths: guidance per row, then temperature and top-k per row.

One function, so that a station's sound depends only on its own settings: never on its batch-mates, the device
or the KV layout (the tests hold a station's greedy codes alone, beside others and on both paths to be equal).
"""

from __future__ import annotations

import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, guidance: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance per row: ``uncond + (cond - uncond) * g`` for rows with g > 1, the conditional
    logits for the others (as transformers' ``generate`` does for a guidance scale of 1 or less). ``cond``,
    ``uncond``: (rows, K, V); ``uncond`` None when no row of the batch has an unconditional twin."""
    if uncond is None:
        return cond
    g = guidance[:, None, None]
    return torch.where(g > 1.0, uncond + (cond - uncond) * g, cond)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise: torch.Tensor,
           kmax: int) -> torch.Tensor:
    """Per-row temperature and top-k sampling from ``logits`` (rows, K, V) with uniform ``noise`` of the same
    shape (Gumbel-max: argmax(logits/T + Gumbel) is a draw from softmax(logits/T)); rows with temperature 0 or
    top-k 1 are greedy. ``kmax``: at least the largest top-k of the batch (fixed on the graph-captured path)."""
    B, K, V = logits.shape
    scaled = logits / temperature.clamp(min=1e-5)[:, None, None]
    kth = scaled.topk(kmax, dim=-1).values.gather(-1, (top_k.clamp(1, kmax) - 1)[:, None, None].expand(B, K, 1))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(noise.clamp(1e-10, 1.0 - 1e-7)))
    sampled = (scaled + gumbel).argmax(dim=-1)
    greedy = logits.argmax(dim=-1)
    return torch.where(((temperature <= 0) | (top_k <= 1))[:, None], greedy, sampled)
