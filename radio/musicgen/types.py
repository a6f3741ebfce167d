"""The model wing's contract: what the engine hands a music model (:class:`ContinuationRequest`), what it gets
back (:class:`ContinuationResult`), and the :class:`MusicModel` protocol. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..config import Sampling

ANON = "\0anon"  # key prefix of requests without a station key: their rows are never kept across calls


@dataclass
class ContinuationRequest:
    """One station's share of a batched step.

    ``context``: int64 codes ``(codebooks, frames)``; may have 0 frames for a brand-new station.
    ``overlap``: how many of the last context frames to decode again in front of the new audio, so the
    engine can crossfade the join. ``prompt``: text conditioning.
    """

    context: np.ndarray
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    overlap: int = 0
    key: str = ""  # the station; a model may keep per-station state (KV cache) under it
    blend_from: str | None = None  # during a prompt blend: the previous prompt...
    blend: float = 1.0  # ...and the weight of the new one (0 = old prompt only, 1 = new prompt only)

    @property
    def decoded_overlap(self) -> int:
        """The overlap frames actually decoded: never more than the context has."""
        return min(self.overlap, self.context.shape[1])


@dataclass
class ContinuationResult:
    """New codes ``(codebooks, n)`` and float32 mono PCM for ``overlap + n`` frames.

    ``n`` is at least the frames asked for; rows that continue from a live cache while another row warms up
    may get a few more (the warm-up steps are not wasted on them)."""

    codes: np.ndarray
    pcm: np.ndarray
    overlap: int
    fresh: bool = True  # the station's context was (re)prefilled for this chunk (new, reset, or changed)


class MusicModel(Protocol):
    """What the engine needs from a music model."""

    sample_rate: int
    frame_rate: int
    num_codebooks: int
    samples_per_frame: int
    channels: int  # 1: PCM (samples,); 2: PCM (samples, 2)

    @property
    def batch_limit(self) -> int:
        """The most stations one continue_batch call should carry."""
        ...

    vocab_size: int  # codes are in [0, vocab_size): with the three above, whether two models share a code format

    def continue_batch(self, requests: Sequence[ContinuationRequest], frames: int) -> list[ContinuationResult]:
        """Generate ``frames`` new frames for every request in ONE batched pass. Raises
        :class:`~radio.errors.ConditioningError` (naming the request's key) before generating anything when one
        request's conditioning cannot be computed."""
        ...

    def forget(self, key: str) -> None:
        """Drop whatever the model keeps for the station ``key`` (it has left, or moved to another model)."""
        ...

    def memory_bytes(self) -> int:
        """Bytes the model holds (weights and decode state), for the pool's memory budget."""
        ...

    def describe(self) -> dict[str, str | int | None]:
        """How the model runs, for ``/status`` and ``/metrics``: ``device``, ``decoder`` (its decode path),
        ``kernels``, ``batch_limit``, ``decode_state_bytes`` (after the last chunk), and on the static path
        ``slots_used`` and ``slot_bytes`` (else None). Cheap, and safe to call from any thread."""
        ...
