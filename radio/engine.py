"""The continuation engine: one thread, the only caller of the models.

Each step it takes the stations that are below their buffer target, hungriest first, and continues them all
in ONE batched model call. Stations that share a model share a batch; with several models (stations may name
their own), each step serves the model of the hungriest station, so no mount starves. A station's first chunk
is short and taken apart from the running stations, so it is on air within seconds; after that chunks double
up to ``chunk_seconds``. The model decodes each chunk with ``overlap_frames`` of context in front; the
engine joins consecutive chunks with an equal-power crossfade over that overlap, holding back the last
``crossfade_ms`` of every chunk until the next one arrives, so nothing is repeated and nothing is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import EngineConfig
from .station.dsp import equal_power_crossfade
from .errors import ConditioningError, SlotsFull
from .logs import Throttle
from .status import Record, exported
from .musicgen.model import ContinuationRequest, MusicModel
from .station.station import Station

logger = logging.getLogger(__name__)


DEFAULT_MODEL_KEY = "default"


@dataclass
class Command:
    """A change to one station, posted by another thread (API, file watcher) and applied by the engine thread
    at the next chunk boundary: the engine thread is the only writer of a station's generation state."""

    key: str
    what: str  # shown in /status while pending, e.g. "prompt 'Disco'"
    action: Callable[[Station], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def wait(self, timeout: float) -> bool:
        """True once applied (or failed: see ``error``) within ``timeout`` seconds."""
        return self.done.wait(timeout)


def code_format(model: MusicModel) -> tuple[object, ...]:
    """What must match for one model to continue another's codes (same codebooks, vocabulary and frame rate:
    true across MusicGen small/medium/large, which share one EnCodec)."""
    return (model.num_codebooks, model.vocab_size, model.frame_rate, model.sample_rate)


def fit_channels(pcm: np.ndarray, channels: int) -> np.ndarray:
    """A model's PCM in a station's channel layout. A station keeps the layout of the model it started with (its
    mount's encoder and buffers are built for it); a model swapped in live with another layout is mixed down to
    mono or spread to both channels, until the station restarts."""
    if (1 if pcm.ndim == 1 else pcm.shape[1]) == channels:
        return pcm
    if channels == 1:
        return pcm.mean(axis=1, dtype=np.float32)
    return np.repeat(pcm[:, None], channels, axis=1)  # layouts are mono or stereo: this one is mono


@dataclass
class _Record:
    """Everything the engine keeps about one station, in one place (the engine thread writes it; other threads
    read or set single fields under the engine's lock)."""

    station: Station
    model: str | None  # the model's key (None: waiting for one; filler plays)
    change: "ModelChange" = field(default_factory=lambda: ModelChange())  # a model change under way (the pool's)
    code_format: tuple[object, ...] | None = None  # the format of its context codes (see code_format())
    tail: np.ndarray | None = None  # the last chunk's end, held back for the crossfade into the next chunk
    retry_at: float = 0.0  # not picked before this time (no decode slot free, a prompt the model refused)
    heard: float = float("-inf")  # when it last had a listener: the linger runs from there



@dataclass
class ModelChange:
    """A station's model change under way, kept in its record for the pool (which alone writes it, under its own
    lock; the engine never reads it): the model being loaded for it, the old one unloaded to make room (brought
    back if the load fails), and why the last change failed."""

    wanted: Any = None  # pool.ModelSpec (the pool's value type, a layer beside this one)
    restore: Any = None
    error: str | None = None


@dataclass
class EngineStatus(Record):
    """What the engine says of itself in ``/status``."""

    steps: int = exported("radio_engine_steps", "Batched generation steps", counter=True)
    failures: int = exported("radio_engine_failures", "Batched steps that failed", counter=True)
    batch_size: int = exported("radio_engine_batch_size", "Stations in the last batched step")
    last_step_seconds: float = exported("radio_engine_step_seconds", "Wall time of the last batched step")
    realtime_factor: float = exported("radio_engine_realtime_factor", "Audio seconds generated per wall second")
    needed_factor: float = exported("radio_engine_needed_factor", "Audio seconds per second the stations on air "
                                    "need")
    keeping_up: bool = exported("radio_engine_keeping_up", "1 while the engine makes what its stations need")
    stations_on_air: int = exported("radio_engine_stations_on_air", "Stations on air")
    stations_generating: int = exported("radio_engine_stations_generating", "Stations the engine generates for "
                                        "(someone listens, or within the linger, or always)")
    stations_idle: int = exported("radio_engine_stations_idle", "Stations on air that nobody listens to")
    listeners_known: bool = exported("radio_engine_listeners_known", "1 while Icecast's listener counts can be "
                                     "read (0: every station generates)")
    capacity_stations: int = exported("radio_engine_capacity_stations", "Stations the last steps' speed could "
                                      "keep in real time")
    last_batch: list[str] = field(default_factory=list)
    last_model: str | None = None

class Engine:
    """Schedules generation for all stations over one or more models (keyed by name)."""

    def __init__(self, model: MusicModel | None, config: EngineConfig) -> None:
        self.models: dict[str, MusicModel] = {}
        if model is not None:
            self.models[DEFAULT_MODEL_KEY] = model
        self.config = config
        self._records: dict[str, _Record] = {}  # station key -> its record
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.failures = 0
        self.last_batch: list[str] = []
        self.last_model: str | None = None
        self.last_step_seconds = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=32)  # (audio seconds, wall seconds)
        self._throttle = Throttle(logger)
        self._forgets: deque[tuple[MusicModel, str]] = deque()  # decode states to drop, applied by the engine thread
        self._commands: deque[Command] = deque()  # station changes from other threads, applied by the engine thread
        # Stations that could not run (no decode slot free, a prompt the model refused) wait this long before
        # they are picked again, so they neither spin the engine nor take every step from those that can run.
        self.retry_seconds = 2.0
        # The audience: listeners per mount from Icecast (None: unknown, so every station generates: fail open).
        self._listeners: dict[str, int] | None = None
        self.idle_changes = 0  # stations that went idle or woke up
        # Audio made against wall time since the load was last judged, busy or idle (overload check).
        self._made_since = (time.monotonic(), 0.0)
        self.keeping_up = True
        self._step_started: float | None = None  # when the running model step began (None: none runs)

    @property
    def model(self) -> MusicModel:
        """The only model, or the first one (single-model callers: bench, soak, tests)."""
        return next(iter(self.models.values()))

    # -- models ----------------------------------------------------------------------------------------------
    def add_model(self, key: str, model: MusicModel) -> None:
        with self._lock:
            self.models[key] = model
        self._wake.set()

    def remove_model(self, key: str) -> None:
        """Stop using a model; its stations wait (on filler) until they are given another one. A step that is
        running with it finishes first; the caller drops its last reference afterwards."""
        with self._lock:
            removed = self.models.pop(key, None)
            # Its pending forgets are moot (its state goes with it), and must not keep it alive.
            self._forgets = deque(f for f in self._forgets if f[0] is not removed)
            for record in self._records.values():
                if record.model == key:
                    record.model = None

    def set_station_model(self, station_key: str, model_key: str | None) -> None:
        """Move a station to another model from its next chunk on (None: pause it; filler covers). The join
        is crossfaded as usual: the new model continues the station's codes when their formats match, else
        it starts fresh and the engine crossfades into it."""
        with self._lock:
            record = self._records.get(station_key)
            if record is None:
                return
            old, record.model = record.model, model_key
            previous = self.models.get(old) if old is not None and old != model_key else None
        if previous is not None:
            self._forget(previous, station_key)
        self._wake.set()

    def model_of(self, station_key: str) -> str | None:
        with self._lock:
            record = self._records.get(station_key)
            return record.model if record is not None else None

    def model_change(self, station_key: str) -> ModelChange | None:
        """The station's model change record (None: no such station)."""
        with self._lock:
            record = self._records.get(station_key)
            return record.change if record is not None else None

    def model_assignments(self) -> dict[str, tuple[str | None, ModelChange]]:
        """Every station's model key and model change, from their records."""
        with self._lock:
            return {key: (r.model, r.change) for key, r in self._records.items()}

    def _forget(self, model: MusicModel, station_key: str) -> None:
        """Queue a station's decode state to be dropped by the engine thread before its next step: the model
        is busy for seconds at a time on a slow machine, and a caller (file watcher, API, shutdown of many
        stations) must never wait for a step to end."""
        with self._lock:
            self._forgets.append((model, station_key))
        self._wake.set()

    def post(self, key: str, what: str, action: Callable[[Station], Any]) -> Command:
        """Queue ``action(station)`` for the engine thread (see :class:`Command`); returns at once."""
        command = Command(key, what, action)
        with self._lock:
            self._commands.append(command)
        self._wake.set()
        return command

    def pending(self, key: str) -> list[str]:
        """What is queued for a station and not applied yet."""
        with self._lock:
            return [c.what for c in self._commands if c.key == key]

    def apply_commands(self) -> None:
        """Apply queued commands in order (the engine thread, between steps; tests call it directly)."""
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
                record = self._records.get(command.key)
                station = record.station if record is not None else None
            try:
                if station is None:
                    raise KeyError(command.key)
                command.result = command.action(station)
            except Exception as exc:  # noqa: BLE001 - reported to the poster; the engine goes on
                command.error = exc
                logger.error("%s: %s failed: %s", command.key, command.what, exc)
            finally:
                command.done.set()

    def _apply_forgets(self) -> None:
        while True:
            with self._lock:
                if not self._forgets:
                    return
                model, key = self._forgets.popleft()
            model.forget(key)

    # -- stations --------------------------------------------------------------------------------------------
    def add_station(self, station: Station, model_key: str | None = DEFAULT_MODEL_KEY) -> None:
        with self._lock:
            self._records[station.key] = _Record(station, model_key)
        self._wake.set()

    def remove_station(self, key: str) -> None:
        with self._lock:
            record = self._records.pop(key, None)
            model = self.models.get(record.model or "") if record is not None else None
        if model is not None:
            self._forget(model, key)

    def stations(self) -> list[Station]:
        with self._lock:
            return [r.station for r in self._records.values()]

    # -- audience --------------------------------------------------------------------------------------------
    def set_listeners(self, counts: dict[str, int] | None) -> None:
        """Listeners per mount, as Icecast counts them (relays included); None when they cannot be read, which
        makes every station generate until they can. Any thread.

        An idle station someone now listens to wakes here and now, not at the end of the model step that may be
        running (seconds on a CPU): its mount starts playing its queued audio at once, and it joins the next
        step. Only the engine thread idles a station (it also drops the station's decode state)."""
        now = time.monotonic()
        with self._lock:
            changed = counts != self._listeners
            self._listeners = counts
            woken = []
            for record in self._records.values():
                station = record.station
                heard = counts is None or counts.get(station.mount, 0) > 0
                if heard:
                    record.heard = now
                if heard and station.idle:
                    station.set_idle(False)
                    woken.append(station)
            self.idle_changes += len(woken)
        for station in woken:
            self._throttle.log(logging.INFO, f"idle{station.key}", "%s: %s listener(s); generating", station.mount,
                               counts.get(station.mount, 0) if counts is not None else "unknown")
        if changed or woken:
            self._wake.set()

    def listeners(self, mount: str) -> int | None:
        """A mount's listeners as last read (None: not known)."""
        with self._lock:
            return None if self._listeners is None else self._listeners.get(mount, 0)

    def _wanted(self, station: Station, counts: dict[str, int] | None, heard: float, now: float) -> bool:
        """Whether the model should serve ``station``: someone listens (or did within the linger), or it is
        set to generate always, or the audience is unknown, or it has no audio yet (its first short chunk puts
        its mount on air, with its own music to loop while nobody listens)."""
        if self.config.generate == "always" or station.config.always or counts is None or not station.has_audio:
            return True
        if counts.get(station.mount, 0) > 0:
            return True
        return now - heard < self.config.linger

    def update_audience(self) -> None:
        """Idle the stations nobody has listened to for the linger (the engine thread, between steps; waking
        happens in :meth:`set_listeners`). An idle station's decode state is dropped: it takes no model time and
        no decode memory, and resumes from its own codes (a segue) with a short first chunk."""
        now = time.monotonic()
        with self._lock:
            counts = self._listeners
            stations = [(r.station, r.heard, self.models.get(r.model or "")) for r in self._records.values()]
        for station, heard, model in stations:
            if station.idle or self._wanted(station, counts, heard, now):
                continue
            station.set_idle(True)
            with self._lock:
                self.idle_changes += 1
            self._throttle.log(logging.INFO, f"idle{station.key}", "%s: nobody listens; idle (no generation, the "
                               "mount loops its own audio)", station.mount)
            if model is not None:
                model.forget(station.key)

    def generating(self) -> int:
        """Stations the engine serves now (on a loaded model and not idle)."""
        with self._lock:
            return sum(1 for r in self._records.values() if r.model in self.models and not r.station.idle)

    # -- scheduling ------------------------------------------------------------------------------------------
    def pick_batch(self) -> list[Station]:
        """The stations to continue in the next step, least audio buffered first, at most ``max_batch``.

        A step happens when any station is below its buffer target. It then takes along every station with
        room for one more chunk (buffered < target + chunk): an extra row costs almost nothing, and it keeps
        the stations in step, so they keep meeting in the same batch instead of drifting into one-row steps.
        Queues stay bounded at about target + 2 chunks.

        With several models, the hungriest station (least buffered; new stations first) decides which
        model steps, and only that model's stations ride along.

        New stations (no audio yet) and stations waking from idle take their first, short chunk among
        themselves: a batch step costs more with every row and every second of cached context, so riding along
        with the running stations would delay their first audio for the others' sake. The running stations sit
        that step out; the model parks their KV caches, so it costs them no re-prefill.

        Idle stations (nobody listens) are never picked.
        """
        return self._pick()[1]

    def _pick(self) -> tuple[str | None, list[Station]]:
        now = time.monotonic()
        with self._lock:
            stations = [(r.station, r.model) for r in self._records.values()
                        if r.model in self.models and not r.station.idle and r.retry_at <= now]
        needy = [(s, m) for s, m in stations if s.needs_audio()]
        if not needy:
            return None, []
        order = lambda sm: (sm[0].ramp > 0, sm[0].buffered_seconds)  # noqa: E731
        model_key = min(needy, key=order)[1]
        model = self.models.get(model_key or "")
        most = min(self.config.max_batch or 1 << 30, model.batch_limit if model is not None else 16)
        new = sorted((sm for sm in needy if sm[1] == model_key and sm[0].ramp == 0), key=order)
        if new:
            return model_key, [s for s, _ in new[:most]]
        limit = self.config.buffer_seconds + self.config.chunk_seconds
        batch = sorted(((s, m) for s, m in stations if m == model_key and s.buffered_seconds < limit), key=order)
        return model_key, [s for s, _ in batch[:most]]

    def run_once(self) -> bool:
        """One batched step. Returns False when no station needed audio."""
        self._apply_forgets()
        self.apply_commands()
        self.update_audience()
        model_key, batch = self._pick()
        if not batch or model_key is None:
            return False
        with self._lock:
            model = self.models.get(model_key)
        if model is None:
            return False
        fmt = code_format(model)
        with self._lock:
            records = [self._records[s.key] for s in batch if s.key in self._records]
            unreadable = [r.station for r in records if r.code_format not in (None, fmt)]
            for r in records:
                r.code_format = fmt
        for s in unreadable:
            s.drop_context(model.num_codebooks)  # another model made these codes and this one cannot read them
        fps = model.frame_rate
        # A new (or woken) station starts with a short chunk and doubles up to chunk_seconds, so it is on air
        # within seconds and its buffer grows ahead of the next, longer step.
        youngest = min(s.ramp for s in batch)
        # (capped: 2 ** chunks overflows a float after ~1,000 chunks, about an hour on air)
        seconds = min(self.config.chunk_seconds, self.config.first_chunk_seconds * 2.0 ** min(youngest, 32))
        frames = max(1, int(round(seconds * fps)))
        requests = []
        for s in batch:
            prompt, blend_from, blend = s.conditioning(frames)
            requests.append(ContinuationRequest(context=s.context(), prompt=prompt, sampling=s.config.sampling,
                                                overlap=self.config.overlap_frames,
                                                key=s.key, blend_from=blend_from, blend=blend))
        t0 = time.monotonic()
        continued = self._continue(model, batch, requests, frames)
        if continued is None:
            return True
        batch, results = continued
        wall = time.monotonic() - t0
        with self._lock:
            live = {k: r for k, r in self._records.items() if r.model == model_key}
        for station, result in zip(batch, results):
            record = live.get(station.key)
            if record is None or record.station is not station:
                continue  # removed, or moved to another model, while we generated
            record.retry_at = 0.0
            if station.error is not None:
                logger.info("%s: generating again", station.mount)
                station.error = None
                self._throttle.clear(f"aside{station.key}")
            pcm = fit_channels(result.pcm, station.channels)
            silent = station.push(self._join(model, record, pcm, result.overlap))
            station.append_codes(result.codes)
            self._watch_silence(model, record, silent, result.codes.shape[1])
        self.steps += 1
        self.last_model = model_key
        self.last_batch = [s.mount for s in batch]
        self.last_step_seconds = wall
        made = sum(r.codes.shape[1] for r in results) / fps
        self._recent.append((made, wall))
        self._made_since = (self._made_since[0], self._made_since[1] + made)
        logger.debug("step %d: %d stations x %d frames in %.2fs", self.steps, len(batch), frames, wall)
        return True

    def _continue(self, model: MusicModel, batch: list[Station], requests: list[ContinuationRequest],
                  frames: int) -> tuple[list[Station], list[Any]] | None:
        """The model call of a step: stations it cannot take now (no decode slot, a prompt it refuses) are set
        aside and the rest go on. Returns the stations served and their results; None when none was."""
        self._step_started = time.monotonic()
        try:
            while True:
                try:
                    results = model.continue_batch(requests, frames)
                    return batch, results
                except SlotsFull as exc:
                    # More stations than fit in device memory: these wait on filler until a slot is free.
                    waiting = [s for s in batch if s.key in exc.keys]
                    if not waiting:
                        raise
                    for s in waiting:
                        s.error = f"waiting for a decode slot: {exc}"
                        self._retry_later(s)
                    self._throttle.log(logging.WARNING, "slots", "%d station(s) wait for a decode slot (%s): %s",
                                       len(waiting), exc, ", ".join(s.mount for s in waiting[:5]))
                    batch = [s for s in batch if s.key not in exc.keys]
                    requests = [r for r in requests if r.key not in exc.keys]
                    if not batch:
                        return None
                except ConditioningError as exc:
                    # One station's prompt cannot be used: that station alone is set aside, the rest go on.
                    i = next((i for i, s in enumerate(batch) if s.key == exc.key), None)
                    if i is None:
                        raise
                    aside = batch.pop(i)
                    self._set_aside(aside, str(exc))
                    self._retry_later(aside)
                    requests.pop(i)
                    if not batch:
                        return None
        finally:
            self._step_started = None

    def _retry_later(self, station: Station) -> None:
        with self._lock:
            record = self._records.get(station.key)
            if record is not None:
                record.retry_at = time.monotonic() + self.retry_seconds

    def _set_aside(self, station: Station, message: str) -> None:
        """A station whose current item cannot be generated: it moves on to its next item (filler covers) and
        says why in its status; the other stations are not held up."""
        station.error = station.last_error = message
        station.errors += 1
        self._throttle.log(logging.ERROR, f"aside{station.key}", "%s: %s; skipping to the next playlist item",
                           station.mount, message)
        station.next_item()

    def _watch_silence(self, model: MusicModel, record: _Record, silent: bool, frames: int) -> None:
        """MusicGen continuations can fade into silence and stay there: after ``silence_seconds`` of it, skip
        the silent audio still queued and let the next chunk start from a fresh context."""
        station = record.station
        station.silent_frames = station.silent_frames + frames if silent else 0
        if station.silent_frames < self.config.silence_seconds * model.frame_rate:
            return
        seconds = station.silent_frames / model.frame_rate
        dropped = station.restart_context()
        record.tail = None
        logger.warning("%s: %.0f s of near-silence from the generator; skipped %.1f s and starting from a "
                       "fresh context", station.mount, seconds, dropped)

    def _join(self, model: MusicModel, record: _Record, pcm: np.ndarray, overlap: int) -> np.ndarray:
        """The new chunk's audio joined to the station's held tail (a crossfade over the decoded overlap); the
        chunk's own end is held back as the next tail."""
        tail = record.tail  # in the station's channel layout, like ``pcm`` (fit_channels)
        spf = model.samples_per_frame
        body_start = overlap * spf
        reserve = int(self.config.crossfade_ms / 1000 * model.sample_rate)
        xf = min(reserve, body_start, len(pcm) // 4) if body_start else min(reserve, len(pcm) // 4)
        if tail is not None and 0 < len(tail) <= body_start:
            head = equal_power_crossfade(tail, pcm[body_start - len(tail): body_start])
        elif tail is not None and 0 < len(tail) <= len(pcm) // 2:
            # No overlap decoded (fresh context: a reset, or another model): fade the held tail out over the
            # start of the new audio instead of butting them together.
            head = equal_power_crossfade(tail, pcm[:len(tail)])
            body_start = len(tail)
        elif tail is not None:
            head = tail
        else:
            head = pcm[:0]
        end = len(pcm) - xf
        record.tail = pcm[end:].copy()
        return np.concatenate([head, pcm[body_start:end]]).astype(np.float32)

    LOAD_WINDOW = 30.0  # seconds of wall time over which production is judged against need

    def on_air(self) -> int:
        """Stations with a loaded model, generating or idle: each keeps its mount on air."""
        with self._lock:
            return sum(1 for r in self._records.values() if r.model in self.models)

    def _judge_load(self) -> None:
        """Every LOAD_WINDOW: did the engine make what its stations need? If not, say so once (then once a
        minute with a count), with what this machine does make, so an operator can size the station list."""
        since, made = self._made_since
        wall = time.monotonic() - since
        if wall < self.LOAD_WINDOW:
            return
        self._made_since = (time.monotonic(), 0.0)
        need = self.generating()  # each needs one second of audio per second
        rate = made / wall
        buffered = [s.buffered_seconds for s in self.stations() if not s.idle]
        short = bool(buffered) and min(buffered) < self.config.buffer_seconds / 2
        self.keeping_up = not (need and rate < 0.98 * need and short)
        if self.keeping_up:
            self._throttle.clear("overload")
            return
        fast = self.realtime_factor
        self._throttle.log(logging.WARNING, "overload",
                           "cannot keep up: %d stations need %d s of audio per second, this machine makes %.2f "
                           "(%.2f while generating: about %d stations in real time); stations play filler. "
                           "Run fewer stations, a smaller model or dtype, or a GPU", need, need, rate, fast,
                           int(fast))

    def step_remaining(self) -> float:
        """About how long until the running step ends and queued commands apply (0: none runs): its elapsed
        time against the last step's length."""
        started = self._step_started
        if started is None:
            return 0.0
        return max(0.05, self.last_step_seconds - (time.monotonic() - started))

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

    def join(self, timeout: float) -> bool:
        """Wait for the engine thread to end after :meth:`stop` (a step in flight finishes first); True once it
        has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:  # whoever waits on a command that will never run is told now
            dropped, self._commands = list(self._commands), deque()
        for command in dropped:
            command.error = RuntimeError("the engine stopped")
            command.done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine step still running after %.1fs; leaving it behind", timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:  # noqa: BLE001 - one bad step must not end the radio; stations fill meanwhile
                self.failures += 1
                if self._throttle.log(logging.ERROR, "step", "generation step failed (%d so far): %s: %s; retrying",
                                      self.failures, type(exc).__name__, exc):
                    logger.debug("the failed step", exc_info=True)
                self._stop.wait(1.0)
                continue
            self._judge_load()
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def status(self) -> dict[str, Any]:
        """The engine's :class:`EngineStatus`, as JSON."""
        on_air = self.on_air()
        generating = self.generating()
        return EngineStatus(
            steps=self.steps, failures=self.failures, batch_size=len(self.last_batch),
            last_step_seconds=round(self.last_step_seconds, 3), realtime_factor=round(self.realtime_factor, 3),
            needed_factor=float(generating), keeping_up=self.keeping_up, stations_on_air=on_air,
            stations_generating=generating, stations_idle=on_air - generating,
            listeners_known=self._listeners is not None, capacity_stations=int(self.realtime_factor),
            last_batch=list(self.last_batch), last_model=self.last_model).to_dict()

