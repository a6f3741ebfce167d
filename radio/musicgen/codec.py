"""EnCodec: a chunk's codes to PCM for every station of a step, in as few calls as memory allows."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import ModelError

if TYPE_CHECKING:
    from .model import ContinuationRequest

logger = logging.getLogger(__name__)


class Codec:
    # Stations per EnCodec call. A call has a fixed cost (H100: ~15 ms for one station, ~28 ms for 16: its LSTM
    # steps through the frames one at a time) and ~30 MB of activations per station and 4 s chunk, so few large
    # calls are cheapest while memory lasts; an out-of-memory error halves the group. (A CPU batch is at most 16.)
    GROUP = 64

    def __init__(self, audio_encoder: Any, channels: int, samples_per_frame: int, device: str) -> None:
        self.audio_encoder = audio_encoder
        self.channels = channels
        self.samples_per_frame = samples_per_frame
        self.device = device
        self.group = self.GROUP  # halved on an out-of-memory error
        self.nonfinite = 0  # chunks whose audio had NaN/inf (replaced by silence)

    def decode(self, requests: Sequence["ContinuationRequest"], new_codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """EnCodec-decode each request's overlap + new frames: (samples,) mono or (samples, 2) stereo.
        Requests of equal length share a decoder call (up to a group)."""
        seqs = []
        for r, c in zip(requests, new_codes):
            ov = r.decoded_overlap
            seqs.append(np.concatenate([r.context[:, r.context.shape[1] - ov:], c], axis=1) if ov else c)
        out: list[np.ndarray | None] = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(s.shape[1], []).append(i)
        step = self.group
        groups = [idx[i:i + step] for idx in by_len.values() for i in range(0, len(idx), step)]
        with torch.inference_mode():
            while groups:
                idx = groups.pop(0)
                codes = torch.from_numpy(np.stack([seqs[i] for i in idx])).to(self.device)[None]
                # Stereo: the channels' codebooks interleave (left 0, right 0, ...); EnCodec decodes each channel.
                halves = [codes] if self.channels == 1 else [codes[:, :, c::2] for c in range(self.channels)]
                try:
                    audio = torch.cat([self.audio_encoder.decode(h, audio_scales=[None] * len(idx)).audio_values
                                       for h in halves], dim=1)  # (stations, channels, samples)
                except torch.OutOfMemoryError as exc:
                    if len(idx) == 1:
                        raise ModelError(f"out of device memory decoding one station's audio: {exc}") from exc
                    # Activations scale with the group: halve it (this chunk, and the ones after) and go on.
                    self.group = max(1, len(idx) // 2)
                    logger.warning("out of device memory in EnCodec with %d stations at once; now %d at once",
                                   len(idx), self.group)
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    g = self.group
                    groups[:0] = [idx[i:i + g] for i in range(0, len(idx), g)]
                    continue
                pcm_all = audio.float().cpu().numpy()
                if not np.isfinite(pcm_all).all():
                    self.nonfinite += 1
                    logger.error("decoded audio has non-finite samples (%d times so far); silenced", self.nonfinite)
                    pcm_all = np.nan_to_num(pcm_all, nan=0.0, posinf=0.0, neginf=0.0)
                for j, i in enumerate(idx):
                    pcm = pcm_all[j, :, : seqs[i].shape[1] * self.samples_per_frame]
                    out[i] = np.ascontiguousarray(pcm[0] if self.channels == 1 else pcm.T, dtype=np.float32)
        return [o for o in out if o is not None]
