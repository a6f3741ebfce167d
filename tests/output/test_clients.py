"""Real players: VLC tunes in and decodes; headless Chromium plays the web player's <audio>."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.request
import wave
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from radio.config import load_stations
from radio.daemon import Daemon

from ..conftest import daemon_config, mount_info, wait_for, write_station

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--mute-audio"]


@pytest.fixture
def station_daemon(icecast, tiny_model_dir: Path, tmp_path: Path):
    st = tmp_path / "stations"
    write_station(st, "a.yaml", """
        name: Player Test
        mount: /player.mp3
        description: heard by real players
        playlist:
          - {title: First song, prompt: calm piano, duration: 5s}
          - {title: Second song, prompt: fast drums, duration: 5s}
    """)
    stations, _ = load_stations([st])
    daemon = Daemon(daemon_config(icecast, tiny_model_dir, st, api_port=0), stations)
    daemon.start()
    try:
        wait_for(lambda: mount_info(icecast, "/player.mp3"), 20, message="on air")
        yield daemon, icecast
    finally:
        daemon.stop()


def _as_user(argv: list[str]) -> list[str]:
    # VLC refuses to run as root; run it as nobody then.
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--", *argv]
    return argv


def test_vlc_tunes_in_and_decodes_audio(station_daemon, tmp_path: Path) -> None:
    if shutil.which("cvlc") is None:
        pytest.fail("cvlc is not installed (apt-get install vlc-bin vlc-plugin-base); .ci/setup installs it")
    _daemon, icecast = station_daemon
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"radio-vlc-{os.getpid()}"
    out_dir.mkdir(exist_ok=True)
    out_dir.chmod(0o777)
    out = out_dir / "vlc.wav"
    sout = f"#transcode{{acodec=s16l,channels=1,samplerate=16000}}:std{{access=file,mux=wav,dst={out}}}"
    proc = subprocess.run(_as_user(["cvlc", "-q", "--intf", "dummy", "--no-video", "--play-and-exit",
                                    "--run-time=5", f"{icecast.url}/player.mp3", f"--sout={sout}", "vlc://quit"]),
                          capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr[-2000:]
        with wave.open(str(out)) as w:
            frames = w.readframes(w.getnframes())
        audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768
        assert len(audio) >= 3 * 16000, len(audio)
        assert np.sqrt(np.mean(audio ** 2)) > 0.005
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.fail("chromium is not installed (apt-get install chromium); .ci/setup installs it")


class DevTools:
    """Just enough of the Chrome DevTools Protocol: evaluate JavaScript, take a screenshot."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(msg["error"])
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


@contextlib.contextmanager
def chromium_page(url: str, profile: Path, size: str = "1100,700") -> Iterator[DevTools]:
    """Headless Chromium showing ``url``, driven through DevTools; closed on the way out."""
    from radio.output.local import free_port

    port = free_port()
    proc = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", f"--window-size={size}", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def targets():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    return [t for t in json.loads(r.read()) if t.get("type") == "page"]
            except OSError:
                return []

        yield DevTools(wait_for(targets, 30, 0.3, message="chromium's DevTools")[0]["webSocketDebuggerUrl"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_browser_plays_the_web_player_and_follows_now_playing(station_daemon, tmp_path: Path) -> None:
    import base64
    import time

    daemon, _icecast = station_daemon
    with chromium_page(f"http://127.0.0.1:{daemon.api.port}/", tmp_path / "profile") as tools:
        wait_for(lambda: tools.js("document.querySelectorAll('.station').length") == 1, 20,
                 message="the station card")
        assert tools.js("document.querySelector('.station .name').textContent") == "Player Test"
        assert tools.js("document.querySelector('.station .desc').textContent") == "heard by real players"
        tools.js("document.querySelector('.station .play').click()")  # press play
        state = "JSON.stringify({t: a.currentTime, src: a.src, err: a.error && a.error.message, paused: a.paused})"
        wait_for(lambda: (tools.js("document.querySelector('audio').currentTime") or 0) > 2.0, 30, 0.5,
                 message="<audio> currentTime to advance: "
                         + str(tools.js(f"(() => {{ const a = document.querySelector('audio'); return {state}; }})()")))
        assert tools.js("document.querySelector('audio').paused") is False
        first = tools.js("document.querySelector('.station .title').textContent")
        assert first in ("First song", "Second song")
        other = "Second song" if first == "First song" else "First song"
        wait_for(lambda: tools.js("document.querySelector('.station .title').textContent") == other, 30, 0.5,
                 message="now playing to change on the page")
        shot = Path(os.environ.get("RADIO_TEST_ARTIFACTS", tmp_path)) / "web-player.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"]))
        assert shot.stat().st_size > 1000
        print(f"web player screenshot: {shot}")
        time.sleep(0.1)
