"""Engine scheduling and joins, and station buffering, with a fake generator (fast, exact)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from radio.config import EngineConfig, PlaylistItem
from radio.engine import Engine
from radio.station.playlist import Playlist
from radio.station.station import Station
from radio.tools.testing import SineModel

from .conftest import drain, station_config


def make(model: SineModel, cfg: EngineConfig, *mounts: str, **kw) -> tuple[Engine, list[Station]]:
    engine = Engine(model, cfg)
    stations = []
    for m in mounts:
        st = Station(station_config(m, **kw), model.sample_rate, model.frame_rate, model.num_codebooks, cfg)
        engine.add_station(st)
        stations.append(st)
    return engine, stations


def test_chunks_join_without_jumps_gaps_or_repeats() -> None:
    model = SineModel(freq=440.0, amplitude=0.5)
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=100, overlap_frames=5,
                       crossfade_ms=20)
    engine, (st,) = make(model, cfg, "/a.mp3")
    for _ in range(12):
        assert engine.run_once()
    out = drain(st)
    ideal = model.pcm_for_frames(0, len(out) // 640 + 1)[: len(out)]
    generated = sum(frames for _, frames in model.calls) * 640
    held = 20 * 32  # the last chunk's crossfade tail waits for the next chunk
    assert len(out) == generated - held - st.reserve_samples  # nothing repeated, nothing dropped

    # Sample-to-sample jumps: at the chunk boundaries no larger than inside a chunk.
    jumps = np.abs(np.diff(out))
    inside = np.abs(np.diff(ideal)).max()
    boundaries, pos = [], 0
    for _, frames in model.calls[:-1]:
        pos += frames * 640
        boundaries.append(pos - held)  # where the crossfade into the next chunk starts
    for b in boundaries:
        window = jumps[max(0, b - 3): b + held + 3]
        assert window.max() <= inside * 1.05, (b, window.max(), inside)
    # Outside crossfades the signal is the sine itself, in phase (a lost or doubled sample would shift it).
    # Two decodes of the same codes are fully correlated: the constant-power fade keeps their sum exact (no
    # +3 dB bump), so the joined signal IS the sine.
    np.testing.assert_allclose(out, ideal, atol=1e-4)


def test_all_stations_go_in_one_batch_and_continue_from_their_codes() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.4, first_chunk_seconds=0.1, buffer_seconds=100, overlap_frames=4)
    engine, stations = make(model, cfg, "/a.mp3", "/b.ogg", "/c.opus")
    for _ in range(4):
        engine.run_once()
    assert len(model.calls) == 4
    for requests, _frames in model.calls:
        assert len(requests) == 3  # one call serves every station
    # call n+1's context for a station ends with the codes call n produced for it
    for (prev, prev_frames), (nxt, _) in zip(model.calls, model.calls[1:]):
        for p, n in zip(prev, nxt):
            last = int(p.context[0, -1]) if p.context.shape[1] else -1
            expected = np.arange(last + 1, last + 1 + prev_frames)
            np.testing.assert_array_equal(n.context[0, -prev_frames:], expected)
    assert [r.prompt for r in model.calls[0][0]] == ["prompt one"] * 3


def test_a_new_station_takes_its_first_chunk_alone_then_joins_the_batch() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.4, first_chunk_seconds=0.1, buffer_seconds=100)
    engine, stations = make(model, cfg, "/a.mp3", "/b.mp3")
    for _ in range(3):
        engine.run_once()
    late = Station(station_config("/late.mp3"), model.sample_rate, model.frame_rate, model.num_codebooks, cfg)
    engine.add_station(late)
    engine.run_once()
    requests, frames = model.calls[-1]
    assert [r.key for r in requests] == [late.key] and frames == 5  # on air after one short chunk of its own
    engine.run_once()
    assert {r.key for r in model.calls[-1][0]} == {late.key} | {s.key for s in stations}


def test_stations_stay_in_one_batch_while_listeners_drain_them_unevenly() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=1.0, first_chunk_seconds=1.0, buffer_seconds=3.0)
    engine, stations = make(model, cfg, "/a.mp3", "/b.mp3", "/c.mp3")
    rng = np.random.default_rng(0)
    for _ in range(60):
        engine.run_once()
        for st in stations:  # each listener takes a slightly different amount each round
            st.read(int(rng.uniform(0.2, 0.5) * 32000))
    sizes = [len(reqs) for reqs, _ in model.calls]
    assert sizes.count(3) >= 0.9 * len(sizes), sizes
    for st in stations:  # bounded: never far beyond target + 2 chunks
        assert st.buffered_seconds <= cfg.buffer_seconds + 2 * cfg.chunk_seconds


def test_first_chunk_is_short_then_grows() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=4.0, first_chunk_seconds=0.5, buffer_seconds=100)
    engine, _ = make(model, cfg, "/a.mp3")
    for _ in range(5):
        engine.run_once()
    assert [frames for _, frames in model.calls] == [25, 50, 100, 200, 200]


def test_a_station_on_air_for_hours_keeps_its_chunk_size() -> None:
    """The first chunks double from first_chunk_seconds; after ~1,000 chunks (an hour on air) that doubling
    overflowed a float and every step failed."""
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=4.0, first_chunk_seconds=0.5, buffer_seconds=100)
    engine, (station,) = make(model, cfg, "/a.mp3")
    engine.run_once()
    station.ramp = 5000  # what a station counts after 5 1/2 hours on air
    assert engine.run_once()
    assert [frames for _, frames in model.calls] == [25, 200]


def test_hungriest_station_first_and_full_stations_wait() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=1.0, first_chunk_seconds=1.0, buffer_seconds=1.5, max_batch=1)
    engine, (a, b) = make(model, cfg, "/a.mp3", "/b.mp3")
    engine.run_once()
    engine.run_once()
    assert a.buffered_seconds > 0 and b.buffered_seconds > 0
    a.read(int(0.5 * 32000))  # a listener drains a: now it is the hungriest
    engine.run_once()
    assert model.calls[-1][0][0].prompt == "prompt one"
    assert model.calls[-1][0][0].context[0, -1] == a.codes[0, -51]  # it was a's context
    while engine.run_once():
        pass
    assert not engine.pick_batch()  # everyone at target: the engine idles


def test_items_advance_by_duration_and_keep_the_context() -> None:
    model = SineModel()
    items = (PlaylistItem("first", "p1", 1.0), PlaylistItem("second", "p2", 1.0))
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100)
    engine, (st,) = make(model, cfg, "/a.mp3", items=items)
    for _ in range(5):
        engine.run_once()
    prompts = [c[0][0].prompt for c in model.calls]
    assert prompts == ["p1", "p1", "p2", "p2", "p1"]
    # the first chunk of the new item continues the old item's codes: a segue, not a restart
    assert model.calls[2][0][0].context.shape[1] == 50
    n = int(round(st.buffered_seconds * 32000)) - st.reserve_samples
    pcm, titles = st.read(n)
    assert titles == ["first", "second", "first"]


def test_shuffle_never_repeats_an_item() -> None:
    items = tuple(PlaylistItem(str(i), f"p{i}", 1.0) for i in range(3))
    pl = Playlist(items, "shuffle", random.Random(5))
    seen = [pl.index]
    for _ in range(300):
        pl.advance()
        seen.append(pl.index)
    assert all(a != b for a, b in zip(seen, seen[1:]))
    assert set(seen) == {0, 1, 2}


def test_underrun_fills_with_recent_audio_and_counts_the_deficit() -> None:
    model = SineModel(freq=220.0)
    cfg = EngineConfig(chunk_seconds=1.0, first_chunk_seconds=1.0, buffer_seconds=100, filler_seconds=0.5)
    engine, (st,) = make(model, cfg, "/a.mp3")
    engine.run_once()
    have = int(round(st.buffered_seconds * 32000))
    pcm, _ = st.read(have + 32000)  # one second more than exists
    assert len(pcm) == have + 32000
    tail = pcm[have:]
    assert np.sqrt(np.mean(tail ** 2)) > 0.2  # not silence: the recent past, looped
    assert np.abs(np.diff(pcm)).max() < 0.1  # entered with a crossfade, no click
    assert st.status()["filled_seconds"] == pytest.approx(1.0, abs=0.01)
    assert st.underruns == 1 and st.status()["filling"]
    engine.run_once()  # fresh audio arrives: crossfade back out of the filler
    more, _ = st.read(16000)
    assert np.abs(np.diff(np.concatenate([pcm[-1:], more]))).max() < 0.1
    assert not st.status()["filling"]


def test_blend_transition_moves_from_old_prompt_to_new_monotonically() -> None:
    model = SineModel()
    items = (PlaylistItem("first", "old prompt", 1.0), PlaylistItem("second", "new prompt", 6.0, blend=3.0))
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100)
    engine, _ = make(model, cfg, "/a.mp3", items=items)
    for _ in range(14):
        engine.run_once()
    reqs = [c[0][0] for c in model.calls]
    assert [r.prompt for r in reqs[:2]] == ["old prompt"] * 2 and reqs[0].blend_from is None
    blending = [r for r in reqs[2:] if r.blend_from is not None]
    assert all(r.blend_from == "old prompt" and r.prompt == "new prompt" for r in blending)
    weights = [r.blend for r in blending]
    assert len(weights) == 6 and weights[0] > 0  # 3 s of blend in 0.5 s chunks
    assert all(a < b for a, b in zip(weights, weights[1:])) and weights[-1] < 1.0
    after = reqs[2 + len(blending)]
    assert after.prompt == "new prompt" and after.blend_from is None and after.blend == 1.0


def test_silence_watchdog_skips_silent_audio_and_starts_a_fresh_context() -> None:
    model = SineModel(amplitude=0.0)  # a generator that has faded into silence
    cfg = EngineConfig(chunk_seconds=1.0, first_chunk_seconds=1.0, buffer_seconds=100, silence_seconds=3.0)
    engine, (st,) = make(model, cfg, "/a.mp3")
    for _ in range(3):
        engine.run_once()
    assert st.silence_skips == 1
    assert st.codes.shape[1] == 0  # the next chunk starts from a fresh context
    assert st.buffered_seconds < 0.1  # the queued silence was dropped
    engine.run_once()
    assert model.calls[-1][0][0].context.shape[1] == 0
    model.amplitude = 0.5  # audible again: the counter stays at rest
    for _ in range(5):
        engine.run_once()
    assert st.silence_skips == 1


def test_edited_playlist_waits_for_the_current_item_or_applies_now() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100)
    items = (PlaylistItem("one", "p1", 1.0), PlaylistItem("two", "p2", 1.0))
    engine, (st,) = make(model, cfg, "/a.mp3", items=items)
    engine.run_once()
    new_items = (PlaylistItem("three", "p3", 1.0), PlaylistItem("four", "p4", 1.0))
    st.apply_config(station_config("/a.mp3", items=new_items))  # apply: next (default)
    assert st.prompt == "p1" and st.status()["next"] == "three"
    for _ in range(2):
        engine.run_once()
    assert st.prompt == "p3"
    st.apply_config(station_config("/a.mp3", items=items, apply="now"))
    assert st.prompt == "p1"
    engine.run_once()
    assert model.calls[-1][0][0].prompt == "p1"


@pytest.mark.e2e  # reads the ident files through pydub, which runs ffmpeg
def test_idents_play_between_items_crossfaded_in_and_out(tmp_path) -> None:
    import subprocess

    from radio.station.idents import load_ident

    wav = tmp_path / "id.wav"  # a 0.5 s, 1 kHz station ID at 44.1 kHz stereo: pydub must convert it
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=1000:duration=0.5:sample_rate=44100", "-ac", "2", "-y", str(wav)], check=True)
    ident = load_ident(str(wav), 32000)
    assert abs(len(ident) - 16000) <= 2 and abs(20 * np.log10(np.sqrt(np.mean(ident ** 2))) + 20) < 0.5

    model = SineModel(freq=220.0, amplitude=0.3)
    items = (PlaylistItem("one", "p1", 1.0), PlaylistItem("two", "p2", 1.0))
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100)
    engine = Engine(model, cfg)
    st = Station(station_config("/a.mp3", items=items, ident_every=1), 32000, 50, 4, cfg, idents=[ident])
    engine.add_station(st)
    for _ in range(5):
        engine.run_once()
    n = int(round(st.buffered_seconds * 32000)) - st.reserve_samples
    pcm, titles = st.read(n)
    assert titles == ["one", "two", "one"]
    generated = sum(frames for _, frames in model.calls) * 640
    xf = held = int(cfg.crossfade_ms * 32)  # the join crossfade; also the engine's held tail
    # two item changes, two idents, each overlapping its neighbours by one crossfade on either side
    assert len(pcm) + st.reserve_samples + held == generated + 2 * (len(ident) - 2 * xf)
    # the ident (1 kHz) sits right before item two's audio
    spectrum_at = lambda a, f: abs(np.fft.rfft(a)[int(f * len(a) / 32000)])  # noqa: E731
    middle = pcm[32000 + 4000: 32000 + 12000]
    assert spectrum_at(middle, 1000) > 10 * spectrum_at(middle, 220)
    assert np.abs(np.diff(pcm)).max() < 0.1  # crossfaded: no click at either side


class _TwoSlots(SineModel):
    """A model with room for two stations, refusing the rest as the static decoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[str] = set()

    def continue_batch(self, requests, frames):
        from radio.errors import SlotsFull

        new = [r.key for r in requests if r.key not in self.held]
        room = 2 - len(self.held)
        if len(new) > room:
            raise SlotsFull(new[max(0, room):], 2)
        self.held.update(new)
        return super().continue_batch(requests, frames)

    def forget(self, key: str) -> None:
        self.held.discard(key)


