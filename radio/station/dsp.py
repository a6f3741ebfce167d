"""Small signal helpers shared by the engine (chunk joins) and stations (filler)."""

from __future__ import annotations

import numpy as np


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised correlation of two equal-length signals, clamped to [0, 1]."""
    den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if den <= 1e-12:
        return 0.0
    return float(min(1.0, max(0.0, np.dot(a, b) / den)))


def equal_power_crossfade(out_going: np.ndarray, in_coming: np.ndarray) -> np.ndarray:
    """Mix two equal-length float32 signals: ``out_going`` fades out, ``in_coming`` fades in, at constant power.

    The gains keep the *mixed* power constant for the correlation ``r`` the two signals actually have:
    g_out**2 + g_in**2 + 2*r*g_out*g_in == 1 at every sample. For unrelated audio (a filler loop, r ~ 0) this
    is the classic cos/sin equal-power fade; for two decodes of the same codes (a chunk join, r ~ 1) it
    becomes an amplitude-complementary fade, so the join has no +3 dB bump and no jump.
    """
    n = len(out_going)
    if n != len(in_coming):
        raise ValueError(f"crossfade needs equal lengths, got {n} and {len(in_coming)}")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    r = correlation(out_going.astype(np.float64), in_coming.astype(np.float64))
    p = np.sin((np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)) ** 2  # smooth 0 -> 1
    g_out, g_in = 1.0 - p, p
    k = 1.0 / np.sqrt(g_out ** 2 + g_in ** 2 + 2.0 * r * g_out * g_in)
    return (out_going * (g_out * k) + in_coming * (g_in * k)).astype(np.float32)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
