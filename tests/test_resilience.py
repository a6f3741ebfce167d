"""Faults with the real parts: Icecast restarts, a killed encoder, a slow generator, live edits."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from radio.config import DaemonConfig, EngineConfig, IcecastConfig, load_stations
from radio.daemon import Daemon
from radio.output.local import fetch_status, free_port
from radio.musicgen.model import MusicgenModel

from .conftest import listen, mount_info, wait_for, write_station

pytestmark = pytest.mark.e2e


def station_text(name: str, mount: str, fmt: str, title: str, prompt: str, extra: str = "") -> str:
    return (f"name: {name}\nmount: {mount}\nformat: {fmt}\n{extra}playlist:\n"
            f"  - {{title: {title}, prompt: {prompt}, duration: 10m}}\n")


def start_daemon(icecast, model_dir: Path, stations_dir: Path, model_factory=None, **engine) -> Daemon:
    stations, problems = load_stations([stations_dir])
    assert not problems, problems
    cfg = DaemonConfig(stations_dir=str(stations_dir), model=str(model_dir), device="cpu", dtype="float32", seed=5,
                       icecast=IcecastConfig(host=icecast.host, port=icecast.port, password=icecast.source_password),
                       engine=EngineConfig(**{"chunk_seconds": 2.0, "first_chunk_seconds": 0.5,
                                              "buffer_seconds": 5.0, "generate": "always", **engine}))
    kwargs = {"model_factory": model_factory} if model_factory else {}
    daemon = Daemon(cfg, stations, **kwargs)
    daemon.start()
    return daemon


def audible_windows(audio: np.ndarray, rate: int = 16000, window: float = 0.1) -> np.ndarray:
    n = int(rate * window)
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    return np.sqrt(np.mean(frames ** 2, axis=1))


def test_every_mount_comes_back_after_icecast_restarts(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "a.yaml", station_text("A", "/a.mp3", "mp3", "Title A", "calm piano"))
    write_station(st, "b.yaml", station_text("B", "/b.ogg", "vorbis", "Title B", "soft pads"))
    write_station(st, "c.yaml", station_text("C", "/c.opus", "opus", "Title C", "slow jazz"))
    daemon = start_daemon(icecast, tiny_model_dir, st)
    try:
        mounts = ("/a.mp3", "/b.ogg", "/c.opus")
        wait_for(lambda: all(mount_info(icecast, m) for m in mounts), 20, message="mounts on air")
        icecast.stop()
        time.sleep(2.0)
        icecast.start()
        wait_for(lambda: all(mount_info(icecast, m) for m in mounts), 60, 0.1, message="mounts back")
        for mount, title in (("/a.mp3", "Title A"), ("/b.ogg", "Title B")):
            wait_for(lambda: mount_info(icecast, mount).get("title") == title, 5, message=f"{mount} title again")
        for mount in mounts:
            audio = listen(f"{icecast.url}{mount}", 3.0)
            assert np.sqrt(np.mean(audio ** 2)) > 0.005, mount
        status = daemon.status()["stations"]
        assert all(s["reconnects"] >= 1 for s in status)
        # An Ogg mount restarts its encoder once per new connection (fresh headers), and counts it once.
        for s in status:
            if s["format"] in ("vorbis", "opus"):
                assert s["encoder_restarts"] == s["reconnects"], s
            else:
                assert s["encoder_restarts"] == 0, s
    finally:
        daemon.stop()


def test_killed_encoder_restarts_for_its_mount_alone(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "a.yaml", station_text("A", "/a.mp3", "mp3", "Title A", "calm piano"))
    write_station(st, "b.yaml", station_text("B", "/b.ogg", "vorbis", "Title B", "soft pads"))
    daemon = start_daemon(icecast, tiny_model_dir, st)
    try:
        wait_for(lambda: mount_info(icecast, "/a.mp3") and mount_info(icecast, "/b.ogg"), 20, message="on air")
        result: dict[str, np.ndarray] = {}
        other = threading.Thread(target=lambda: result.update(a=listen(f"{icecast.url}/a.mp3", 8.0)))
        other.start()
        time.sleep(2.0)
        victim = next(m for m in daemon.mounts.values() if m.mount == "/b.ogg")
        os.kill(victim.encoder.pid, signal.SIGKILL)
        wait_for(lambda: victim.encoder.restarts >= 1, 5, message="encoder restart")
        after = listen(f"{icecast.url}/b.ogg", 3.0)
        assert np.sqrt(np.mean(after ** 2)) > 0.005
        other.join(30)
        a = result["a"]
        assert len(a) >= 8.0 * 16000 * 0.99
        assert audible_windows(a).min() > 0.002  # the other mount never dropped out
        assert next(m for m in daemon.mounts.values() if m.mount == "/a.mp3").encoder.restarts == 0
        assert mount_info(icecast, "/b.ogg")
    finally:
        daemon.stop()


class HalfSpeed:
    """The real tiny model, slowed down so it makes audio at half real time (as musicgen-small on a CPU)."""

    def __init__(self, inner: MusicgenModel) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def continue_batch(self, requests, frames):
        t0 = time.monotonic()
        results = self.inner.continue_batch(requests, frames)
        seconds = max(r.codes.shape[1] for r in results) / self.inner.frame_rate
        time.sleep(max(0.0, 2.0 * seconds - (time.monotonic() - t0)))
        return results


def test_half_real_time_generator_never_goes_silent_or_drops_the_source(icecast, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "slow.yaml", station_text("Slow", "/slow.mp3", "mp3", "Slow one", "slow piano"))

    def factory(c: DaemonConfig):
        return HalfSpeed(MusicgenModel(c.model, device=c.device, dtype=c.dtype, seed=c.seed))

    daemon = start_daemon(icecast, tiny_model_dir, st, model_factory=factory, chunk_seconds=1.0,
                          first_chunk_seconds=0.5, buffer_seconds=3.0)
    try:
        wait_for(lambda: mount_info(icecast, "/slow.mp3"), 20, message="on air")
        started = mount_info(icecast, "/slow.mp3").get("stream_start")
        arrivals: list[float] = []
        data = bytearray()
        with urllib.request.urlopen(f"{icecast.url}/slow.mp3", timeout=10) as resp:
            t_end = time.monotonic() + 60.0
            while time.monotonic() < t_end:
                chunk = resp.read1(2048)
                if not chunk:
                    break
                arrivals.append(time.monotonic())
                data.extend(chunk)
        gaps = np.diff(arrivals)
        assert gaps.max() <= 1.0, f"the stream stalled for {gaps.max():.2f}s"
        decoded = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-f", "s16le",
                                  "-ac", "1", "-ar", "16000", "pipe:1"], input=bytes(data), capture_output=True)
        audio = np.frombuffer(decoded.stdout, dtype="<i2").astype(np.float32) / 32768
        assert len(audio) >= 55 * 16000  # 60 s of listening, less the loudness filter's start-up lookahead
        silent = audible_windows(audio) < 0.002
        longest, run = 0, 0
        for s in silent:
            run = run + 1 if s else 0
            longest = max(longest, run)
        assert longest * 0.1 <= 1.0, f"{longest * 0.1:.1f}s of silence"
        status = daemon.status()["stations"][0]
        assert status["reconnects"] == 0 and status["connected"]
        assert mount_info(icecast, "/slow.mp3").get("stream_start") == started  # never disconnected
        assert status["filled_seconds"] > 10 and status["underruns"] >= 1  # the deficit is reported
    finally:
        daemon.stop()


def test_live_edits_apply_per_station_and_bad_edits_keep_the_running_version(
        icecast, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    st = tmp_path / "stations"
    a = write_station(st, "a.yaml", station_text("A", "/a.mp3", "mp3", "Alpha", "calm piano", "apply: now\n"))
    write_station(st, "b.yaml", station_text("B", "/b.ogg", "vorbis", "Bravo", "soft pads"))
    daemon = start_daemon(icecast, tiny_model_dir, st)
    caplog.set_level(logging.INFO)
    try:
        wait_for(lambda: mount_info(icecast, "/a.mp3").get("title") == "Alpha", 20, message="Alpha on air")
        b_mount = daemon.mounts[str(st / "b.yaml")]

        # 1. a new prompt and title, applied at once; the other station is not touched
        a.write_text(station_text("A", "/a.mp3", "mp3", "Alpha two", "fast drums", "apply: now\n"))
        daemon.reload()
        wait_for(lambda: mount_info(icecast, "/a.mp3").get("title") == "Alpha two", 20, message="new title")
        assert daemon.stations[str(a)].prompt == "fast drums"
        assert daemon.mounts[str(st / "b.yaml")] is b_mount

        # 2. a broken edit: logged with file and line, the running version keeps playing
        a.write_text("name: A\nmount: /a.mp3\nplaylist:\n  - {title: x, prompt: '', duration: 1m}\n")
        daemon.reload()
        assert f"{a}:4: playlist[0].prompt: must not be empty" in caplog.text
        assert daemon.stations[str(a)].prompt == "fast drums"
        time.sleep(1.0)
        assert mount_info(icecast, "/a.mp3").get("title") == "Alpha two"
        assert np.sqrt(np.mean(listen(f"{icecast.url}/a.mp3", 2.0) ** 2)) > 0.005

        # 3. fixed again
        a.write_text(station_text("A", "/a.mp3", "mp3", "Alpha three", "warm keys", "apply: now\n"))
        daemon.reload()
        wait_for(lambda: mount_info(icecast, "/a.mp3").get("title") == "Alpha three", 20, message="fixed title")

        # 4. a new file starts a station; 5. a removed file stops one
        write_station(st, "c.yaml", station_text("C", "/c.opus", "opus", "Charlie", "slow jazz"))
        (st / "b.yaml").unlink()
        daemon.reload()
        wait_for(lambda: mount_info(icecast, "/c.opus"), 20, message="new station on air")
        wait_for(lambda: not mount_info(icecast, "/b.ogg"), 10, message="removed station gone")
        assert np.sqrt(np.mean(listen(f"{icecast.url}/c.opus", 2.0) ** 2)) > 0.005
        assert sorted(s.mount for s in daemon.stations.values()) == ["/a.mp3", "/c.opus"]

        # 6. a changed format restarts that mount only
        a.write_text(station_text("A", "/a2.ogg", "vorbis", "Alpha three", "warm keys", "apply: now\n"))
        daemon.reload()
        wait_for(lambda: mount_info(icecast, "/a2.ogg"), 20, message="moved mount")
        wait_for(lambda: not mount_info(icecast, "/a.mp3"), 10, message="old mount gone")
    finally:
        daemon.stop()


def test_cli_watches_the_directory_and_reloads_on_sighup(tiny_model_dir: Path, tmp_path: Path) -> None:
    st = tmp_path / "stations"
    a = write_station(st, "a.yaml", station_text("A", "/a.mp3", "mp3", "First", "calm piano", "apply: now\n"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RADIO_SOURCE_PASSWORD"}
    proc = subprocess.Popen([sys.executable, "-m", "radio.cli", "run", "--stations", str(st), "--model",
                             str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--local-icecast",
                             "--port", str(port), "--generate", "always"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)

    class Server:  # enough of LocalIcecast for mount_info
        url = f"http://127.0.0.1:{port}"

        def status(self):
            return fetch_status(self.url)

    server = Server()
    try:
        wait_for(lambda: mount_info(server, "/a.mp3").get("title") == "First", 40, message="on air")
        a.write_text(station_text("A", "/a.mp3", "mp3", "Second", "fast drums", "apply: now\n"))
        wait_for(lambda: mount_info(server, "/a.mp3").get("title") == "Second", 20, message="watcher applied it")
        # A file whose mtime and size look unchanged is picked up by SIGHUP.
        stat = a.stat()
        a.write_text(station_text("A", "/a.mp3", "mp3", "Thirds", "slow drums", "apply: now\n"))
        os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(2.5)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: mount_info(server, "/a.mp3").get("title") == "Thirds", 20, message="SIGHUP reload")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
