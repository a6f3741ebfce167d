"""One mount's pipeline: Station queue --real time--> Encoder --> IcecastOutput.

The feeder thread is the mount's clock: it hands the encoder 100 ms blocks, never more than ``lead`` seconds
ahead of wall time, and never bursts to catch up after being blocked (e.g. while Icecast was away). The
station fills any block it cannot serve (see ``Station.read``), so the encoder, and Icecast, never starve.
Now-playing titles travel with the audio: they are announced when their first sample reaches the encoder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..config import IcecastConfig, StationConfig
from ..errors import EncoderError
from .encoder import TITLES_IN_STREAM, Encoder, IdleLoop, encode_loop
from .icecast import IcecastOutput
from ..logs import Throttle
from ..status import Record, exported
from ..station.station import Station

logger = logging.getLogger(__name__)
_throttle = Throttle(logger)
# Idle loops encoded at once, across all mounts: each is a second or so of ffmpeg's time, and hundreds of
# stations go idle together when a daemon starts.
_LOOP_ENCODES = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) // 2))



@dataclass
class MountStatus(Record):
    """What a station's mount (encoder, Icecast connection, feeder) says of itself in ``/status``."""

    connected: bool = exported("radio_station_connected", "1 while connected to Icecast")
    reconnects: int = exported("radio_station_reconnects", "Icecast reconnects", counter=True)
    encoder_restarts: int = exported("radio_station_encoder_restarts", "ffmpeg restarts", counter=True)
    bytes_sent: int = exported("radio_station_bytes_sent", "Encoded bytes sent to Icecast", counter=True)
    feeder_failures: int = exported("radio_station_feeder_failures", "Feeder failures survived (encoder "
                                    "restarted)", counter=True)
    media_seconds: float = exported("radio_station_media_seconds", "Audio sent to Icecast", counter=True)
    idle_spells: int = exported("radio_station_idle_spells", "Times the mount went idle", counter=True)
    last_error: str | None = None

