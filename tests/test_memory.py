"""Weeks on air: what the daemon holds stays bounded however long it runs (engine, one real mount, a fake
model that makes audio instantly, a title change every second)."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
import weakref
from collections import Counter
from pathlib import Path

import pytest

from radio.config import EngineConfig, PlaylistItem
from radio.engine import Engine
from radio.output.mount import Mount
from radio.station.station import Station
from radio.tools.testing import SineModel

from .conftest import mount_info, run_daemon, station_config, wait_for, write_station
from .test_resilience import station_text

pytestmark = pytest.mark.e2e


class ForgetfulSine(SineModel):
    """The shared fake keeps every call for inspection; a long run must not."""

    def continue_batch(self, requests, frames):
        results = super().continue_batch(requests, frames)
        self.calls.clear()
        return results


def radio_objects() -> Counter[str]:
    gc.collect()
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
             if isinstance(type(o).__dict__.get("__module__", type(o).__module__), str))
    return Counter(n for n in names if n.startswith("radio."))


def test_objects_threads_and_processes_stay_bounded_over_hundreds_of_chunks(icecast, tmp_path: Path) -> None:
    cfg = EngineConfig(chunk_seconds=0.05, first_chunk_seconds=0.05, buffer_seconds=0.4, overlap_frames=2,
                       crossfade_ms=10)
    items = tuple(PlaylistItem(f"Title {i}", f"prompt {i}", 1.0) for i in range(3))
    station = Station(station_config("/mem.mp3", items), 32000, 50, 4, cfg)
    engine = Engine(ForgetfulSine(), cfg)
    engine.add_station(station)
    from radio.config import IcecastConfig

    mount = Mount(station, IcecastConfig(host=icecast.host, port=icecast.port, password=icecast.source_password))
    engine.start()
    mount.start()
    try:
        wait_for(lambda: mount_info(icecast, "/mem.mp3"), 20, message="on air")
        wait_for(lambda: station.chunks >= 100, 30, message="100 chunks")
        time.sleep(1.0)
        before, threads_before = radio_objects(), threading.active_count()
        chunks_before = station.chunks
        wait_for(lambda: station.chunks >= chunks_before + 300, 60, message="300 more chunks")
        time.sleep(1.0)
        after, threads_after = radio_objects(), threading.active_count()
        # The PCM queue's segments come and go with how full the buffer is at the moment (a loaded machine
        # reads it half full, then full): bounded by the buffer, not by what came before. The bound: the buffer's
        # chunks (8 here), one more chunk (a station below buffer + chunk rides along in a step), the one being
        # played, and the remainder a filler exit puts back at the front. Everything else must not grow at all.
        segments = "radio.station.station._Segment"
        assert after.get(segments, 0) <= cfg.buffer_seconds / cfg.chunk_seconds + 3, after.get(segments)
        grown = {k: (before.get(k, 0), n) for k, n in after.items()
                 if n > before.get(k, 0) + 2 and k != segments}
        assert not grown, grown
        assert threads_after <= threads_before + 2, (threads_before, threads_after)
        assert mount.encoder.processes <= 2  # finished ffmpeg processes are not kept
        assert station.items_started >= 5  # titles kept changing all along
    finally:
        mount.stop()
        engine.stop()


def test_sending_to_icecast_keeps_no_allocation(icecast) -> None:
    """python-shout 0.2.8 leaks a str on every method lookup of a connection (15-20 MB an hour for four mounts,
    what `radio soak` measured): the send loop looks its methods up once per connection. Nothing allocated
    from the output layer may stay while a mount streams."""
    cfg = EngineConfig(chunk_seconds=0.2, first_chunk_seconds=0.1, buffer_seconds=1.0, overlap_frames=2)
    station = Station(station_config("/leak.mp3", (PlaylistItem("One", "prompt", 600.0),)), 32000, 50, 4, cfg)
    engine = Engine(ForgetfulSine(), cfg)
    engine.add_station(station)
    from radio.config import IcecastConfig

    mount = Mount(station, IcecastConfig(host=icecast.host, port=icecast.port, password=icecast.source_password))
    engine.start()
    mount.start()
    tracemalloc.start()
    try:
        wait_for(lambda: mount_info(icecast, "/leak.mp3"), 20, message="on air")
        time.sleep(2.0)
        before, sent = tracemalloc.take_snapshot(), mount.status()["bytes_sent"]
        time.sleep(8.0)
        after = tracemalloc.take_snapshot()
        assert mount.status()["bytes_sent"] > sent + 50_000  # it streamed all along (~16 KB/s)
        kept = [d for d in after.compare_to(before, "lineno")
                if "radio/output/" in d.traceback[0].filename and d.count_diff > 0]
        assert sum(d.count_diff for d in kept) < 20, kept
    finally:
        tracemalloc.stop()
        mount.stop()
        engine.stop()


def test_a_station_that_leaves_leaves_nothing_behind(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A station file created and deleted, three times, beside one that stays (what `radio soak --churn` does
    every minute): each time the station, its mount, its encoder and the model's rows for it all go, and the
    daemon holds as many of its own objects as before."""
    st = tmp_path / "stations"
    write_station(st, "stay.yaml", station_text("Stay", "/stay.mp3", "mp3", "Stay", "calm piano"))
    daemon = run_daemon(icecast, tiny_model_dir, st)
    try:
        wait_for(lambda: mount_info(icecast, "/stay.mp3"), 20, message="on air")
        left: list[tuple[weakref.ref, weakref.ref]] = []
        counts = []
        for i in range(3):
            path = write_station(st, "churn.yaml", station_text("Churn", "/churn.ogg", "vorbis", f"Churn {i}",
                                                                  f"churn prompt {i}"))
            daemon.reload()
            key = str(path)
            wait_for(lambda: mount_info(icecast, "/churn.ogg"), 20, message="churn station on air")
            wait_for(lambda: daemon.stations[key].chunks >= 2, 30, message="churn station generating")
            left.append((weakref.ref(daemon.stations[key]), weakref.ref(daemon.mounts[key])))
            path.unlink()
            daemon.reload()
            wait_for(lambda: not mount_info(icecast, "/churn.ogg"), 10, message="churn station gone")
            stay = daemon.stations[str(st / "stay.yaml")]
            done = stay.chunks
            wait_for(lambda: stay.chunks >= done + 2, 30, message="the engine moved on")  # the forget is applied
            counts.append(radio_objects())
        gc.collect()
        assert [(s() is None, m() is None) for s, m in left] == [(True, True)] * 3
        (model,) = daemon.pool.models().values()
        state = model.dynamic_state
        assert key not in state.parked and all(row.key != key for row in state.rows)
        grown = {k: (counts[0].get(k, 0), n) for k, n in counts[-1].items() if n > counts[0].get(k, 0) + 2}
        assert not grown, grown
    finally:
        daemon.stop()
