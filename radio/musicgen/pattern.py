"""MusicGen's delay pattern, as one object for mono and stereo checkpoints.

Codebook k of frame f is fed to the decoder and predicted at column ``f + 1 + delay[k]`` (column 0 is BOS).
Mono checkpoints delay codebook k by k; stereo ones interleave the channels' codebooks (left 0, right 0, left
1, ...) and delay both codebooks of a pair alike, by k // 2 (transformers' ``build_delay_pattern_mask``;
audiocraft's ``DelayedPatternProvider``). A row prefilled with T frames of context feeds column T on its first
step; during its first ``max_delay`` steps the codebooks whose frame is still in the context are *forced*
from it instead of sampled, and from then on every step completes one frame.
"""

from __future__ import annotations

import numpy as np


class DelayPattern:
    def __init__(self, num_codebooks: int, channels: int = 1) -> None:
        if channels not in (1, 2) or num_codebooks % channels:
            raise ValueError(f"{num_codebooks} codebooks do not split into {channels} channel(s)")
        self.num_codebooks = num_codebooks
        self.channels = channels
        self.delays = np.arange(num_codebooks) // channels  # (K,)
        self.max_delay = int(self.delays[-1])

    def __repr__(self) -> str:
        return f"DelayPattern({self.num_codebooks} codebooks, {self.channels} channel(s))"

    def column(self, context: np.ndarray, column: int, pad: int) -> np.ndarray:
        """Column ``column`` over ``context`` (K, T): codebook k holds frame column - 1 - delay[k], or ``pad``."""
        return self.columns(context, column + 1, pad)[:, column]

    def columns(self, context: np.ndarray, count: int, pad: int) -> np.ndarray:
        """Columns ``0 .. count-1`` over ``context`` (K, T), (K, count)."""
        K, T = context.shape
        out = np.full((K, count), pad, dtype=np.int64)
        for k, d in enumerate(self.delays):
            end = min(count, T + d + 1)
            if end > d + 1:
                out[k, d + 1:end] = context[k, : end - d - 1]
        return out

    def warmup(self, context: np.ndarray, pad: int) -> np.ndarray:
        """forced (K, K): forced[k, j] is codebook k's value at warm-up step j (column T+1+j) while its frame
        T+j-delay[k] is still in the context (``pad`` before it), else -1 (sampled)."""
        K, T = context.shape
        forced = np.full((K, K), -1, dtype=np.int64)
        for k, d in enumerate(self.delays):
            for j in range(int(d)):
                f = T + j - int(d)
                forced[k, j] = context[k, f] if f >= 0 else pad
        return forced

    def frames(self, columns: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The frames that sampled ``columns`` (each (K,), the first one column T+1 of a row with T frames)
        complete, (K, n), and the columns still needed for frames not yet complete."""
        complete = len(columns) - self.max_delay
        if complete <= 0:
            return np.zeros((self.num_codebooks, 0), np.int64), columns
        new = np.stack([[columns[m + int(d)][k] for m in range(complete)] for k, d in enumerate(self.delays)])
        return new.astype(np.int64), columns[complete:]
