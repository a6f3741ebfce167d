"""Station idents (jingles, station IDs): audio files loaded and levelled with pydub.

Any format ffmpeg reads works. Each file becomes mono float32 PCM at the model's sample rate, levelled to
the same RMS so idents sit together (the mount's loudness normalisation then places them with the music).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

IDENT_DBFS = -20.0
MAX_IDENT_SECONDS = 60.0


def load_ident(path: str, sample_rate: int, target_dbfs: float = IDENT_DBFS, channels: int = 1) -> np.ndarray:
    """Decode, mix to the station's channels, resample and level one ident: (samples,) or (samples, channels).
    Raises OSError/ValueError with a message on failure."""
    from pydub import AudioSegment
    from pydub.exceptions import CouldntDecodeError

    try:
        seg = AudioSegment.from_file(path)
    except (CouldntDecodeError, IndexError) as exc:
        raise ValueError(f"{path}: not an audio file ffmpeg can decode ({exc})") from exc
    if len(seg) / 1000 > MAX_IDENT_SECONDS:
        raise ValueError(f"{path}: {len(seg) / 1000:.0f} s long; idents are limited to {MAX_IDENT_SECONDS:.0f} s")
    seg = seg.set_channels(channels).set_frame_rate(sample_rate)
    if seg.dBFS != float("-inf"):
        seg = seg.apply_gain(target_dbfs - seg.dBFS)
    samples = np.array(seg.get_array_of_samples(), dtype=np.float32)
    if channels > 1:
        samples = samples.reshape(-1, channels)  # pydub interleaves the channels
    return np.clip(samples / float(1 << (8 * seg.sample_width - 1)), -1.0, 1.0)


def load_idents(paths: tuple[str, ...], sample_rate: int, station: str, channels: int = 1) -> list[np.ndarray]:
    """Every ident that loads; a broken one is logged and left out (the station still runs)."""
    out = []
    for p in paths:
        try:
            out.append(load_ident(p, sample_rate, channels=channels))
        except (OSError, ValueError) as exc:
            logger.error("%s: ident left out: %s", station, exc)
    return out