def test_stations_beyond_the_models_slots_wait_and_the_others_play() -> None:
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=1.0)
    engine = Engine(_TwoSlots(), cfg)
    stations = [Station(station_config(f"/s{i}.mp3"), 32000, 50, 4, cfg) for i in range(3)]
    engine.retry_seconds = 0.3
    for st in stations:
        engine.add_station(st)
    for _ in range(6):
        engine.run_once()
    playing = [st for st in stations if st.generated_samples > 0]
    waiting = [st for st in stations if st.generated_samples == 0]
    assert len(playing) == 2 and len(waiting) == 1
    assert waiting[0].error and "waiting for a decode slot" in waiting[0].error
    assert all(st.error is None for st in playing)
    engine.remove_station(playing[0].key)  # a slot frees up: the waiting station gets it and recovers
    assert not engine.pick_batch() or waiting[0] not in engine.pick_batch()  # it waits a while before a retry
    import time

    time.sleep(0.4)
    for _ in range(6):
        engine.run_once()
    assert waiting[0].generated_samples > 0 and waiting[0].error is None


def test_changes_from_other_threads_are_applied_by_the_engine_at_a_chunk_boundary() -> None:
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=1.0)
    engine = Engine(SineModel(), cfg)
    st = Station(station_config("/c.mp3"), 32000, 50, 4, cfg)
    engine.add_station(st)
    engine.run_once()
    before = st.playlist.current.title
    command = engine.post(st.key, "skip", lambda s: s.skip())
    assert st.playlist.current.title == before and engine.pending(st.key) == ["skip"]  # not yet
    engine.run_once()
    assert command.done.is_set() and command.error is None
    assert st.playlist.current.title != before and engine.pending(st.key) == []
    orphan = engine.post("no-such-station", "skip", lambda s: s.skip())
    engine.apply_commands()
    assert isinstance(orphan.error, KeyError)
    late = engine.post(st.key, "skip", lambda s: s.skip())
    engine.stop(timeout=0.1)
    assert late.done.is_set() and late.error is not None  # a waiter is never left hanging


