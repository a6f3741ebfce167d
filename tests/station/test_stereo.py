"""Stereo through the engine and a station (the fake sine model): joins, filler, idle loop, idents, encoding."""

from __future__ import annotations

import subprocess

import numpy as np

from radio.config import EngineConfig
from radio.engine import Engine, fit_channels
from radio.output.encoder import encode_loop
from radio.station.dsp import equal_power_crossfade
from radio.station.station import Station
from radio.tools.testing import SineModel

from ..conftest import drain, station_config


def _stereo_station(model: SineModel, cfg: EngineConfig) -> tuple[Engine, Station]:
    engine = Engine(model, cfg)
    st = Station(station_config("/wide.ogg"), model.sample_rate, model.frame_rate, model.num_codebooks, cfg,
                 channels=2)
    engine.add_station(st)
    return engine, st


def test_stereo_chunks_join_exactly_in_both_channels() -> None:
    model = SineModel(freq=440.0, amplitude=0.5, channels=2)
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=100, overlap_frames=5,
                       crossfade_ms=20)
    engine, st = _stereo_station(model, cfg)
    for _ in range(8):
        assert engine.run_once()
    out = drain(st)
    assert out.ndim == 2 and out.shape[1] == 2 and len(out) > 32000
    ideal = model.pcm_for_frames(0, len(out) // 640 + 1)[: len(out)]
    np.testing.assert_allclose(out, ideal, atol=1e-4)  # each channel its own sine, joined without a seam
    assert np.abs(out[:, 0] - out[:, 1]).max() > 0.1


def test_a_stereo_station_fills_and_loops_in_stereo() -> None:
    model = SineModel(channels=2)
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=1.0)
    engine, st = _stereo_station(model, cfg)
    before, _ = st.read(3200)  # nothing generated yet: stereo silence
    assert before.shape == (3200, 2) and not before.any()
    engine.run_once()
    engine.run_once()
    pcm, _ = st.read(int(st.buffered_seconds * 32000) + 16000)  # past the end: filler from its own audio
    assert pcm.shape[1] == 2 and st.filled_samples > 0
    loop = st.idle_loop()
    assert loop.ndim == 2 and loop.shape[1] == 2 and np.abs(loop).max() > 0.1


def test_a_live_swap_to_another_layout_keeps_the_stations_layout() -> None:
    stereo = SineModel(channels=2).pcm_for_frames(0, 2)
    mono = fit_channels(stereo, 1)
    assert mono.shape == (1280,) and np.allclose(mono, stereo.mean(axis=1))
    spread = fit_channels(mono, 2)
    assert spread.shape == (1280, 2) and np.array_equal(spread[:, 0], spread[:, 1])
    assert fit_channels(stereo, 2) is stereo


def test_crossfade_and_the_idle_loop_encoder_take_stereo() -> None:
    a, b = np.ones((100, 2), np.float32), np.zeros((100, 2), np.float32)
    mixed = equal_power_crossfade(a, b)
    assert mixed.shape == (100, 2) and mixed[0, 0] > 0.99 and mixed[-1, 1] < 0.01
    pcm = SineModel(channels=2).pcm_for_frames(0, 100)
    data = encode_loop(pcm, "vorbis", 96, 32000)
    proc = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=channels", "-of", "csv=p=0", "-"],
                          input=data, capture_output=True, timeout=30)
    assert proc.stdout.decode().strip() == "2", proc.stderr


def test_idents_load_in_the_stations_channels(tmp_path) -> None:
    import wave

    from radio.station.idents import load_ident

    path = tmp_path / "id.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 10) * 8000).astype("<i2").tobytes())
    mono, stereo = load_ident(str(path), 32000), load_ident(str(path), 32000, channels=2)
    assert mono.ndim == 1 and abs(len(mono) - 32000) <= 2 and stereo.shape == (len(mono), 2)
    np.testing.assert_allclose(stereo[:, 0], mono, atol=1e-3)
