"""THE chunk plan: which stations continue from their KV cache this chunk, which are prefilled from their codes,
and how many decode steps the chunk takes. A pure function of the rows' state and the requests, computed once
per chunk and handed to either KV layout (``decoding``: the CPU's chunk-sized buffers; ``slots``: the GPU's
fixed slots), so both paths place, reset and warm up rows by the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ChunkPlan:
    keep: tuple[int, ...]  # request indices whose row continues from its cache
    fresh: tuple[int, ...]  # request indices prefilled: new, codes their row does not continue, or a reset
    resets: tuple[int, ...]  # of ``fresh``: rows that did continue but reset at the window
    steps: int  # decode steps: the chunk's frames, plus the warm-up steps when any row is fresh


def resets_due(tokens: Mapping[int, int], window: int, frames: int, warmup: int,
               spread: bool = True) -> list[int]:
    """Which continuing rows (index -> tokens in its cache) reset this chunk: every row that would outgrow the
    window in it, and, when none must, the first in line if the rows due soon could not all get a chunk of their
    own (``spread``: resets come one per chunk instead of bunching, so no chunk pays for many prefills)."""
    worst = frames + warmup
    room = {j: (window - worst - t) // max(1, frames) for j, t in tokens.items()}  # chunks left (< 0: now)
    hard = [j for j in tokens if room[j] < 0]
    if not hard and spread:
        line = sorted(tokens, key=lambda j: room[j])
        if any(room[j] < p for p, j in enumerate(line)):
            hard = [line[0]]
    return hard


def plan_chunk(requests: int, continuing: Mapping[int, int], window: int, frames: int, warmup: int,
               spread: bool = True) -> ChunkPlan:
    """The plan for ``requests`` requests of ``frames`` frames, given ``continuing``: request index -> tokens in
    the cache of its row, for every request whose row continues its station's codes (the layout decides what
    "continues" means for it: same codes, same guidance layout). The others, and rows due a window reset, are
    prefilled; a fresh row needs ``warmup`` steps more (the delay pattern's ``max_delay``: K-1 for mono, K/2-1
    for stereo), so then the whole chunk takes them."""
    resets = resets_due(continuing, window, frames, warmup, spread)
    keep = tuple(i for i in sorted(continuing) if i not in resets)
    fresh = tuple(i for i in range(requests) if i not in keep)
    return ChunkPlan(keep, fresh, tuple(sorted(resets)), frames + (warmup if fresh else 0))
