"""Shared fixtures and helpers: a tiny random-weight checkpoint, a real icecast2 on a free loopback port,
listeners, an HTTP client for the API, station configs for engine tests."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from radio.config import PlaylistItem, Sampling, StationConfig
from radio.output.local import LocalIcecast, mounts
from radio.station.station import Station


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU, the GPU's Triton kernels run under Triton's interpreter (read when triton is imported,
    which nothing above does)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radio.tools.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-model"), shape="tiny", seed=0)


@pytest.fixture
def icecast():
    """A real icecast2 on 127.0.0.1 and a free port, config in a temp dir, stopped by PID afterwards."""
    if shutil.which("icecast2") is None:
        pytest.fail("icecast2 is not installed (apt-get install icecast2)")
    # its own work dir under /tmp: as root, icecast2 drops to nobody, who cannot enter pytest's tmp_path
    server = LocalIcecast(source_password="test-source-pw", min_sources=16)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def write_station(directory: Path, filename: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if len(last) if hasattr(last, "__len__") else last:  # arrays and lists: non-empty counts
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def mount_info(server: LocalIcecast, mount: str) -> dict:
    info = dict(mounts(server.status()).get(mount, {}))
    if isinstance(info.get("title"), str):
        # status-json.xsl writes characters outside Latin-1 as XML character references (&#9749;)
        info["title"] = html.unescape(info["title"])
    return info


def listen(url: str, seconds: float, out_rate: int = 16000, timeout: float | None = None) -> np.ndarray:
    """Decode ``seconds`` of a mount with ffmpeg, as a listener would; returns mono float samples."""
    proc = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", url, "-t", str(seconds),
         "-f", "s16le", "-ac", "1", "-ar", str(out_rate), "pipe:1"],
        capture_output=True, timeout=timeout or seconds + 30,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return np.frombuffer(proc.stdout, dtype="<i2").astype(np.float32) / 32768.0


def probe(url: str) -> dict:
    """ffprobe's view of a mount's first audio stream (codec, sample rate) and its tags."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,sample_rate:stream_tags:format_tags",
         "-of", "json", url], capture_output=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def fetch_bytes(url: str, seconds: float) -> bytes:
    """Raw bytes of a mount for ``seconds``, as a player receives them."""
    chunks = []
    deadline = time.monotonic() + seconds
    with urllib.request.urlopen(url, timeout=10) as resp:
        while time.monotonic() < deadline:
            data = resp.read1(4096) if hasattr(resp, "read1") else resp.read(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def daemon_config(icecast: LocalIcecast, model_dir: Path, stations_dir: Path, api_port: int | None = None,
                  token: str = "", memory_budget: str = "off", **engine: float):
    """A DaemonConfig for tests: tiny model on CPU, the fixture's Icecast, short chunks, every station generated
    whether or not anyone listens (``generate="listened"`` for the audience's own tests)."""
    from radio.config import ApiConfig, DaemonConfig, EngineConfig, IcecastConfig

    return DaemonConfig(
        stations_dir=str(stations_dir), model=str(model_dir), device="cpu", dtype="float32", seed=5,
        memory_budget=memory_budget,
        icecast=IcecastConfig(host=icecast.host, port=icecast.port, password=icecast.source_password),
        engine=EngineConfig(**{"chunk_seconds": 1.0, "first_chunk_seconds": 0.5, "buffer_seconds": 3.0,
                               "generate": "always", **engine}),
        api=ApiConfig(port=api_port, token=token) if api_port is not None else ApiConfig(enabled=False),
    )


def run_daemon(icecast: LocalIcecast, model_dir: Path, stations_dir: Path, **kw):
    """Load every station in ``stations_dir`` (all must be valid) and start a daemon on the fixture's Icecast
    with ``daemon_config(**kw)``; the caller stops it."""
    from radio.config import load_stations
    from radio.daemon import Daemon

    stations, problems = load_stations([stations_dir])
    assert not problems, problems
    daemon = Daemon(daemon_config(icecast, model_dir, stations_dir, **kw), stations)
    daemon.start()
    return daemon


def request(url: str, method: str = "GET", body: bytes | None = None, token: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def station_config(mount: str, items: tuple[PlaylistItem, ...] | None = None, **kw) -> StationConfig:
    items = items or (PlaylistItem("one", "prompt one", 60.0), PlaylistItem("two", "prompt two", 60.0))
    base = dict(name=mount.strip("/"), mount=mount, format="mp3", bitrate=128, description="", genre="", url="",
                order="cycle", sampling=Sampling(), playlist=items, path=f"/st/{mount.strip('/')}.yaml")
    base.update(kw)
    return StationConfig(**base)


def drain(station: Station) -> np.ndarray:
    """Everything a listener can take right now without touching the filler reserve."""
    n = int(round(station.buffered_seconds * station.sample_rate)) - station.reserve_samples
    pcm, _ = station.read(n)
    return pcm
