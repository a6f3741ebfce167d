"""The ffmpeg encoder of one mount: float32 PCM on stdin, MP3 / Ogg Vorbis / Ogg Opus on stdout.

The argv is a list (never a shell). ffmpeg's stderr goes to our log, prefixed with the mount. A dead
ffmpeg is restarted by the next ``write``; the reader waits for the new process meanwhile.

Ogg streams can be *chained*: ``rotate(title)`` ends the current logical stream and starts a new one whose
comment header carries the new title. That is how a title reaches Ogg Opus listeners, since Icecast 2.4
does not accept metadata updates for Opus mounts. The reader drains the old process to its end before it
moves on to the new one, so no audio is lost at a rotation.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import threading
import time
from collections import deque
from typing import Union

import numpy as np

from ..errors import EncoderError

logger = logging.getLogger(__name__)

CODEC_ARGS: dict[str, list[str]] = {
    "mp3": ["-c:a", "libmp3lame", "-f", "mp3", "-id3v2_version", "0", "-write_xing", "0"],
    "vorbis": ["-c:a", "libvorbis", "-f", "ogg", "-page_duration", "250000"],
    "opus": ["-ar", "48000", "-c:a", "libopus", "-application", "audio", "-f", "ogg", "-page_duration", "250000"],
}
SHOUT_FORMAT = {"mp3": "mp3", "vorbis": "ogg", "opus": "ogg"}
OUTPUT_RATE = {"mp3": None, "vorbis": None, "opus": 48000}
# Icecast 2.4 refuses metadata updates (updinfo) for Opus: its titles travel in-stream, as a new chained Ogg
# stream that carries the title in its comment header.
TITLES_IN_STREAM = frozenset({"opus"})


def safe_text(text: str) -> str:
    """Text as an encoder or Icecast can carry it: valid UTF-8 (anything else becomes U+FFFD) on one line
    without control characters. Validation keeps such text out; this is the last guard in front of a child
    process or a URL, so one bad title can never take a mount down."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if (ord(c) >= 32 and not 0x7F <= ord(c) <= 0x9F) or c == "\t" else " " for c in text)


def ffmpeg_argv(fmt: str, bitrate: int, sample_rate: int, title: str | None = None,
                station: str | None = None, loudness: float | None = None, ffmpeg: str = "ffmpeg",
                trim: tuple[float, float] | None = None, channels: int = 1) -> list[str]:
    """The ffmpeg command line for one mount (a list: no shell, no quoting issues with titles).

    ``loudness`` (LUFS) adds EBU R128 normalisation (``loudnorm``, dynamic mode), so every station sits at
    the same level whatever the model makes; loudnorm works at 192 kHz, so the output rate is set again.
    ``channels``: 1 (mono) or 2 (stereo, the samples interleaved left/right).
    ``trim`` (start, end seconds) keeps only that part of the filtered input (see :func:`encode_loop`).
    """
    if fmt not in CODEC_ARGS:
        raise EncoderError(f"unknown format {fmt!r}")
    layout = {1: "mono", 2: "stereo"}[channels]
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "warning",
            "-f", "f32le", "-ar", str(sample_rate), "-ch_layout", layout, "-i", "pipe:0"]
    filters = []
    if loudness is not None:
        out_rate = OUTPUT_RATE[fmt] or sample_rate
        filters.append(f"loudnorm=I={loudness:g}:TP=-1.5:LRA=11,aresample={out_rate},aformat=channel_layouts={layout}")
    if trim is not None:
        filters.append(f"atrim=start={trim[0]:.6f}:end={trim[1]:.6f},asetpts=PTS-STARTPTS")
    if filters:
        argv += ["-af", ",".join(filters)]
    argv += [*CODEC_ARGS[fmt], "-b:a", f"{bitrate}k"]
    if SHOUT_FORMAT[fmt] == "ogg":
        # Chained logical streams need distinct serial numbers to be recognised as new streams.
        argv += ["-serial_offset", str(random.randrange(1, 2**30))]
    if title:
        argv += ["-metadata", f"title={safe_text(title)}"]
    if station:
        argv += ["-metadata", f"artist={safe_text(station)}"]
    argv += ["-flush_packets", "1", "pipe:1"]
    return argv