# -- the audience: generate for listeners ------------------------------------------------------------------------
class ForgettingSine(SineModel):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[str] = []

    def forget(self, key: str) -> None:
        self.forgotten.append(key)


def keys_per_call(model: SineModel) -> list[list[str]]:
    return [[r.key for r in requests] for requests, _ in model.calls]


def test_only_listened_stations_are_generated_and_an_idle_one_resumes_with_a_short_chunk() -> None:
    model = ForgettingSine()
    cfg = EngineConfig(chunk_seconds=1.0, first_chunk_seconds=0.1, buffer_seconds=100, linger=0.0)
    engine, (a, b, c) = make(model, cfg, "/a.mp3", "/b.mp3", "/c.mp3")
    engine.set_listeners({"/a.mp3": 1})
    engine.run_once()  # every station's first chunk: each has audio to loop while nobody listens
    assert sorted(keys_per_call(model)[0]) == sorted([a.key, b.key, c.key])
    engine.update_audience()
    assert (a.idle, b.idle, c.idle) == (False, True, True)
    assert sorted(model.forgotten) == sorted([b.key, c.key])  # an idle station holds no decode state
    model.calls.clear()
    for _ in range(4):
        engine.run_once()
    assert keys_per_call(model) == [[a.key]] * 4  # the batch holds only the station someone listens to
    assert engine.status()["stations_generating"] == 1 and engine.status()["stations_idle"] == 2
    # A listener tunes in to c: it wakes, and takes a short first chunk on its own rows.
    engine.set_listeners({"/a.mp3": 1, "/c.mp3": 2})
    model.calls.clear()
    engine.run_once()
    assert not c.idle and keys_per_call(model) == [[c.key]] and model.calls[0][1] == 5
    assert engine.listeners("/c.mp3") == 2 and engine.listeners("/b.mp3") == 0


