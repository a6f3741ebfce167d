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
from collections import deque

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
                station: str | None = None, loudness: float | None = None, ffmpeg: str = "ffmpeg") -> list[str]:
    """The ffmpeg command line for one mount (a list: no shell, no quoting issues with titles).

    ``loudness`` (LUFS) adds EBU R128 normalisation (``loudnorm``, dynamic mode), so every station sits at
    the same level whatever the model makes; loudnorm works at 192 kHz, so the output rate is set again.
    """
    if fmt not in CODEC_ARGS:
        raise EncoderError(f"unknown format {fmt!r}")
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "warning",
            "-f", "f32le", "-ar", str(sample_rate), "-ch_layout", "mono", "-i", "pipe:0"]
    if loudness is not None:
        out_rate = OUTPUT_RATE[fmt] or sample_rate
        argv += ["-af", f"loudnorm=I={loudness:g}:TP=-1.5:LRA=11,aresample={out_rate},aformat=channel_layouts=mono"]
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


class Encoder:
    """One mount's ffmpeg, restartable and (for Ogg) chainable. Thread-safe: one writer, one reader."""

    def __init__(self, mount: str, fmt: str, bitrate: int, sample_rate: int, station: str = "",
                 loudness: float | None = None) -> None:
        self.mount = mount
        self.loudness = loudness
        self.format = fmt
        self.bitrate = bitrate
        self.sample_rate = sample_rate
        self.station = station
        self.title: str | None = None
        self.restarts = 0
        self._procs: deque[subprocess.Popen[bytes]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        if shutil.which("ffmpeg") is None:
            raise EncoderError("ffmpeg is not installed or not on PATH; install it (apt-get install ffmpeg)")

    @property
    def chainable(self) -> bool:
        return SHOUT_FORMAT[self.format] == "ogg"

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = ffmpeg_argv(self.format, self.bitrate, self.sample_rate, self.title, self.station, self.loudness)
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

    @property
    def processes(self) -> int:
        """ffmpeg processes held: the stream being encoded and, for a chained Ogg stream, one finishing."""
        with self._cond:
            return len(self._procs)

    @property
    def pid(self) -> int | None:
        with self._cond:
            return self._procs[-1].pid if self._procs else None

    def write(self, pcm: np.ndarray) -> None:
        """Feed PCM; a dead ffmpeg is replaced and the block goes to the new one."""
        data = np.ascontiguousarray(pcm, dtype="<f4").tobytes()
        for _ in range(2):
            with self._cond:
                if self._closed:
                    return
                proc = self._procs[-1] if self._procs else None
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
            if self._closed:
                return
            self.title = title
            if self._procs:
                self._close_stdin(self._procs[-1])
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
                _kill(p)
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
            if finished is not None:
                _reap(finished)  # outside the lock: the writer never waits for an exiting ffmpeg

    def close(self, timeout: float = 2.0) -> None:
        """Let ffmpeg flush and exit; kill it if it does not within ``timeout``."""
        with self._cond:
            self._closed = True
            procs = list(self._procs)
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
