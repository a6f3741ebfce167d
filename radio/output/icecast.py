"""The Icecast side of one mount: a python-shout (libshout) connection paced with ``sync()``.

The sender thread reads encoded bytes from the mount's :class:`~radio.output.encoder.Encoder` and sends them.
If Icecast goes away or refuses us, it reconnects with capped, jittered exponential backoff, forever, and
logs one line per state change (not one per retry). After every (re)connect it re-sends the current title.

Now-playing titles for MP3 and Ogg Vorbis go through Icecast's ``/admin/metadata?mode=updinfo`` (UTF-8),
authenticated with the source credentials. Ogg Opus mounts carry titles in-stream instead (see encoder).
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

import shout

from ..config import IcecastConfig, StationConfig
from .encoder import OUTPUT_RATE, SHOUT_FORMAT, TITLES_IN_STREAM, Encoder, safe_text

logger = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0


@dataclass
class OutputStats:
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    bytes_sent: int = 0
    last_error: str = ""


def backoff_delays(rng: random.Random, lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX):
    """Exponential backoff with full jitter in [d/2, d], capped at ``hi``."""
    delay = lo
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(hi, delay * 2)


def explain_shout_error(exc: Exception, server: IcecastConfig, mount: str) -> str:
    text = str(exc)
    low = text.lower()
    if "login" in low or "403" in low or "401" in low or "auth" in low:
        return (f"Icecast at {server.host}:{server.port} refused {mount}: wrong source password, or the mount is "
                f"already in use by another source ({text})")
    if "connect" in low or "socket" in low:
        return f"cannot reach Icecast at {server.host}:{server.port} for {mount} ({text})"
    return f"Icecast error on {mount}: {text}"


class IcecastOutput:
    """One shout connection. ``on_connect`` runs after each successful (re)connect, before any audio."""

    def __init__(self, server: IcecastConfig, station: StationConfig, encoder: Encoder, sample_rate: int,
                 on_connect: Callable[[int], None] | None = None) -> None:
        self.server = server
        self.station = station
        self.encoder = encoder
        self.sample_rate = OUTPUT_RATE[station.format] or sample_rate
        self.on_connect = on_connect
        self.stats = OutputStats()
        self.title: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shout: shout.Shout | None = None
        self._rng = random.Random()
        self._meta_lock = threading.Lock()

    @property
    def mount(self) -> str:
        return self.station.mount

    def _make_shout(self) -> shout.Shout:
        s = shout.Shout()
        s.host = self.server.host
        s.port = self.server.port
        s.user = self.server.user
        s.password = self.server.password
        s.mount = self.station.mount
        s.format = SHOUT_FORMAT[self.station.format]
        s.protocol = "http"
        s.name = self.station.name
        s.description = self.station.description or self.station.name
        s.genre = self.station.genre
        if self.station.url:
            s.url = self.station.url
        s.public = 0
        s.audio_info = {shout.SHOUT_AI_BITRATE: str(self.station.bitrate),
                        shout.SHOUT_AI_SAMPLERATE: str(self.sample_rate),
                        shout.SHOUT_AI_CHANNELS: "1"}
        return s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"shout{self.mount}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._disconnect()

    def _disconnect(self) -> None:
        s, self._shout = self._shout, None
        if s is not None:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone either way
                pass
        self.stats.connected = False

    def _connect_forever(self) -> bool:
        delays = backoff_delays(self._rng)
        failing_with = ""
        while not self._stop.is_set():
            s = self._make_shout()
            try:
                s.open()
            except shout.ShoutException as exc:
                message = explain_shout_error(exc, self.server, self.mount)
                if message != failing_with:
                    logger.error("%s", message)
                    failing_with = message
                self.stats.last_error = message
                self._stop.wait(next(delays))
                continue
            self._shout = s
            if self.stats.connects:
                self.stats.reconnects += 1
            self.stats.connects += 1
            self.stats.connected = True
            logger.info("%s: connected to Icecast at %s:%d%s", self.mount, self.server.host, self.server.port,
                        " (reconnected)" if self.stats.reconnects else "")
            return True
        return False

    def _run(self) -> None:
        send = sync = None
        while not self._stop.is_set():
            if self._shout is None:
                if not self._connect_forever():
                    break
                # python-shout 0.2.8 leaks a str on every attribute lookup of a Shout object (its getattr never
                # releases the name it builds): ~100 bytes per send+sync, 15-20 MB an hour for four mounts.
                # The two methods of the loop are looked up once per connection instead.
                conn = self._shout
                if conn is None:
                    continue
                send, sync = conn.send, conn.sync
                if self.on_connect is not None:
                    self.on_connect(self.stats.connects)
                if self.title:
                    self._send_title(self.title)
            data = self.encoder.read(8192)
            if not data or self._shout is None or send is None or sync is None:
                continue
            try:
                send(data)
                self.stats.bytes_sent += len(data)
                sync()
            except shout.ShoutException as exc:
                logger.warning("%s: lost connection to Icecast (%s); reconnecting", self.mount, exc)
                self.stats.last_error = str(exc)
                self._disconnect()
        self._disconnect()

    # -- metadata --------------------------------------------------------------------------------------------
    def set_title(self, title: str) -> None:
        """Now-playing title. Sent at once when connected (MP3/Vorbis), and again after every reconnect."""
        self.title = title
        if self.stats.connected and self.station.format not in TITLES_IN_STREAM:
            threading.Thread(target=self._send_title, args=(title,), name=f"meta{self.mount}", daemon=True).start()

    def _send_title(self, title: str) -> None:
        try:
            self._update_title(title)
        except Exception as exc:  # noqa: BLE001 - a title must never take the mount (or its thread) down
            self.stats.last_error = f"title update failed: {exc}"
            logger.warning("%s: title update failed: %s", self.mount, exc)

    def _update_title(self, title: str) -> None:
        if self.station.format in TITLES_IN_STREAM:
            return  # in-stream (Ogg chain) instead
        query = urllib.parse.urlencode({"mount": self.mount, "mode": "updinfo", "song": safe_text(title),
                                        "charset": "UTF-8"})
        url = f"http://{self.server.host}:{self.server.port}/admin/metadata?{query}"
        token = base64.b64encode(f"{self.server.user}:{self.server.password}".encode()).decode()
        req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        err: Exception | None = None
        with self._meta_lock:
            for attempt in range(3):
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        body = resp.read(2000).decode("utf-8", "replace")
                    if "<return>1</return>" in body or resp.status == 200:
                        logger.info("%s: now playing %r", self.mount, title)
                        return
                except (urllib.error.URLError, OSError) as exc:
                    err = exc
                    time.sleep(0.3 * (attempt + 1))
                    continue
            logger.warning("%s: could not update the title on Icecast: %s", self.mount, err)