class Mount:
    """Feeds one station to one Icecast mount."""

    def __init__(self, station: Station, server: IcecastConfig, block_seconds: float = 0.1,
                 lead_seconds: float = 0.5, config: StationConfig | None = None) -> None:
        self.station = station
        self.server = server
        # The stream settings this mount was started with (a live edit may reach the station a chunk later).
        self.config = cfg = config or station.config
        self.sample_rate = station.sample_rate
        self.block = max(1, int(block_seconds * self.sample_rate))
        self.lead = lead_seconds
        self.encoder = Encoder(cfg.mount, cfg.format, cfg.bitrate, self.sample_rate, station=cfg.name,
                               loudness=cfg.loudness, channels=station.channels)
        self.output = IcecastOutput(server, cfg, self.encoder, self.sample_rate, on_connect=self._on_connect)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.media_seconds = 0.0
        self.started_wall: float | None = None
        self._on_air = False
        self._sent = 0  # samples handed to the encoder
        self.failures = 0  # feeder failures survived (each restarted the encoder)
        self._idle_retry_at = 0.0
        self.idle_spells = 0  # times this mount went idle (no listeners: a loop instead of an encoder)
        self.last_error: str | None = None

    @property
    def alive(self) -> bool:
        """The feeder thread runs (it survives anything a station brings: see ``_run``)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def mount(self) -> str:
        return self.station.mount

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"feed{self.mount}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop feeding, let ffmpeg flush, close the shout connection."""
        self._stop.set()
        self.encoder.close(timeout=1.0)  # also unblocks a feeder stuck writing to a full pipe
        if self._thread is not None:
            self._thread.join(timeout)
        self.output.stop(timeout)

    def _on_connect(self, connects: int) -> None:
        # A new source connection must begin with the Ogg headers: start a fresh logical stream.
        if connects > 1 and self.encoder.chainable:
            self.encoder.restart("new Icecast connection needs fresh Ogg headers", title=self.output.title)

    def _run(self) -> None:
        """The feeder loop, restarted after any failure: whatever goes wrong in one mount (a title the encoder
        cannot take, a bug) costs that mount a fresh encoder, never its thread, and never another mount."""
        while not self._stop.is_set():
            try:
                self._feed()
                return
            except Exception as exc:  # noqa: BLE001 - isolation: see the docstring
                self.failures += 1
                self.last_error = f"feeder: {type(exc).__name__}: {exc}"[:300]
                _throttle.log(logging.ERROR, f"feed{self.mount}", "%s: feeder failed (%s); restarting the encoder",
                              self.mount, self.last_error)
                try:
                    self.encoder.restart(f"feeder failed: {type(exc).__name__}")
                except Exception as again:  # noqa: BLE001 - e.g. ffmpeg cannot start: try again shortly
                    logger.error("%s: encoder restart failed: %s", self.mount, again)
                self._stop.wait(1.0)

    def _feed(self) -> None:
        # Go on air only once the station has real audio: its first chunk is short, so this is seconds.
        while not self.station.has_audio:
            if self._stop.wait(0.05):
                return
        if not self._on_air:
            pcm, titles = self.station.read(self.block)
            title = titles[-1] if titles else self.station.playlist.current.title
            self.output.title = title
            self.encoder.start(title)
            self.output.start()
            self._on_air = True
            logger.info("%s: on air (%s %d kbit/s)", self.mount, self.config.format,
                        self.config.bitrate)
            self.encoder.write(pcm)
            self._sent = len(pcm)
            self.started_wall = time.monotonic()
        t0 = time.monotonic() - self._sent / self.sample_rate
        while not self._stop.is_set():
            if self.station.idle and time.monotonic() >= self._idle_retry_at:
                if not self._idle():
                    return
                t0 = time.monotonic() - self._sent / self.sample_rate  # resume at real time: no burst
                continue
            ahead = self._sent / self.sample_rate - (time.monotonic() - t0)
            if ahead > self.lead:
                self._stop.wait(ahead - self.lead)
                continue
            if ahead < -1.0:
                # We were blocked (Icecast away, pipes full): resume at real time, do not burst.
                t0 = time.monotonic() - self._sent / self.sample_rate
            pcm, titles = self.station.read(self.block)
            for t in titles:
                self._announce(t)
            self.encoder.write(pcm)
            self._sent += len(pcm)
            self.media_seconds = self._sent / self.sample_rate
            if self.last_error and self._sent % (self.sample_rate * 30) < len(pcm):
                self.last_error = None  # fed cleanly for a while: the error is history (the count remains)

    IDLE_RETRY = 30.0  # seconds before an idle loop that could not be encoded is tried again

    def _idle(self) -> bool:
        """Nobody listens: loop the station's own recent audio, pre-encoded once, in place of the encoder, until
        the station generates again; then a fresh encoder picks up its queue where it stopped. False when the
        mount is stopping."""
        pcm = self.station.idle_loop()
        data = self._encode_loop(pcm)
        if data is None:
            return not self._stop.is_set()
        try:
            loop = IdleLoop(data, self.config.format, len(pcm) / self.sample_rate, self.lead)
        except EncoderError as exc:
            self._idle_failed(exc)
            return True
        self.encoder.idle(loop)
        self.idle_spells += 1
        logger.debug("%s: idle loop of %.1f s (%d bytes); encoder stopped", self.mount, loop.seconds, loop.bytes)
        while self.station.idle and not self._stop.is_set():
            self.station.wait_awake(0.5)
        if self._stop.is_set():
            return False
        self.encoder.resume(self.output.title)
        return True

    def _encode_loop(self, pcm: np.ndarray) -> bytes | None:
        """Encode the idle loop on a helper thread (a few at a time across all mounts: many stations go idle
        together at start-up), feeding the running encoder that same loop in real time meanwhile, so Icecast
        never waits for this mount. None when it failed or the mount is stopping."""
        cfg = self.config
        box: dict[str, object] = {}

        def work() -> None:
            with _LOOP_ENCODES:
                try:
                    box["data"] = encode_loop(pcm, cfg.format, cfg.bitrate, self.sample_rate, self.output.title,
                                              cfg.name, cfg.loudness)
                except EncoderError as exc:
                    box["error"] = exc

        worker = threading.Thread(target=work, name=f"loop{self.mount}", daemon=True)
        worker.start()
        pos = 0
        while worker.is_alive() and not self._stop.is_set():
            block = np.take(pcm, np.arange(pos, pos + self.block), axis=0, mode="wrap")
            pos = (pos + self.block) % len(pcm)
            self.encoder.write(block)
            self._sent += len(block)
            self._stop.wait(self.block / self.sample_rate)
        worker.join()
        if "error" in box:
            self._idle_failed(box["error"])
        data = box.get("data")
        return data if isinstance(data, bytes) and not self._stop.is_set() else None

    def _idle_failed(self, exc: object) -> None:
        # Without a loop the encoder plays the station's filler in real time: dearer, but on air.
        self._idle_retry_at = time.monotonic() + self.IDLE_RETRY
        _throttle.log(logging.WARNING, f"idle{self.mount}", "%s: %s; encoding filler while idle", self.mount, exc)

    def _announce(self, title: str) -> None:
        if self.config.format in TITLES_IN_STREAM:  # a new chained Ogg stream carries the title
            self.output.title = title
            self.encoder.rotate(title)
            logger.info("%s: now playing %r (in-stream)", self.mount, title)
        else:
            self.output.set_title(title)

    def status(self) -> dict[str, object]:
        """The mount's :class:`MountStatus`, as JSON."""
        s = self.output.stats
        return MountStatus(connected=s.connected, reconnects=s.reconnects, encoder_restarts=self.encoder.restarts,
                           bytes_sent=s.bytes_sent, last_error=self.last_error or s.last_error,
                           feeder_failures=self.failures, media_seconds=round(self.media_seconds, 1),
                           idle_spells=self.idle_spells).to_dict()
