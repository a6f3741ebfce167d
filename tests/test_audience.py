"""Generate for listeners, end to end: a real icecast2 counts the listeners, the tiny model generates only for
mounts someone hears, idle mounts stay on air with the station's own audio, and a listener who tunes in hears
the station carry on."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from radio.config import IcecastConfig
from radio.output.audience import Audience, parse_admin_stats, parse_status_json
from radio.errors import IcecastError

from .conftest import listen, mount_info, run_daemon, silent_run_seconds, wait_for, write_station

MOUNTS = {"/a.mp3": "mp3", "/b.ogg": "vorbis", "/c.opus": "opus"}


def three_stations(directory: Path) -> None:
    for mount, fmt in MOUNTS.items():
        name = mount.strip("/").split(".")[0]
        write_station(directory, f"{name}.yaml", f"""
            name: Station {name}
            mount: {mount}
            format: {fmt}
            playlist:
              - {{title: {name} one, prompt: {name} calm piano, duration: 10m}}
        """)


def by_mount(daemon):
    return {st.mount: st for st in daemon.stations.values()}


@pytest.mark.e2e
def test_only_listened_stations_generate_and_a_listener_hears_the_station_carry_on(icecast, tiny_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    three_stations(tmp_path / "st")
    daemon = run_daemon(icecast, tiny_model_dir, tmp_path / "st", generate="listened", linger=1.0)
    try:
        st = by_mount(daemon)
        # Nobody listens: each station makes its first short chunk (its mount goes on air), then idles.
        wait_for(lambda: all(mount_info(icecast, m) for m in MOUNTS), 30, message="every mount on air")
        wait_for(lambda: all(s.idle for s in st.values()), 30, message="every station idle")
        wait_for(lambda: all(m.encoder.processes == 0 for m in daemon.mounts.values()), 15,
                 message="no ffmpeg running for an idle mount")
        steps, chunks = daemon.engine.steps, {m: s.chunks for m, s in st.items()}
        time.sleep(3.0)
        assert daemon.engine.steps == steps and {m: s.chunks for m, s in st.items()} == chunks
        assert daemon.status()["engine"]["stations_generating"] == 0

        # A listener tunes in to /a.mp3 and decodes 20 s from the moment it connects.
        heard: dict[str, np.ndarray] = {}
        first = threading.Thread(target=lambda: heard.update(a=listen(f"{icecast.url}/a.mp3", 20.0)))
        first.start()
        wait_for(lambda: not st["/a.mp3"].idle, 15, 0.05, message="/a.mp3 generating again")
        wait_for(lambda: st["/a.mp3"].chunks > chunks["/a.mp3"], 15, message="a fresh chunk for /a.mp3")
        status = {s["mount"]: s for s in daemon.status()["stations"]}
        assert status["/a.mp3"]["listeners"] >= 1 and status["/a.mp3"]["idle"] is False
        assert status["/b.ogg"]["idle"] and status["/c.opus"]["idle"]
        # A second listener comes and goes: nothing changes for anyone.
        listen(f"{icecast.url}/a.mp3", 2.0)
        first.join(60)
        audio = heard["a"]
        assert len(audio) >= 20.0 * 16000 * 0.99
        assert silent_run_seconds(audio) <= 0.5, "continuous audio from the moment the listener connected"
        assert st["/b.ogg"].idle and st["/c.opus"].idle
        assert st["/b.ogg"].chunks == chunks["/b.ogg"] and st["/c.opus"].chunks == chunks["/c.opus"]
        assert daemon.mounts[st["/a.mp3"].key].idle_spells >= 1

        # The listener left: after the linger /a.mp3 idles again.
        wait_for(lambda: st["/a.mp3"].idle, 20, message="/a.mp3 idle after its listener left")

        # An idle Opus mount decodes from its first second (Icecast's burst is the loop, headers first).
        opus = listen(f"{icecast.url}/c.opus", 3.0)
        assert len(opus) >= 3.0 * 16000 * 0.97  # (a link of the chain may end within the 3 s)
        assert np.sqrt(np.mean(opus[:16000] ** 2)) > 0.005
    finally:
        daemon.stop()


@pytest.mark.e2e
def test_unreadable_counts_generate_every_station_with_one_warning(icecast, tiny_model_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    three_stations(tmp_path / "st")
    caplog.set_level(logging.WARNING, logger="radio.output.audience")
    from dataclasses import replace

    from radio.config import load_stations
    from radio.daemon import Daemon

    from .conftest import daemon_config

    cfg = daemon_config(icecast, tiny_model_dir, tmp_path / "st", generate="listened", linger=0.0)
    cfg = replace(cfg, icecast=replace(cfg.icecast, admin_password="wrong"))  # /admin/stats answers 401
    daemon = Daemon(cfg, load_stations([tmp_path / "st"])[0])
    daemon.start()
    try:
        st = by_mount(daemon)
        assert daemon.audience is not None
        wait_for(lambda: daemon.audience.failures >= 4, 30, message="several failed readings")
        wait_for(lambda: all(s.chunks >= 3 for s in st.values()), 60, message="every station generating")
        assert not any(s.idle for s in st.values())
        warnings = [r for r in caplog.records if "listener counts unavailable" in r.getMessage()]
        assert len(warnings) == 1 and "wrong icecast.admin_password" in warnings[0].getMessage()
        assert daemon.status()["engine"]["listeners_known"] is False
    finally:
        daemon.stop()


@pytest.mark.e2e
def test_admin_stats_and_status_json_count_the_same_listeners(icecast) -> None:
    import shout

    s = shout.Shout()
    s.host, s.port, s.user, s.password = icecast.host, icecast.port, "source", icecast.source_password
    s.mount = "/x.mp3"
    s.format, s.protocol = "mp3", "http"
    s.open()
    try:
        admin = Audience(IcecastConfig(host=icecast.host, port=icecast.port, admin_password=icecast.admin_password),
                         lambda counts: None)
        public = Audience(IcecastConfig(host=icecast.host, port=icecast.port), lambda counts: None)
        assert admin.source.endswith("/admin/stats") and public.source.endswith("/status-json.xsl")
        wait_for(lambda: admin.read().get("/x.mp3") == 0, 10, message="the mount in /admin/stats")
        assert public.read() == admin.read() == {"/x.mp3": 0}
    finally:
        s.close()


@pytest.mark.parametrize("body", [b"", b"garbage", b"<html>no</html>", b"<icestats><source mount='/a'>"
                                  b"<listeners>many</listeners></source></icestats>", b"\xff\xfe" * 100])
def test_garbage_admin_stats_is_an_error_not_a_count(body: bytes) -> None:
    with pytest.raises(IcecastError):
        parse_admin_stats(body)


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'{"icestats": 5}', b'{"icestats": {"source": [1]}}',
                                  b'{"icestats": {"source": {"listenurl": "http://h:1/a", "listeners": "x"}}}',
                                  b"[" * 100000])
def test_garbage_status_json_is_an_error_not_a_count(body: bytes) -> None:
    with pytest.raises(IcecastError):
        parse_status_json(body)


def test_admin_stats_counts_every_mount() -> None:
    body = (b"<icestats><listeners>3</listeners><source mount='/a.mp3'><listeners>2</listeners></source>"
            b"<source mount='/b.ogg'><listeners>0</listeners></source></icestats>")
    assert parse_admin_stats(body) == {"/a.mp3": 2, "/b.ogg": 0}


@pytest.mark.e2e
def test_icecast_restarted_while_stations_are_idle(icecast, tiny_model_dir: Path, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """Icecast goes away while every station is idle: the counts are unknown, so every station generates (fail
    open); Icecast comes back: every mount is on air again, the counts are read again, a listener is counted, and
    the stations nobody hears idle again. No traceback, no station lost."""
    three_stations(tmp_path / "st")
    daemon = run_daemon(icecast, tiny_model_dir, tmp_path / "st", generate="listened", linger=1.0)
    try:
        st = by_mount(daemon)
        wait_for(lambda: all(s.idle for s in st.values()), 30, message="every station idle")
        icecast.stop()
        wait_for(lambda: not any(s.idle for s in st.values()), 15, message="fail open while Icecast is away")
        icecast.start()
        wait_for(lambda: all(mount_info(icecast, m) for m in MOUNTS), 60, message="every mount back on air")
        wait_for(lambda: daemon.status()["engine"]["listeners_known"], 15, message="counts readable again")
        heard: dict[str, np.ndarray] = {}
        ear = threading.Thread(target=lambda: heard.update(b=listen(f"{icecast.url}/b.ogg", 8.0)))
        ear.start()
        wait_for(lambda: daemon.engine.listeners("/b.ogg") == 1, 15, 0.1, message="the new listener counted")
        wait_for(lambda: st["/a.mp3"].idle and st["/c.opus"].idle, 30, message="the unheard stations idle again")
        assert not st["/b.ogg"].idle
        ear.join(60)
        assert len(heard["b"]) >= 8.0 * 16000 * 0.97 and np.sqrt(np.mean(heard["b"] ** 2)) > 0.005
        assert len(daemon.stations) == 3 and all(m.alive for m in daemon.mounts.values())
    finally:
        daemon.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_one_failed_reading_keeps_the_last_counts_and_a_lasting_failure_fails_open() -> None:
    told: list[dict[str, int] | None] = []
    audience = Audience(IcecastConfig(), told.append, grace=3600.0)
    answers: list[object] = [{"/a.mp3": 1}, IcecastError("slow"), {"/a.mp3": 0}]

    def read() -> dict[str, int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    audience.read = read  # type: ignore[method-assign]
    for _ in range(3):
        audience.poll()
    assert told == [{"/a.mp3": 1}, {"/a.mp3": 0}] and audience.failures == 1  # the blip changed nothing
    audience.grace = 0.0
    answers[:] = [IcecastError("gone"), IcecastError("gone")]
    audience.poll()
    audience.poll()
    assert told[-2:] == [None, None] and audience.last_error == "gone"