def encode_loop(pcm: np.ndarray, fmt: str, bitrate: int, sample_rate: int, title: str | None = None,
                station: str | None = None, loudness: float | None = None, timeout: float = 30.0) -> bytes:
    """One cycle of a seamless loop (``pcm``), encoded once as a whole stream of the mount's format: a
    complete Ogg stream (headers, pages, end of stream) or whole MP3 frames. The encoder runs over three
    cycles and keeps the middle one, so loudness normalisation has settled exactly as on the live stream."""
    seconds = len(pcm) / sample_rate
    argv = ffmpeg_argv(fmt, bitrate, sample_rate, title, station, loudness, trim=(seconds, 2 * seconds),
                       channels=1 if pcm.ndim == 1 else pcm.shape[1])
    data = np.ascontiguousarray(np.concatenate([pcm] * 3), dtype="<f4").tobytes()
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EncoderError(f"cannot encode the idle loop: {exc}") from exc
    if proc.returncode != 0 or not proc.stdout:
        raise EncoderError(f"ffmpeg could not encode the idle loop (code {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-300:]}")
    return proc.stdout


# MPEG audio frame headers: bitrates (kbit/s) by [MPEG-1?][index] for Layer III, sample rates by version.
_MP3_BITRATES = {True: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
                 False: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frames(data: bytes) -> list[bytes]:
    """Split an MPEG Layer III stream into whole frames (anything that is not a frame is dropped)."""
    frames, i = [], 0
    while i + 4 <= len(data):
        b1, b2 = data[i + 1], data[i + 2]
        version, layer, index, rate = (b1 >> 3) & 3, (b1 >> 1) & 3, b2 >> 4, (b2 >> 2) & 3
        if data[i] != 0xFF or b1 & 0xE0 != 0xE0 or layer != 1 or version == 1 or index in (0, 15) or rate == 3:
            i += 1
            continue
        mpeg1 = version == 3
        size = (144 if mpeg1 else 72) * _MP3_BITRATES[mpeg1][index] * 1000 // _MP3_RATES[version][rate] \
            + ((b2 >> 1) & 1)
        if i + size > len(data):
            break
        frames.append(data[i:i + size])
        i += size
    return frames


def ogg_pages(data: bytes) -> list[bytes]:
    """Split an Ogg stream into whole pages."""
    pages, i = [], 0
    while i + 27 <= len(data):
        if data[i:i + 4] != b"OggS":
            i = data.find(b"OggS", i + 1)
            if i < 0:
                break
            continue
        segments = data[i + 26]
        size = 27 + segments + sum(data[i + 27:i + 27 + segments])
        if i + size > len(data):
            break
        pages.append(data[i:i + size])
        i += size
    return pages


def _ogg_crc_table() -> list[int]:
    table = []
    for n in range(256):
        r = n << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if r & 0x80000000 else (r << 1) & 0xFFFFFFFF
        table.append(r)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes | bytearray) -> int:
    """An Ogg page's checksum (CRC-32, polynomial 0x04C11DB7, unreflected), computed with its own field zeroed."""
    crc = 0
    for i, byte in enumerate(page):
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ (0 if 22 <= i < 26 else byte)]
    return crc


def reserial(pages: list[bytes], serial: int) -> list[bytes]:
    """The same Ogg pages with another stream serial number (and their checksums computed again): a stream
    that follows itself in a chain must carry a new serial to be recognised as a new stream."""
    out = []
    for page in pages:
        p = bytearray(page)
        p[14:18] = serial.to_bytes(4, "little")
        p[22:26] = ogg_crc(p).to_bytes(4, "little")
        out.append(bytes(p))
    return out


class IdleLoop:
    """An idle mount's source: a pre-encoded loop sent in real time in place of a running encoder, so the
    mount stays on air (new listeners get the station's own audio, never a 404) for next to no CPU.

    It yields whole units (MP3 frames, Ogg pages), never more than ``lead`` seconds ahead of wall time, and
    can stop after any of them (:meth:`finish`), so the live encoder's stream follows at a clean boundary.
    An Ogg loop is a complete stream; each repetition is the next link of a chain and alternates between two
    serial numbers."""

    def __init__(self, data: bytes, fmt: str, seconds: float, lead: float = 0.5) -> None:
        if SHOUT_FORMAT[fmt] == "ogg":
            pages = ogg_pages(data)
            serial = int.from_bytes(pages[0][14:18], "little") if pages else 0
            self.variants = [pages, reserial(pages, (serial + 1) & 0xFFFFFFFF)]
        else:
            self.variants = [mp3_frames(data)]
        if not self.variants[0]:
            raise EncoderError(f"the idle loop encoded to no {fmt} data")
        total = sum(len(u) for u in self.variants[0])
        self.unit_seconds = [seconds * len(u) / total for u in self.variants[0]]
        self.seconds = seconds
        self.lead = lead
        self.bytes = total
        self._cond = threading.Condition()
        self._finished = False
        self.rewind()

    def rewind(self) -> None:
        """Start again from the beginning of a cycle (a new Icecast connection needs the Ogg headers)."""
        with self._cond:
            self._variant = self._unit = 0
            self._t0 = time.monotonic()
            self._sent = 0.0

    def finish(self) -> None:
        """End after the unit being sent: the next :meth:`read` returns b''."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of whole units (at least one), paced to real time; b'' once finished."""
        with self._cond:
            while not self._finished:
                ahead = self._sent - (time.monotonic() - self._t0)
                if ahead < -1.0:  # the connection stalled (Icecast away): go on at real time, no burst
                    self._t0 = time.monotonic() - self._sent
                    continue
                if ahead <= self.lead:
                    break
                self._cond.wait(ahead - self.lead)
            if self._finished:
                return b""
            out: list[bytes] = []
            size = 0
            while not out or (size + len(self.variants[self._variant][self._unit]) <= n
                              and self._sent - (time.monotonic() - self._t0) <= self.lead):
                unit = self.variants[self._variant][self._unit]
                out.append(unit)
                size += len(unit)
                self._sent += self.unit_seconds[self._unit]
                self._unit += 1
                if self._unit == len(self.unit_seconds):
                    self._unit = 0
                    self._variant = (self._variant + 1) % len(self.variants)
            return b"".join(out)


