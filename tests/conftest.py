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


SESSION_MARK = "RADIO_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU, the GPU's Triton kernels run under Triton's interpreter (read when triton is imported,
    which nothing above does). Every process the suite starts inherits a mark of this session, so its end can
    tell which servers and encoders are its own."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def leftover_processes() -> dict[int, str]:
    """icecast2 and ffmpeg processes started by this test session that are still running (zombies aside)."""
    mark = f"{SESSION_MARK}={os.environ.get(SESSION_MARK, '')}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            if name not in ("icecast2", "icecast", "ffmpeg"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and mark in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite proves that nothing it started outlives it: any icecast2 or ffmpeg of this session still
    running now fails the run (and is stopped)."""
    import signal

    left = {}
    deadline = time.monotonic() + 5.0  # a process told to stop by the last test's teardown may still be exiting
    while time.monotonic() < deadline:
        left = leftover_processes()
        if not left:
            return
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    report = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in left.items())
    session.config.get_terminal_writer().line(f"\nprocesses started by the tests outlived them:\n{report}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radio.tools.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-model"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_stereo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radio.tools.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-stereo-model"), shape="tiny-stereo", seed=0)


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


def silent_run_seconds(audio: np.ndarray, rate: int = 16000, window: float = 0.05) -> float:
    """The longest stretch of near-silence (< -54 dBFS per 50 ms) a listener heard."""
    n = int(rate * window)
    levels = np.sqrt(np.mean(audio[: len(audio) // n * n].reshape(-1, n) ** 2, axis=1))
    longest = run = 0
    for quiet in levels < 0.002:
        run = run + 1 if quiet else 0
        longest = max(longest, run)
    return longest * window


def probe(url: str) -> dict:
    """ffprobe's view of a mount's first audio stream (codec, sample rate) and its tags."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,sample_rate,channels:stream_tags:format_tags",
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


def generating_after(base: str, mount: str, code: int, body: bytes | dict, timeout: float = 30.0) -> str:
    """What a station generates once a prompt or skip the API answered (200: applied; 202: pending until the
    running model step ends) has applied."""
    answer = json.loads(body) if isinstance(body, bytes) else body
    assert code in (200, 202), (code, answer)
    if code == 200:
        return answer["generating"]
    assert answer["accepted"]["pending"] in answer["pending"], answer

    def now() -> str | None:
        stations = json.loads(request(f"{base}/status")[1])["stations"]
        st = next(s for s in stations if s["mount"] == mount)
        return st["generating"] if not st["pending"] else None

    return wait_for(now, timeout, message=f"{mount}: the pending change applied")


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