def test_the_linger_keeps_a_station_generating_after_its_last_listener_leaves() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=100, linger=3600.0)
    engine, (a,) = make(model, cfg, "/a.mp3")
    engine.set_listeners({"/a.mp3": 1})
    engine.run_once()
    # A mount that flaps between 0 and 1 listeners: it stays on, and says nothing.
    for i in range(50):
        engine.set_listeners({"/a.mp3": i % 2})
        engine.update_audience()
    assert not a.idle and engine.idle_changes == 0
    engine._records[a.key].heard -= 3601.0  # the linger has run out since the last listener left
    engine.set_listeners({})
    engine.update_audience()
    assert a.idle and engine.idle_changes == 1
    calls = len(model.calls)
    assert not engine.run_once() and len(model.calls) == calls


@pytest.mark.parametrize("how", ["generate-always", "station-always", "counts-unknown"])
def test_always_and_unknown_counts_generate_every_station(how: str) -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=100, linger=0.0,
                       generate="always" if how == "generate-always" else "listened")
    engine, stations = make(model, cfg, "/a.mp3", "/b.mp3", always=how == "station-always")
    engine.set_listeners(None if how == "counts-unknown" else {})
    for _ in range(3):
        engine.run_once()
    assert not any(s.idle for s in stations)
    assert all(sorted(k) == sorted(s.key for s in stations) for k in keys_per_call(model)[1:])