_Stream = Union["subprocess.Popen[bytes]", IdleLoop]


class Encoder:
    """One mount's ffmpeg, restartable and (for Ogg) chainable. Thread-safe: one writer, one reader.

    While its station is idle (:meth:`idle`), no ffmpeg runs: an :class:`IdleLoop` takes its place until
    :meth:`resume` starts a fresh one behind it."""

    def __init__(self, mount: str, fmt: str, bitrate: int, sample_rate: int, station: str = "",
                 loudness: float | None = None, channels: int = 1) -> None:
        self.mount = mount
        self.channels = channels
        self.loudness = loudness
        self.format = fmt
        self.bitrate = bitrate
        self.sample_rate = sample_rate
        self.station = station
        self.title: str | None = None
        self.restarts = 0
        self.live_since: float | None = None  # when the encoder's bytes last took over from an idle loop
        self._procs: deque[_Stream] = deque()
        self._cond = threading.Condition()
        self._closed = False
        if shutil.which("ffmpeg") is None:
            raise EncoderError("ffmpeg is not installed or not on PATH; install it (apt-get install ffmpeg)")

    @property
    def chainable(self) -> bool:
        return SHOUT_FORMAT[self.format] == "ogg"

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = ffmpeg_argv(self.format, self.bitrate, self.sample_rate, self.title, self.station, self.loudness,
                           channels=self.channels)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise EncoderError(f"{self.mount}: cannot start ffmpeg: {exc}") from exc
        threading.Thread(target=self._log_stderr, args=(proc,), name=f"ffmpeg-log{self.mount}",
                         daemon=True).start()
        return proc

    def _log_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stderr is None:
            return
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                logger.warning("%s: ffmpeg: %s", self.mount, line)

    def start(self, title: str | None = None) -> None:
        with self._cond:
            self.title = title
            self._closed = False
            self._procs.append(self._spawn())
            self._cond.notify_all()

    def _ffmpegs(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self._procs if not isinstance(p, IdleLoop)]

    @property
    def processes(self) -> int:
        """ffmpeg processes held: the stream being encoded and, for a chained Ogg stream, one finishing."""
        with self._cond:
            return len(self._ffmpegs())

    @property
    def pid(self) -> int | None:
        with self._cond:
            procs = self._ffmpegs()
            return procs[-1].pid if procs else None

    @property
    def idling(self) -> bool:
        """An idle loop is the newest stream: nothing is encoded."""
        with self._cond:
            return bool(self._procs) and isinstance(self._procs[-1], IdleLoop)

    def idle(self, loop: IdleLoop) -> None:
        """Stop encoding: every ffmpeg finishes (its last bytes are still sent) and exits, then ``loop``
        plays until :meth:`resume`."""
        with self._cond:
            if self._closed:
                return
            for p in self._ffmpegs():
                self._close_stdin(p)
            self._procs.append(loop)
            self._cond.notify_all()

    def resume(self, title: str | None) -> None:
        """Encode again: a fresh ffmpeg (a new Ogg stream, with ``title``) follows the idle loop's current unit."""
        with self._cond:
            if self._closed:
                return
            for p in self._procs:
                if isinstance(p, IdleLoop):
                    p.finish()
            self.title = title
            self._procs.append(self._spawn())
            self._cond.notify_all()

    def write(self, pcm: np.ndarray) -> None:
        """Feed PCM; a dead ffmpeg is replaced and the block goes to the new one."""
        data = np.ascontiguousarray(pcm, dtype="<f4").tobytes()
        for _ in range(2):
            with self._cond:
                if self._closed:
                    return
                proc = self._procs[-1] if self._procs else None
            if isinstance(proc, IdleLoop):
                return  # idle: nothing is encoded (the feeder does not write meanwhile)
            if proc is None or proc.stdin is None:
                self.restart("no encoder running")
                continue
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
                return
            except (BrokenPipeError, ValueError, OSError):
                with self._cond:
                    replaced = not self._procs or self._procs[-1] is not proc
                if replaced:
                    continue  # a restart (e.g. for a new Icecast connection) closed it under us: not a new failure
                code = proc.poll()
                self.restart(f"ffmpeg exited (code {code})")

    def rotate(self, title: str | None) -> None:
        """Ogg only: end the current logical stream and start a new one carrying ``title``."""
        with self._cond:
            if self._closed or self.idling:
                return
            self.title = title
            if self._procs:
                self._close_stdin(self._procs[-1])  # type: ignore[arg-type]
            self._procs.append(self._spawn())
            self._cond.notify_all()

    def restart(self, reason: str, title: str | None = None) -> None:
        """Kill every ffmpeg of this mount and start a fresh one (a fresh Ogg stream begins with headers)."""
        with self._cond:
            if self._closed:
                return
            if title is not None:
                self.title = title
            old = list(self._procs)
            self._procs.clear()
            for p in old:
                if not isinstance(p, IdleLoop):
                    _kill(p)
            if old and isinstance(old[-1], IdleLoop):
                # Idle: the loop plays on from the start of a cycle (a new connection needs its Ogg headers).
                old[-1].rewind()
                self._procs.append(old[-1])
                self._cond.notify_all()
                return
            self.restarts += 1
            logger.warning("%s: restarting encoder: %s", self.mount, reason)
            self._procs.append(self._spawn())
            self._cond.notify_all()

    def read(self, n: int = 4096, timeout: float = 1.0) -> bytes:
        """Encoded bytes, oldest stream first. b'' when closed, or when nothing arrived within ``timeout``."""
        while True:
            with self._cond:
                if not self._procs:
                    if self._closed:
                        return b""
                    self._cond.wait(timeout)
                    if not self._procs:
                        return b""
                proc = self._procs[0]
            if isinstance(proc, IdleLoop):
                data = proc.read(n)  # paced: may wait up to a unit's time
                if data:
                    return data
                with self._cond:  # finished: the fresh encoder behind it takes over
                    if self._procs and self._procs[0] is proc:
                        self._procs.popleft()
                        self.live_since = time.monotonic()
                continue
            try:
                # a pipe is a BufferedReader: read1 returns what is there (up to n) without waiting for n
                data = proc.stdout.read1(n) if proc.stdout is not None else b""  # type: ignore[attr-defined]
            except (ValueError, OSError):  # closed under us by a restart
                data = b""
            if data:
                return data
            # EOF: this stream ended (rotation, close), was replaced by a restart, or ffmpeg died.
            finished = None
            with self._cond:
                if self._procs and self._procs[0] is proc:
                    if len(self._procs) > 1 or self._closed:
                        finished = self._procs.popleft()
                    else:
                        # It died while being the only one: the writer restarts it; wait for that.
                        self._cond.wait(timeout)
                        if self._procs and self._procs[0] is proc:
                            return b""
            if finished is not None and not isinstance(finished, IdleLoop):
                _reap(finished)  # outside the lock: the writer never waits for an exiting ffmpeg

    def close(self, timeout: float = 2.0) -> None:
        """Let ffmpeg flush and exit; kill it if it does not within ``timeout``."""
        with self._cond:
            self._closed = True
            for loop in self._procs:
                if isinstance(loop, IdleLoop):
                    loop.finish()
            procs = self._ffmpegs()
            self._cond.notify_all()
        for p in procs:
            self._close_stdin(p)
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(p)
        with self._cond:
            self._procs.clear()

    @staticmethod
    def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """A finished stream's ffmpeg: close our ends of its pipes and collect its exit status (no zombie, no file
    descriptors left behind). Its stderr logger thread ends at the pipe's EOF."""
    _close_pipes(proc)
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.kill()
        proc.wait(2)
    except (OSError, subprocess.TimeoutExpired):
        pass
    _close_pipes(proc)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close our ends of an ffmpeg's stdin and stdout."""
    for pipe in (proc.stdin, proc.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
