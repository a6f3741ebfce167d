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


SNR_FLOOR_DB = 30.0  # bf16 EnCodec is used where its audio stays this far above its difference from float32
PROBE_FRAMES = 100  # 2 s of random codes


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
        self.dtype = "float32"
        self.snr_db: float | None = None  # bf16 against float32 on the load's probe, where it was measured

    def set_dtype(self, wanted: str, when_auto: bool) -> None:
        """EnCodec in ``bfloat16`` or ``float32`` (``auto``: bfloat16 where ``when_auto`` and a probe agrees).

        On a CPU with bf16 instructions EnCodec decodes a chunk in about half the time in bf16 (2-core AMD EPYC,
        small shape, 4 s chunk: 0.49 s -> 0.25 s), a tenth of a real-time budget. It turns codes into the audio
        the listener hears, so bf16 is checked first: a probe (2 s of random codes) decoded both ways, and bf16
        kept for ``auto`` only where its audio stays ``SNR_FLOOR_DB`` above the difference."""
        if wanted == "float32" or (wanted == "auto" and not when_auto):
            return
        try:
            self.snr_db = self._probe_snr()
        except Exception as exc:  # noqa: BLE001 - a bf16 op missing on this machine: float32, as before
            logger.warning("EnCodec cannot run in bf16 here (%s); keeping float32", exc)
            return
        if wanted == "auto" and not self.snr_db >= SNR_FLOOR_DB:
            logger.warning("EnCodec in bf16 differs from float32 by %.1f dB SNR on a probe (under %.0f dB); "
                           "keeping float32", self.snr_db, SNR_FLOOR_DB)
            return
        self.audio_encoder.to(torch.bfloat16)
        self.dtype = "bfloat16"
        logger.info("EnCodec in bf16 (%.1f dB SNR against float32 on a probe)", self.snr_db)

    def _probe_snr(self) -> float:
        """Signal-to-noise ratio (dB) of bf16 EnCodec's audio against float32's, over random codes."""
        import copy

        gen = torch.Generator().manual_seed(0)
        config = self.audio_encoder.config
        codes = torch.randint(0, int(config.codebook_size), (1, 1, int(config.num_quantizers), PROBE_FRAMES),
                              generator=gen).to(self.device)
        half = copy.deepcopy(self.audio_encoder).to(torch.bfloat16)
        with torch.inference_mode():
            want = self.audio_encoder.decode(codes, audio_scales=[None]).audio_values.float()
            got = half.decode(codes, audio_scales=[None]).audio_values.float()
        del half
        noise = float((got - want).pow(2).sum())
        return float("inf") if noise == 0 else 10 * float(np.log10(float(want.pow(2).sum()) / noise))

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