def test_counts_that_become_unreadable_wake_every_station() -> None:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=100, linger=0.0)
    engine, stations = make(model, cfg, "/a.mp3", "/b.mp3")
    engine.set_listeners({})
    engine.run_once()
    engine.update_audience()
    assert all(s.idle for s in stations)
    engine.set_listeners(None)  # Icecast went away: fail open
    engine.update_audience()
    assert not any(s.idle for s in stations)


def test_an_idle_loop_is_the_stations_own_audio() -> None:
    model = SineModel(freq=440.0, amplitude=0.5)
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100, crossfade_ms=20,
                       filler_seconds=1.0)
    engine, (st,) = make(model, cfg, "/a.mp3")
    engine.run_once()
    loop = st.idle_loop()  # nothing played yet: the start of the queue, which stays queued
    assert len(loop) > 0.3 * 32000 and np.sqrt(np.mean(loop ** 2)) > 0.3
    queued = st.buffered_seconds
    assert st.idle_loop().shape == loop.shape and st.buffered_seconds == queued
    for _ in range(6):
        engine.run_once()
    drain(st)
    loop = st.idle_loop()  # what was played last, about filler_seconds of it
    assert abs(len(loop) - (32000 - st.reserve_samples)) <= 1
    spectrum = np.abs(np.fft.rfft(loop))
    assert abs(np.argmax(spectrum) * 32000 / len(loop) - 440.0) < 5
