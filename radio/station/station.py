"""One station's runtime state: playlist cursor, code context, PCM queue with now-playing marks, filler.

Two threads touch a station: the engine (``push``, ``append_codes``, playlist advance) and the mount's
feeder (``read``). Everything shared sits behind one lock; no method blocks for long.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..config import EngineConfig, PlaylistItem, RequestsConfig, StationConfig
from .dsp import Ring, equal_power_crossfade, rms
from ..logs import Throttle
from ..status import Record, exported
from .playlist import Playlist
from .requests import Request, RequestQueue

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)  # filler comes and goes often on an overloaded machine: once a minute per station


SILENCE_RMS = 10 ** (-60 / 20)  # -60 dBFS: "near-silent" for the watchdog
REQUEST_BLEND_S = 8.0  # a request's prompt blends in over this long (at most half the request): a segue


@dataclass
class _Segment:
    pcm: np.ndarray
    title: str | None  # set on the segment that starts a playlist item
    pos: int = 0
    silent: bool = False



@dataclass
class StationStatus(Record):
    """What a station says of itself in ``/status`` (the mount and the daemon add theirs)."""

    name: str
    mount: str
    format: str
    bitrate: int
    channels: int
    now_playing: str | None
    generating: str
    next: str
    buffered_seconds: float = exported("radio_station_buffered_seconds", "Audio buffered ahead of real time")
    generated_seconds: float = exported("radio_station_generated_seconds", "Audio generated", counter=True)
    filled_seconds: float = exported("radio_station_filled_seconds", "Audio filled while the generator was behind",
                                     counter=True)
    underruns: int = exported("radio_station_underruns", "Times the generator fell behind", counter=True)
    silence_skips: int = exported("radio_station_silence_skips", "Generated silences skipped", counter=True)
    filling: bool = exported("radio_station_filling", "1 while filler covers for the generator")
    idle: bool = exported("radio_station_idle", "1 while nobody listens: no generation, the mount loops the "
                          "station's own audio")
    errors: int = exported("radio_station_errors", "Times generation set the station aside", counter=True)
    requests: dict[str, object] = field(default_factory=dict)  # RequestQueue.status(); /metrics: requests_*
    error: str | None = None
    last_generation_error: str | None = None

class Station:
    """Runtime state of one station. ``config`` is replaced only by ``apply_config`` (live edits)."""

    def __init__(self, config: StationConfig, sample_rate: int, frame_rate: int, num_codebooks: int,
                 engine: EngineConfig, rng: random.Random | None = None,
                 idents: list[np.ndarray] | None = None, requests: RequestsConfig | None = None,
                 channels: int = 1) -> None:
        self.config = config
        # PCM is (samples,) for a mono model and (samples, channels) for a stereo one, everywhere in the station.
        self.channels = channels
        # Listener requests: the API's threads queue them, generation takes them between items.
        self._request_defaults = requests or RequestsConfig()
        self.requests = RequestQueue(config.requests_config(self._request_defaults))
        self.requesting: Request | None = None  # the request generation is on now
        # Programme seconds still owed before the next request may start (``requests.share``).
        self.programme_owed = 0.0
        self.idents = idents or []
        self.items_started = 0
        self._ident_due = False
        self._ident_next = 0
        self.sample_rate = sample_rate
        self.frame_rate = frame_rate
        self.engine_cfg = engine
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self.playlist = Playlist(config.playlist, config.order, self._rng)
        self.codes = np.zeros((num_codebooks, 0), dtype=np.int64)
        self.context_frames = int(engine.context_seconds * frame_rate)
        self.frames_in_item = 0
        self.blend_from: str | None = None  # previous prompt while the current item blends in
        self._next_playlist: Playlist | None = None  # an edited playlist waiting for the current item to end
        self.silent_frames = 0  # consecutive generated frames of near-silence (watchdog)
        self.silence_skips = 0
        self._pending_title: str | None = self.playlist.current.title
        self._queue: deque[_Segment] = deque()
        self._queued = 0  # samples in _queue
        self._reserve = max(1, int(engine.crossfade_ms / 1000 * sample_rate))
        # The last real audio handed out, for filler: a ring written in place, as it is fed every 100 ms (a new
        # array per block was a steady churn of half-megabyte allocations across the feeder threads).
        self._history = Ring(int(engine.filler_seconds * sample_rate) + self._reserve, channels)
        self._filler: np.ndarray | None = None
        self._filler_pos = 0
        self.now_playing: str | None = None
        self.started_at: float | None = None
        # counters for status and metrics
        self.generated_samples = 0
        self.emitted_samples = 0  # handed to the encoder
        self.real_samples = 0  # of those, taken from generated audio (the rest is filler)
        self.underruns = 0
        self.chunks = 0
        # Chunks since the station started or last resumed from idle: the engine's chunk length ramps up from
        # a short first chunk with it, so fresh audio is on air quickly either way.
        self.ramp = 0
        # Set while the engine generates for this station; clear while it is idle (nobody listens). Cleared by
        # the engine thread (which also drops the decode state), set again by whoever learns of a listener first
        # (the engine's audience update); the mount's feeder waits on it.
        self._awake = threading.Event()
        self._awake.set()
        self.dropped_samples = 0  # generated, then skipped by the silence watchdog
        self.error: str | None = None  # why generation sets this station aside now (None: all well)
        self.last_error: str | None = None  # the last such reason, kept after the station recovered
        self.errors = 0

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.config.key

    @property
    def mount(self) -> str:
        return self.config.mount

    # -- engine side -----------------------------------------------------------------------------------------
    @property
    def buffered_seconds(self) -> float:
        with self._lock:
            return self._queued / self.sample_rate

    @property
    def reserve_samples(self) -> int:
        """Queued samples held back for the crossfade into the next chunk (or out of filler)."""
        return self._reserve

    @property
    def has_audio(self) -> bool:
        return self.chunks > 0

    @property
    def idle(self) -> bool:
        """Nobody listens (past the linger): the engine does not generate for it and its mount loops."""
        return not self._awake.is_set()

    def set_idle(self, idle: bool) -> None:
        """The engine's decision (see ``_awake``). Resuming starts the chunk ramp again (a short chunk first)."""
        if idle:
            self._awake.clear()
        elif self.idle:
            self.ramp = 0
            self._awake.set()

    def wait_awake(self, timeout: float) -> bool:
        """Block until the station generates again (True) or ``timeout`` passes (False)."""
        return self._awake.wait(timeout)

    def needs_audio(self) -> bool:
        return self.buffered_seconds < self.engine_cfg.buffer_seconds

    @property
    def prompt(self) -> str:
        return self.playlist.current.prompt

    def conditioning(self, frames: int) -> tuple[str, str | None, float]:
        """(prompt, blend_from, blend weight) for a chunk of ``frames`` starting now.

        During an item's ``transition.blend`` the weight of the new prompt rises linearly from 0 to 1 over the
        blend time (taken at the chunk's middle), so the music drifts instead of switching.
        """
        item = self.playlist.current
        if not self.blend_from or item.blend <= 0:
            return item.prompt, None, 1.0
        weight = (self.frames_in_item + frames / 2) / (item.blend * self.frame_rate)
        if weight >= 1.0:
            return item.prompt, None, 1.0
        return item.prompt, self.blend_from, max(0.0, weight)

    def context(self) -> np.ndarray:
        return self.codes

    def append_codes(self, new: np.ndarray) -> None:
        """Keep the last ``context_seconds`` of codes; count frames into the current playlist item."""
        self.codes = np.concatenate([self.codes, new], axis=1)[:, -self.context_frames:]
        self.frames_in_item += new.shape[1]
        if self.requesting is None:
            self.programme_owed = max(0.0, self.programme_owed - new.shape[1] / self.frame_rate)
        if self.frames_in_item >= self.playlist.current.duration * self.frame_rate:
            self.next_item()

    def next_item(self) -> None:
        """Move generation to the next item. The code context stays: the music segues into the new prompt.
        A listener's request waiting goes first when the programme has had its share since the last one; the
        playlist then resumes where it was."""
        previous = self.playlist.current.prompt
        self.requesting = None
        request = self.requests.take() if self.programme_owed <= 0 else None
        if request is not None:
            self._play_request(request, previous)
            return
        if self._next_playlist is not None:  # an edit waited for this moment
            self.playlist, self._next_playlist = self._next_playlist, None
            item = self.playlist.current
        else:
            item = self.playlist.advance()
        self.items_started += 1
        if self.idents and self.items_started % self.config.ident_every == 0:
            self._ident_due = True
        self._start_item(item, previous)
        logger.info("%s: next item %r", self.mount, item.title)

    def _play_request(self, request: Request, previous_prompt: str) -> None:
        cfg = self.requests.config
        item = PlaylistItem(title=request.title, prompt=request.prompt, duration=cfg.duration,
                            blend=min(REQUEST_BLEND_S, cfg.duration / 2))
        self.playlist.override = item  # like an API prompt: the playlist's own place is kept
        self.requesting = request
        self.programme_owed = cfg.duration * (1.0 - cfg.share) / cfg.share
        self.items_started += 1
        self._start_item(item, previous_prompt)
        logger.info("%s: playing a listener's request %r", self.mount, request.prompt[:80])

    def request_wait(self, position: int) -> float:
        """About how many seconds until the request at ``position`` (1: next) starts at the listener: the audio
        queued ahead, the rest of the item generating now, the programme owed, the requests ahead."""
        cfg = self.requests.config
        remaining = self._item_remaining()
        # During a request the programme owed starts after it; otherwise it is paid off by the item generating.
        first = remaining + self.programme_owed if self.requesting is not None else max(remaining,
                                                                                          self.programme_owed)
        return self.buffered_seconds + first + (position - 1) * cfg.duration / cfg.share

    def _item_remaining(self) -> float:
        """Seconds the item generating now has left to generate."""
        return max(0.0, self.playlist.current.duration - self.frames_in_item / self.frame_rate)

    def _next_title(self) -> str:
        """What follows the item generating now: a waiting request when the programme has had its share by then,
        else the playlist's next item."""
        waiting = self.requests.waiting()
        if waiting and self.requesting is None and self.programme_owed <= self._item_remaining():
            return waiting[0].title
        return (self._next_playlist.current if self._next_playlist else self.playlist.next).title

    def _start_item(self, item: PlaylistItem, previous_prompt: str) -> None:
        """Generation moves to ``item``: its title waits for the next pushed audio; it blends in from the
        previous prompt when it asks for a blend."""
        self.frames_in_item = 0
        self._pending_title = item.title
        self.blend_from = previous_prompt if item.blend > 0 and previous_prompt != item.prompt else None

    def play_now(self, prompt: str, title: str | None = None, duration: float | None = None,
                 blend: float = 0.0) -> PlaylistItem:
        """Switch generation to a one-off prompt at the next chunk (control API). It plays for ``duration``
        (default: the current item's), then the playlist resumes. The music keeps its context (a segue), or
        blends over ``blend`` seconds."""
        previous = self.playlist.current
        item = PlaylistItem(title=title or prompt[:80], prompt=prompt, duration=duration or previous.duration,
                            blend=blend)
        self.playlist.override = item
        self.requesting = None
        self._start_item(item, previous.prompt)
        logger.info("%s: prompt set to %r", self.mount, item.title)
        return item

    def skip(self) -> PlaylistItem:
        """Move generation to the next item now (control API)."""
        self.next_item()
        return self.playlist.current

    def _queue_ident(self, pcm: np.ndarray) -> np.ndarray:
        """Put the next ident between the items, crossfaded into the end of the queued audio and out into
        the new item's first chunk (``pcm``, returned with its head mixed)."""
        ident = self.idents[self._ident_next % len(self.idents)]
        self._ident_next += 1
        self._ident_due = False
        xf = min(self._reserve, len(ident) // 4, len(pcm) // 2)
        with self._lock:
            last = self._queue[-1] if self._queue else None
            if xf and last is not None and len(last.pcm) - last.pos >= xf:
                last.pcm = last.pcm.copy()
                last.pcm[-xf:] = equal_power_crossfade(last.pcm[-xf:], ident[:xf])
                body = ident[xf:]
            else:
                body = ident
            if xf:
                body, tail = body[:-xf], body[-xf:]
                pcm = np.concatenate([equal_power_crossfade(tail, pcm[:xf]), pcm[xf:]])
            self._queue.append(_Segment(np.ascontiguousarray(body, dtype=np.float32), None))
            self._queued += len(body)
        logger.info("%s: ident", self.mount)
        return pcm

    def apply_config(self, config: StationConfig) -> None:
        """A validated edit of this station's file. Sampling applies from the next chunk; a changed playlist
        takes over at the end of the current item (``apply: next``) or at once (``apply: now``)."""
        old = self.config
        self.config = config
        self.requests.configure(config.requests_config(self._request_defaults))
        if config.playlist == old.playlist and config.order == old.order:
            return
        playlist = Playlist(config.playlist, config.order, self._rng)
        current = self.playlist.current
        same = [i for i, it in enumerate(config.playlist) if (it.title, it.prompt) == (current.title, current.prompt)]
        if config.apply == "now":
            self.playlist = playlist
            self._next_playlist = None
            self.requesting = None
            self._start_item(playlist.current, current.prompt)
            logger.info("%s: playlist changed, now %r", self.mount, playlist.current.title)
        elif same:
            # The item on air is still in the playlist: keep playing it, continue from there.
            playlist.index = same[0]
            playlist.upcoming = playlist._pick_next()
            self.playlist = playlist
            self._next_playlist = None
            logger.info("%s: playlist changed; %r continues", self.mount, current.title)
        else:
            self._next_playlist = playlist
            logger.info("%s: playlist changed; %r follows the current item", self.mount, playlist.current.title)

    def drop_context(self, num_codebooks: int | None = None) -> None:
        """Forget the code context: the next chunk starts fresh (e.g. on a model that reads other codes)."""
        self.codes = np.zeros((num_codebooks or self.codes.shape[0], 0), dtype=np.int64)

    def restart_context(self) -> float:
        """Forget the code context (the next chunk starts fresh) and drop queued near-silent audio.
        Returns the seconds dropped."""
        self.drop_context()
        self.silent_frames = 0
        self.silence_skips += 1
        dropped = 0
        with self._lock:
            while self._queue and self._queue[-1].pos == 0 and self._queue[-1].silent:
                seg = self._queue.pop()
                self._queued -= len(seg.pcm)
                dropped += len(seg.pcm)
                self.dropped_samples += len(seg.pcm)
                if seg.title is not None:
                    self._pending_title = seg.title
        return dropped / self.sample_rate

    def push(self, pcm: np.ndarray) -> bool:
        """Queue freshly generated PCM (already joined); it carries the item title if it starts one.
        Returns whether it is near-silent (for the engine's watchdog)."""
        if not len(pcm):
            return False
        pcm = np.asarray(pcm, dtype=np.float32)
        silent = rms(pcm) < SILENCE_RMS
        if self._ident_due and self._pending_title is not None and self.idents:
            pcm = self._queue_ident(pcm)
        with self._lock:
            self._queue.append(_Segment(pcm, self._pending_title, silent=silent))
            self._pending_title = None
            self._queued += len(pcm)
            self.generated_samples += len(pcm)
            self.chunks += 1
            self.ramp += 1
        return silent

    # -- listener side ---------------------------------------------------------------------------------------
    def read(self, n: int) -> tuple[np.ndarray, list[str]]:
        """Exactly ``n`` samples for the encoder, and the titles that start within them.

        When the queue runs dry the station plays *filler*: a loop of its recent real audio, entered and left
        with equal-power crossfades, so a slow generator never causes dead air. Filled time is counted.
        """
        out: list[np.ndarray] = []
        titles: list[str] = []
        need = n
        with self._lock:
            if self.started_at is None:
                self.started_at = time.monotonic()
            while need > 0:
                if self._filler is not None:
                    if self._queued >= 2 * self._reserve:
                        out.append(self._leave_filler(titles))
                        need -= self._reserve
                        continue
                    take = self._filler_take(need)
                    out.append(take)
                    need -= len(take)
                elif self._queued > self._reserve:
                    take = self._take(min(need, self._queued - self._reserve), titles)
                    self._remember(take)
                    out.append(take)
                    need -= len(take)
                else:
                    self._enter_filler(titles)
        pcm = np.concatenate(out) if out else self.silence(0)
        with self._lock:
            if len(pcm) > n:  # the exit crossfade may overshoot by < one reserve; keep it for next time
                extra = pcm[n:]
                self._history.drop_newest(len(extra))
                self._queue.appendleft(_Segment(extra.copy(), None))
                self._queued += len(extra)
                self.real_samples -= len(extra)
                pcm = pcm[:n]
            self.emitted_samples += len(pcm)
        return pcm, titles

    @property
    def filled_samples(self) -> int:
        """The deficit: samples handed out that were not generated audio (filler, or silence before any)."""
        return max(0, self.emitted_samples - self.real_samples)

    def _take(self, n: int, titles: list[str]) -> np.ndarray:
        parts = []
        while n > 0 and self._queue:
            seg = self._queue[0]
            if seg.pos == 0 and seg.title is not None:
                titles.append(seg.title)
                self.now_playing = seg.title
            k = min(n, len(seg.pcm) - seg.pos)
            parts.append(seg.pcm[seg.pos: seg.pos + k])
            seg.pos += k
            n -= k
            self._queued -= k
            self.real_samples += k
            if seg.pos >= len(seg.pcm):
                self._queue.popleft()
        return np.concatenate(parts) if parts else self.silence(0)

    def silence(self, n: int) -> np.ndarray:
        """``n`` samples of silence in the station's channel layout."""
        return np.zeros((n,) if self.channels == 1 else (n, self.channels), dtype=np.float32)

    def _remember(self, pcm: np.ndarray) -> None:
        self._history.push(pcm)

    def _enter_filler(self, titles: list[str]) -> None:
        reserve = self._take(self._queued, titles)  # what is left: at most one reserve
        self.underruns += 1
        history = np.concatenate([self._history.samples(), reserve])
        xf = self._reserve
        if len(history) < 4 * xf:
            # Nothing played yet: silence is all that exists. It still counts as filled time.
            self._filler = self.silence(self.sample_rate // 10)
            self._filler_pos = 0
            if len(reserve):
                self._filler[: len(reserve)] = reserve
            logger.debug("%s: no audio yet, filling with silence", self.mount)
            return
        # The entry is the cycle's own wrap crossfade, starting from the real audio we were about to run out of.
        self._filler = self._cycle(history)
        self._filler_pos = 0
        _throttle.log(logging.INFO, f"fill{self.mount}", "%s: generator behind real time, filling from the last "
                      "%.1f s", self.mount, len(history) / self.sample_rate)

    def _cycle(self, audio: np.ndarray) -> np.ndarray:
        """One loop cycle of ``audio``: its wrap point crossfades its end into its start, so it repeats
        seamlessly."""
        xf = self._reserve
        return np.concatenate([equal_power_crossfade(audio[-xf:], audio[:xf]), audio[xf:-xf]]).astype(np.float32)

    def idle_loop(self) -> np.ndarray:
        """What an idle mount repeats: one seamless cycle of the station's own recent audio, about
        ``filler_seconds`` long. It is the audio last played; a station that has played too little so far (it
        went idle right after its first chunk) loops the start of its queue instead, which stays queued for
        its next listener. Silence only when no audio exists at all."""
        span = len(self._history.buf) - self._reserve
        with self._lock:
            history = self._history.samples()
            audio = np.concatenate([history, *(seg.pcm[seg.pos:] for seg in self._queue)])
        start = max(0, len(history) - span)
        audio = audio[start:start + span]
        if len(audio) < 4 * self._reserve:
            return self.silence(self.sample_rate)
        return self._cycle(audio)

    def _filler_take(self, n: int) -> np.ndarray:
        if self._filler is None:
            raise RuntimeError("filler read while not filling")
        parts = []
        while n > 0:
            k = min(n, len(self._filler) - self._filler_pos)
            parts.append(self._filler[self._filler_pos: self._filler_pos + k])
            self._filler_pos = (self._filler_pos + k) % len(self._filler)
            n -= k
        return np.concatenate(parts)

    def _leave_filler(self, titles: list[str]) -> np.ndarray:
        xf = self._reserve
        fill = self._filler_take(xf)
        fresh = self._take(xf, titles)
        self._filler = None
        _throttle.log(logging.INFO, f"back{self.mount}", "%s: fresh audio is back after filling", self.mount)
        mixed = equal_power_crossfade(fill, fresh)
        self._remember(mixed)
        return mixed

    # -- status ----------------------------------------------------------------------------------------------
    def accounting(self) -> dict[str, int]:
        """Samples generated, and where they went: played (real audio handed to the encoder), queued, or dropped
        by the silence watchdog. ``generated == played + queued + dropped`` always holds."""
        with self._lock:
            return {"generated": self.generated_samples, "played": self.real_samples, "queued": self._queued,
                    "dropped": self.dropped_samples}

    def status(self) -> dict[str, object]:
        """The station's :class:`StationStatus`, as JSON."""
        return self.record().to_dict()

    def record(self) -> "StationStatus":
        with self._lock:
            buffered = self._queued / self.sample_rate
            filling = self._filler is not None
        return StationStatus(
            name=self.config.name, mount=self.mount, format=self.config.format, bitrate=self.config.bitrate,
            channels=self.channels, now_playing=self.now_playing, generating=self.playlist.current.title,
            next=self._next_title(), buffered_seconds=round(buffered, 3),
            generated_seconds=round(self.generated_samples / self.sample_rate, 3),
            filled_seconds=round(self.filled_samples / self.sample_rate, 3), underruns=self.underruns,
            silence_skips=self.silence_skips, filling=filling, idle=self.idle, error=self.error,
            last_generation_error=self.last_error, errors=self.errors, requests=self.requests.status())
