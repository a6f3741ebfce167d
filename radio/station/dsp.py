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
    """Mix two equal-length float32 signals, (samples,) or (samples, channels): ``out_going`` fades out,
    ``in_coming`` fades in, at constant power.

    The gains keep the *mixed* power constant for the correlation ``r`` the two signals actually have:
    g_out**2 + g_in**2 + 2*r*g_out*g_in == 1 at every sample. For unrelated audio (a filler loop, r ~ 0) this
    is the classic cos/sin equal-power fade; for two decodes of the same codes (a chunk join, r ~ 1) it
    becomes an amplitude-complementary fade, so the join has no +3 dB bump and no jump.
    """
    n = len(out_going)
    if out_going.shape != in_coming.shape:
        raise ValueError(f"crossfade needs equal shapes, got {out_going.shape} and {in_coming.shape}")
    if n == 0:
        return np.zeros(out_going.shape, dtype=np.float32)
    r = correlation(out_going.astype(np.float64).ravel(), in_coming.astype(np.float64).ravel())
    p = np.sin((np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)) ** 2  # smooth 0 -> 1
    p = p.reshape(n, *([1] * (out_going.ndim - 1)))  # one gain per sample, for every channel
    g_out, g_in = 1.0 - p, p
    k = 1.0 / np.sqrt(g_out ** 2 + g_in ** 2 + 2.0 * r * g_out * g_in)
    return (out_going * (g_out * k) + in_coming * (g_in * k)).astype(np.float32)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0


class Ring:
    """The last ``capacity`` samples of a stream (mono, or ``channels`` per sample), kept in one preallocated
    buffer written in place."""

    def __init__(self, capacity: int, channels: int = 1) -> None:
        self.buf = np.zeros((max(1, capacity),) if channels == 1 else (max(1, capacity), channels), dtype=np.float32)
        self.size = 0
        self.end = 0  # where the next sample goes

    def __len__(self) -> int:
        return self.size

    def push(self, pcm: np.ndarray) -> None:
        cap, n = len(self.buf), len(pcm)
        if n >= cap:
            self.buf[:] = pcm[-cap:]
            self.end, self.size = 0, cap
            return
        first = min(n, cap - self.end)
        self.buf[self.end:self.end + first] = pcm[:first]
        self.buf[:n - first] = pcm[first:]
        self.end = (self.end + n) % cap
        self.size = min(cap, self.size + n)

    def drop_newest(self, n: int) -> None:
        n = min(n, self.size)
        self.size -= n
        self.end = (self.end - n) % len(self.buf)

    def samples(self) -> np.ndarray:
        """The kept samples, oldest first (a copy)."""
        start = (self.end - self.size) % len(self.buf)
        if start + self.size <= len(self.buf):
            return self.buf[start:start + self.size].copy()
        return np.concatenate([self.buf[start:], self.buf[:self.end]])
