"""The continuation engine: one thread, the only caller of the model.

Each step it takes the stations that are below their buffer target, hungriest first, and continues them all
in ONE batched model call. A station's first chunk is short so it is on air within seconds; after that chunks
are ``chunk_seconds`` long. The model decodes each chunk with ``overlap_frames`` of context in front; the
engine joins consecutive chunks with an equal-power crossfade over that overlap, holding back the last
``crossfade_ms`` of every chunk until the next one arrives, so nothing is repeated and nothing is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from .config import EngineConfig
from .dsp import equal_power_crossfade
from .model import ContinuationRequest, MusicModel
from .station import Station

logger = logging.getLogger(__name__)


class Engine:
    """Schedules generation for all stations on one model."""

    def __init__(self, model: MusicModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self._stations: dict[str, Station] = {}
        self._tails: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.failures = 0
        self.last_batch: list[str] = []
        self.last_step_seconds = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=32)  # (audio seconds, wall seconds)

    # -- stations --------------------------------------------------------------------------------------------
    def add_station(self, station: Station) -> None:
        with self._lock:
            self._stations[station.key] = station
            self._tails.pop(station.key, None)
        self._wake.set()

    def remove_station(self, key: str) -> None:
        with self._lock:
            self._stations.pop(key, None)
            self._tails.pop(key, None)
        forget = getattr(self.model, "forget", None)
        if forget is not None:
            forget(key)  # next engine step is on this thread or after it: the model's lock serialises

    def stations(self) -> list[Station]:
        with self._lock:
            return list(self._stations.values())

    # -- scheduling ------------------------------------------------------------------------------------------
    def pick_batch(self) -> list[Station]:
        """The stations to continue in the next step, least audio buffered first, at most ``max_batch``.

        A step happens when any station is below its buffer target. It then takes along every station with
        room for one more chunk (buffered < target + chunk): an extra row costs almost nothing, and it keeps
        the stations in step, so they keep meeting in the same batch instead of drifting into one-row steps.
        Queues stay bounded at about target + 2 chunks.
        """
        stations = self.stations()
        if not any(s.needs_audio() for s in stations):
            return []
        limit = self.config.buffer_seconds + self.config.chunk_seconds
        batch = [s for s in stations if s.buffered_seconds < limit]
        batch.sort(key=lambda s: (s.has_audio, s.buffered_seconds))
        return batch[: self.config.max_batch]

    def run_once(self) -> bool:
        """One batched step. Returns False when no station needed audio."""
        batch = self.pick_batch()
        if not batch:
            return False
        fps = self.model.frame_rate
        # A new station starts with a short chunk and doubles up to chunk_seconds, so it is on air within
        # seconds and its buffer grows ahead of the next, longer step.
        youngest = min(s.chunks for s in batch)
        seconds = min(self.config.chunk_seconds, self.config.first_chunk_seconds * 2 ** youngest)
        frames = max(1, int(round(seconds * fps)))
        requests = []
        for s in batch:
            prompt, blend_from, blend = s.conditioning(frames)
            requests.append(ContinuationRequest(context=s.context(), prompt=prompt, sampling=s.config.sampling,
                                                overlap=min(self.config.overlap_frames, s.context().shape[1]),
                                                key=s.key, blend_from=blend_from, blend=blend))
        t0 = time.monotonic()
        results = self.model.continue_batch(requests, frames)
        wall = time.monotonic() - t0
        with self._lock:
            live = set(self._stations)
        for station, result in zip(batch, results):
            if station.key not in live:
                continue  # removed while we generated
            silent = station.push(self._join(station.key, result.pcm, result.overlap))
            station.append_codes(result.codes)
            self._watch_silence(station, silent, result.codes.shape[1])
        self.steps += 1
        self.last_batch = [s.mount for s in batch]
        self.last_step_seconds = wall
        self._recent.append((sum(r.codes.shape[1] for r in results) / fps, wall))
        logger.debug("step %d: %d stations x %d frames in %.2fs", self.steps, len(batch), frames, wall)
        return True

    def _watch_silence(self, station: Station, silent: bool, frames: int) -> None:
        """MusicGen continuations can fade into silence and stay there: after ``silence_seconds`` of it, skip
        the silent audio still queued and let the next chunk start from a fresh context."""
        station.silent_frames = station.silent_frames + frames if silent else 0
        if station.silent_frames < self.config.silence_seconds * self.model.frame_rate:
            return
        seconds = station.silent_frames / self.model.frame_rate
        dropped = station.restart_context()
        self._tails.pop(station.key, None)
        logger.warning("%s: %.0f s of near-silence from the generator; skipped %.1f s and starting from a "
                       "fresh context", station.mount, seconds, dropped)

    def _join(self, key: str, pcm: np.ndarray, overlap: int) -> np.ndarray:
        spf = self.model.samples_per_frame
        body_start = overlap * spf
        xf = min(int(self.config.crossfade_ms / 1000 * self.model.sample_rate), body_start, len(pcm) // 4)
        tail = self._tails.get(key)
        if tail is not None and 0 < len(tail) <= body_start:
            head = equal_power_crossfade(tail, pcm[body_start - len(tail): body_start])
        elif tail is not None:
            head = tail  # no overlap decoded (context was reset): play the held tail as is
        else:
            head = np.zeros(0, np.float32)
        end = len(pcm) - xf
        self._tails[key] = pcm[end:].copy()
        return np.concatenate([head, pcm[body_start:end]]).astype(np.float32)

    @property
    def realtime_factor(self) -> float:
        """Audio seconds generated per wall second over recent steps (all stations together)."""
        audio = sum(a for a, _ in self._recent)
        wall = sum(w for _, w in self._recent)
        return audio / wall if wall > 0 else 0.0

    # -- thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine step still running after %.1fs; leaving it behind", timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - one bad step must not end the radio; stations fill meanwhile
                self.failures += 1
                logger.exception("generation step failed (%d so far); retrying", self.failures)
                self._stop.wait(1.0)
                continue
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def status(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "failures": self.failures,
            "last_batch": self.last_batch,
            "last_step_seconds": round(self.last_step_seconds, 3),
            "realtime_factor": round(self.realtime_factor, 3),
        }

