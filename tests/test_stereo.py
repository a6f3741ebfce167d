"""A stereo and a mono station on air together (real icecast2, the tiny models): each mount carries its model's
channels, and listeners decode both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .conftest import mount_info, probe, request, run_daemon, wait_for, write_station

pytestmark = pytest.mark.e2e


def decode_stereo(url: str, seconds: float) -> np.ndarray:
    """``seconds`` of a mount as two channels (a mono mount comes back with both alike), (samples, 2)."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", url, "-t", str(seconds),
                           "-f", "s16le", "-ac", "2", "-ar", "16000", "pipe:1"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return np.frombuffer(proc.stdout, dtype="<i2").astype(np.float32).reshape(-1, 2) / 32768.0


def test_a_stereo_and_a_mono_station_share_the_daemon(icecast, tiny_model_dir: Path, tiny_stereo_model_dir: Path,
                                                     tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "stereo.yaml", f"""
        name: Wide
        mount: /wide.opus
        format: opus
        model: {tiny_stereo_model_dir}
        playlist:
          - {{title: Left and right, prompt: wide ambient pads, duration: 10m}}
    """)
    write_station(st, "mono.yaml", """
        name: Narrow
        mount: /narrow.mp3
        playlist:
          - {title: Middle, prompt: mono piano, duration: 10m}
    """)
    daemon = run_daemon(icecast, tiny_model_dir, st, api_port=0)
    try:
        for mount, title in (("/wide.opus", "Left and right"), ("/narrow.mp3", "Middle")):
            wait_for(lambda: mount_info(icecast, mount), 30, message=f"{mount} on air")
        streams = {m: probe(f"{icecast.url}{m}")["streams"][0] for m in ("/wide.opus", "/narrow.mp3")}
        assert (streams["/wide.opus"]["codec_name"], int(streams["/wide.opus"]["channels"])) == ("opus", 2)
        assert (streams["/narrow.mp3"]["codec_name"], int(streams["/narrow.mp3"]["channels"])) == ("mp3", 1)
        wide = decode_stereo(f"{icecast.url}/wide.opus", 4.0)
        narrow = decode_stereo(f"{icecast.url}/narrow.mp3", 4.0)
        for audio in (wide, narrow):
            assert len(audio) >= 3.5 * 16000 and np.sqrt(np.mean(audio ** 2)) > 0.001
        side = np.sqrt(np.mean((wide[:, 0] - wide[:, 1]) ** 2))
        assert side > 0.01 * np.sqrt(np.mean(wide ** 2)), "the stereo mount's channels are the same"
        assert np.abs(narrow[:, 0] - narrow[:, 1]).max() == 0.0
        status = json.loads(request(f"http://127.0.0.1:{daemon.api.port}/status")[1])
        channels = {s["mount"]: s["channels"] for s in status["stations"]}
        assert channels == {"/wide.opus": 2, "/narrow.mp3": 1}
        assert sorted(m["channels"] for m in status["models"]["models"]) == [1, 2]
    finally:
        daemon.stop()
