"""The idle loop: a station's own audio, encoded once, sent in whole units in real time (real ffmpeg)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from radio.output.encoder import IdleLoop, encode_loop, mp3_frames, ogg_crc, ogg_pages, reserial

RATE = 32000


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes) -> np.ndarray:
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-f", "s16le", "-ac", "1",
                           "-ar", "16000", "pipe:1"], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return np.frombuffer(proc.stdout, "<i2").astype(np.float32) / 32768


@pytest.mark.parametrize("fmt", ["mp3", "vorbis", "opus"])
def test_a_loop_is_one_cycle_in_whole_units_and_repeats_decodably(fmt: str) -> None:
    data = encode_loop(tone(2.0), fmt, 96, RATE, title="Idle title", station="S", loudness=-16.0)
    units = ogg_pages(data) if fmt != "mp3" else mp3_frames(data)
    assert b"".join(units) == data  # nothing but whole units
    once = decode(data)
    assert abs(len(once) / 16000 - 2.0) < 0.1  # the middle cycle of three, not all of them
    assert np.sqrt(np.mean(once[1600:-1600] ** 2)) > 0.05  # loudness-normalised tone, not silence
    loop = IdleLoop(data, fmt, 2.0, lead=100.0)  # a lead this long sends without waiting
    sent = b"".join(loop.read(1 << 20) for _ in range(3))
    assert len(sent) >= 3 * len(data) * 0.99
    twice = decode(sent)  # repetitions follow each other (Ogg: links of a chain) and decode as one stream
    assert len(twice) / 16000 > 5.5
    if fmt != "mp3":
        pages = ogg_pages(sent)
        assert len({p[14:18] for p in pages}) == 2  # two serial numbers, alternating
        assert all(int.from_bytes(p[22:26], "little") == ogg_crc(p) for p in pages)


def test_reserial_keeps_the_checksums_right() -> None:
    pages = ogg_pages(encode_loop(tone(1.0), "opus", 64, RATE))
    assert all(int.from_bytes(p[22:26], "little") == ogg_crc(p) for p in pages)  # ffmpeg's own checksums
    moved = reserial(pages, 12345)
    assert all(int.from_bytes(p[14:18], "little") == 12345 for p in moved)
    assert all(int.from_bytes(p[22:26], "little") == ogg_crc(p) for p in moved)
    assert decode(b"".join(moved)).size > 0.9 * 16000


def test_a_loop_is_paced_and_stops_at_a_unit_boundary() -> None:
    data = encode_loop(tone(2.0), "mp3", 128, RATE)
    frames = mp3_frames(data)
    loop = IdleLoop(data, "mp3", 2.0, lead=0.5)
    first = loop.read(1 << 20)
    # no more than the lead (plus one frame) ahead of real time, however much is asked for
    assert 0 < len(first) <= (0.5 + 0.04) / 2.0 * len(data) + len(frames[0])
    assert first == b"".join(frames[:len(mp3_frames(first))])
    loop.finish()
    assert loop.read(1 << 20) == b""
