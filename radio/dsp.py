"""Small signal helpers shared by the engine (chunk joins) and stations (filler)."""

from __future__ import annotations

import numpy as np


def equal_power_crossfade(out_going: np.ndarray, in_coming: np.ndarray) -> np.ndarray:
    """Mix two equal-length float32 signals: ``out_going`` fades out, ``in_coming`` fades in.

    Gains are cos/sin of a quarter turn, so gain_out**2 + gain_in**2 == 1 at every sample: for
    uncorrelated material (a new prompt, a filler loop) the loudness stays constant through the join.
    """
    n = len(out_going)
    if n != len(in_coming):
        raise ValueError(f"crossfade needs equal lengths, got {n} and {len(in_coming)}")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    t = (np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)
    return (out_going * np.cos(t) + in_coming * np.sin(t)).astype(np.float32)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
