"""End to end with real parts: tiny MusicGen checkpoint, real ffmpeg encoders, libshout, icecast2, listeners."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from radio.config import DaemonConfig, EngineConfig, IcecastConfig, load_stations
from radio.daemon import Daemon
from radio.musicgen.model import MusicgenModel

from .conftest import fetch_bytes, listen, mount_info, probe, run_daemon, wait_for, write_station

pytestmark = pytest.mark.e2e

TITLES = {
    "/e2e.mp3": ("Rainy piano", "Café ☕ keys"),
    "/e2e.ogg": ("Nebula drift", "Orbit"),
    "/e2e.opus": ("Brushes", "Sax ballad"),
}
FORMATS = {"/e2e.mp3": "mp3", "/e2e.ogg": "vorbis", "/e2e.opus": "opus"}
EXPECTED_CODEC = {"/e2e.mp3": ("mp3", "32000"), "/e2e.ogg": ("vorbis", "32000"), "/e2e.opus": ("opus", "48000")}


class RecordingModel:
    """Wraps the real model and records every batched call (what went in, what came out)."""

    def __init__(self, inner: MusicgenModel) -> None:
        self.inner = inner
        self.calls: list[tuple[list[tuple[str, np.ndarray]], list[np.ndarray]]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def continue_batch(self, requests, frames):
        results = self.inner.continue_batch(requests, frames)
        self.calls.append(([(r.prompt, r.context.copy()) for r in requests], [r.codes for r in results]))
        return results


def write_e2e_stations(directory: Path) -> None:
    for mount, (a, b) in TITLES.items():
        stem = mount.strip("/").replace(".", "_")
        write_station(directory, f"{stem}.yaml", f"""
            name: Station {stem}
            mount: {mount}
            format: {FORMATS[mount]}
            bitrate: 96
            description: end-to-end test station {stem}
            genre: test
            generation: {{temperature: 1.0, top_k: 50, guidance: 3.0}}
            playlist:
              - title: "{a}"
                prompt: {stem} first prompt
                duration: 5s
              - title: "{b}"
                prompt: {stem} second prompt
                duration: 5s
        """)


@pytest.fixture
def running(icecast, tiny_model_dir: Path, tmp_path: Path):
    write_e2e_stations(tmp_path / "stations")
    stations, problems = load_stations([tmp_path / "stations"])
    assert not problems and len(stations) == 3
    cfg = DaemonConfig(
        stations_dir=str(tmp_path / "stations"), model=str(tiny_model_dir), device="cpu", dtype="float32", seed=3,
        icecast=IcecastConfig(host=icecast.host, port=icecast.port, password=icecast.source_password),
        engine=EngineConfig(chunk_seconds=2.0, first_chunk_seconds=0.5, buffer_seconds=5.0, generate="always"),
    )
    holder: dict[str, RecordingModel] = {}

    def factory(c: DaemonConfig) -> RecordingModel:
        holder["model"] = RecordingModel(MusicgenModel(c.model, device=c.device, dtype=c.dtype, seed=c.seed))
        return holder["model"]

    daemon = Daemon(cfg, stations, model_factory=factory)
    started = time.monotonic()
    daemon.start()
    try:
        yield daemon, holder["model"], icecast, started
    finally:
        daemon.stop()


def test_three_stations_in_one_batch_reach_listeners(running) -> None:
    daemon, model, icecast, started = running
    wait_for(lambda: all(mount_info(icecast, m) for m in TITLES), 20, message="all three mounts on air")

    # Listeners on every mount at once: ffprobe for codec/rate, ffmpeg decoding 10 s each.
    decoded: dict[str, np.ndarray] = {}
    probes: dict[str, dict] = {}

    def tune_in(mount: str) -> None:
        url = f"{icecast.url}{mount}"
        probes[mount] = probe(url)
        decoded[mount] = listen(url, 10.0)

    threads = [threading.Thread(target=tune_in, args=(m,)) for m in TITLES]
    for t in threads:
        t.start()
    opus_bytes = fetch_bytes(f"{icecast.url}/e2e.opus", 13.0)  # meanwhile: the Opus stream as a player gets it
    for t in threads:
        t.join(60)

    for mount, (codec, rate) in EXPECTED_CODEC.items():
        stream = probes[mount]["streams"][0]
        assert (stream["codec_name"], stream["sample_rate"]) == (codec, rate), (mount, probes[mount])
        audio = decoded[mount]
        assert len(audio) >= 10.0 * 16000 * 0.99, (mount, len(audio))
        rms = float(np.sqrt(np.mean(audio ** 2)))
        assert rms > 0.005, f"{mount} is silent (rms {rms})"
        assert np.mean(np.abs(audio) < 1e-4) < 0.2, f"{mount} has long stretches of silence"

    # Now playing: Icecast shows the current item for MP3 and Vorbis, and it moves on with 5 s items.
    for mount in ("/e2e.mp3", "/e2e.ogg"):
        a, b = TITLES[mount]
        seen = {wait_for(lambda: mount_info(icecast, mount).get("title"), 10, message=f"{mount} title")}
        wait_for(lambda: seen.add(mount_info(icecast, mount).get("title")) or {a, b} <= seen, 25, 0.25,
                 message=f"{mount} title to change between {a!r} and {b!r}")
    # Opus: titles travel in-stream, as a new chained Ogg stream with its own comment header per item.
    text = opus_bytes.decode("latin-1")
    in_stream = set(re.findall(r"(?i)title=([^\x00-\x1f]+?)(?=[\x00-\x1f]|$)", text))
    in_stream = {t.encode("latin-1").decode("utf-8", "replace") for t in in_stream}
    assert set(TITLES["/e2e.opus"]) <= {t[: len(x)] for t in in_stream for x in TITLES["/e2e.opus"]}, in_stream

    # The engine batched all three stations into single model calls and continued each from its codes.
    assert model.calls, "the model was never called"
    full = [c for c in model.calls if len(c[0]) == 3]
    assert len(full) >= len(model.calls) * 0.8, [len(c[0]) for c in model.calls]
    continued = 0
    for (reqs, codes), (next_reqs, _) in zip(model.calls, model.calls[1:]):
        by_station = {p.split(" ")[0]: (ctx, out) for (p, ctx), out in zip(reqs, codes)}
        for prompt, ctx_next in next_reqs:
            key = prompt.split(" ")[0]
            if key in by_station:
                _, produced = by_station[key]
                np.testing.assert_array_equal(ctx_next[:, -produced.shape[1]:], produced)
                continued += 1
    assert continued >= 6


def test_clean_stop_closes_every_encoder_and_connection(running) -> None:
    daemon, _model, icecast, _started = running
    wait_for(lambda: all(mount_info(icecast, m) for m in TITLES), 20, message="all mounts on air")
    pids = [m.encoder.pid for m in daemon.mounts.values()]
    assert all(pids)
    daemon.stop()
    for pid in pids:
        assert not _alive(pid), f"ffmpeg {pid} still running"
    wait_for(lambda: not any(mount_info(icecast, m) for m in TITLES), 5, message="sources to leave Icecast")


def test_wrong_password_is_one_clear_line_per_mount(icecast, tiny_model_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    write_e2e_stations(tmp_path / "stations")
    stations, _ = load_stations([tmp_path / "stations"])
    cfg = DaemonConfig(model=str(tiny_model_dir), device="cpu", dtype="float32",
                       icecast=IcecastConfig(host=icecast.host, port=icecast.port, password="not-the-Pa55word"),
                       engine=EngineConfig(first_chunk_seconds=0.5, buffer_seconds=3.0, generate="always"))
    daemon = Daemon(cfg, stations)
    caplog.set_level("INFO")
    daemon.start()
    try:
        wait_for(lambda: sum("refused" in r.getMessage() for r in caplog.records) >= 3, 20,
                 message="refusal lines")
        time.sleep(2.5)  # several retries later...
    finally:
        daemon.stop()
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert sorted(m for m in TITLES if any(m in line for line in refusals)) == sorted(TITLES)
    assert len(refusals) == 3, refusals  # one line per mount, not one per retry
    assert "not-the-Pa55word" not in caplog.text  # the password itself never reaches the log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_radio_run_cli_with_local_icecast_skips_bad_station_and_stops_on_sigterm(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "good.yaml", """
        name: Good
        mount: /good.mp3
        playlist:
          - {title: Only, prompt: calm piano, duration: 30s}
    """)
    write_station(st, "broken.yaml", """
        name: Broken
        mount: /broken.mp3
        playlist:
          - {title: x, prompt: "", duration: 30s}
    """)
    from radio.output.local import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RADIO_SOURCE_PASSWORD"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "radio.cli", "run", "--stations", str(st), "--model", str(tiny_model_dir),
         "--device", "cpu", "--local-icecast", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{port}/good.mp3"
        audio = wait_for(lambda: _try_listen(url), 40, 1.0, message="audio from the CLI's local Icecast")
        assert np.sqrt(np.mean(audio ** 2)) > 0.005
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = out.decode("utf-8", "replace")
    assert proc.returncode == 0, log
    assert f"{st / 'broken.yaml'}:4: playlist[0].prompt: must not be empty" in log
    assert f"listen: http://127.0.0.1:{port}/good.mp3" in log
    assert "stopped" in log


def _try_listen(url: str) -> np.ndarray | None:
    try:
        return listen(url, 2.0, timeout=15)
    except AssertionError:
        return None


def test_radio_run_exits_2_on_bad_configuration(tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "broken.yaml", "name: x\nmount: nope\nplaylist: []\n")
    proc = subprocess.run([sys.executable, "-m", "radio.cli", "run", "--stations", str(st), "--local-icecast"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"{st / 'broken.yaml'}:2: mount:" in err and "no valid station" in err


def test_the_static_decode_path_end_to_end(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The GPU's slot path, run eagerly on CPU, behind the real engine, encoders and Icecast: every mount
    decodes, and the stations hold slots while they play."""
    st = tmp_path / "stations"
    # s2's prompt is longer than the 32 text tokens a slot holds at first: the slots grow while s1 plays
    long = ", ".join(["slow evolving ambient pads with distant bells and soft rain on a tin roof"] * 4)
    for name, mount, fmt, prompt in (("s1", "/s1.mp3", "mp3", "calm piano"), ("s2", "/s2.ogg", "vorbis", long)):
        write_station(st, f"{name}.yaml", f"""
            name: {name}
            mount: {mount}
            format: {fmt}
            playlist:
              - {{title: Slot {name}, prompt: "{prompt}", duration: 10m}}
        """)
    daemon = run_daemon(icecast, tiny_model_dir, st, decoder="static")
    try:
        model = next(iter(daemon.engine.models.values()))
        assert model.decoder == "static"
        for mount in ("/s1.mp3", "/s2.ogg"):
            audio = wait_for(lambda m=mount: _try_listen(f"{icecast.url}{m}"), 40, 1.0, message=f"audio on {mount}")
            assert np.sqrt(np.mean(audio ** 2)) > 0.005, mount
        assert sorted(k for k in model.slots.keys if k is not None) == sorted(daemon.stations)
        assert model.slots.text_tokens > 32
    finally:
        daemon.stop()
