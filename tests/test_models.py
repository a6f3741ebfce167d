"""Several models: per-station models, live swaps, unloading, the memory budget, failed loads.

The first tests use fake models behind the engine and the pool (fast, exact); the last ones run the daemon
with two real tiny checkpoints of different shapes on a real Icecast, with a listener tuned in.
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from radio.config import EngineConfig, load_station
from radio.daemon import Daemon
from radio.engine import Engine
from radio.errors import ConfigError, ModelError
from radio.output.local import free_port
from radio.pool import ModelPool, ModelSpec
from radio.station.station import Station
from radio.tools.testing import SineModel

from .conftest import listen, mount_info, run_daemon, silent_run_seconds, wait_for, write_station
from .conftest import drain, request, station_config

CFG = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.1, buffer_seconds=2.0, overlap_frames=5, crossfade_ms=20)


class FakeModel(SineModel):
    """A sine model with a size, a codebook count and a forget() like the real one."""

    def __init__(self, freq: float = 440.0, size: int = 1000, num_codebooks: int = 4, sample_rate: int = 32000):
        super().__init__(freq=freq)
        self.size = size
        self.num_codebooks = num_codebooks
        self.sample_rate = sample_rate
        self.forgotten: list[str] = []

    def memory_bytes(self) -> int:
        return self.size

    def forget(self, key: str) -> None:
        self.forgotten.append(key)


def new_station(mount: str) -> Station:
    return Station(station_config(mount), 32000, 50, 4, CFG)


def run_until_full(engine: Engine, limit: int = 100) -> None:
    for _ in range(limit):
        if not engine.run_once():
            return
    raise AssertionError("engine never caught up")


# -- engine ------------------------------------------------------------------------------------------------------

def test_each_model_steps_its_own_stations_and_none_starves() -> None:
    a, b = FakeModel(440.0), FakeModel(660.0)
    engine = Engine(None, CFG)
    engine.add_model("a", a)
    engine.add_model("b", b)
    sa, sb, sc = new_station("/a.mp3"), new_station("/b.mp3"), new_station("/c.mp3")
    engine.add_station(sa, "a")
    engine.add_station(sb, "b")
    engine.add_station(sc, "a")
    run_until_full(engine)
    assert {r.key for call, _ in a.calls for r in call} == {sa.key, sc.key}
    assert {r.key for call, _ in b.calls for r in call} == {sb.key}
    assert all(len(call) == 2 for call, _ in a.calls)  # a's stations share a's batch
    for st in (sa, sb, sc):
        assert st.buffered_seconds >= CFG.buffer_seconds
    # Listeners drain b only: b's model steps next, a's waits.
    drain(sb)
    before = len(a.calls), len(b.calls)
    assert engine.run_once()
    assert (len(a.calls), len(b.calls)) == (before[0], before[1] + 1)


def test_a_station_waiting_for_its_model_is_left_out_and_others_play_on() -> None:
    a = FakeModel()
    engine = Engine(None, CFG)
    engine.add_model("a", a)
    sa, sb = new_station("/a.mp3"), new_station("/b.mp3")
    engine.add_station(sa, "a")
    engine.add_station(sb, None)
    run_until_full(engine)
    assert sa.buffered_seconds >= CFG.buffer_seconds and sb.buffered_seconds == 0


def playing_on_a(a: FakeModel, b: FakeModel) -> tuple[Engine, Station]:
    """An engine with models a and b, and one station that has played four chunks from a."""
    engine = Engine(None, CFG)
    engine.add_model("a", a)
    engine.add_model("b", b)
    st = new_station("/a.mp3")
    engine.add_station(st, "a")
    for _ in range(4):
        engine.run_once()
    return engine, st


def test_switch_to_a_model_that_reads_the_same_codes_continues_seamlessly() -> None:
    a, b = FakeModel(), FakeModel()
    engine, st = playing_on_a(a, b)
    engine.set_station_model(st.key, "b")
    assert a.forgotten == []  # the engine thread applies it: a caller never waits for a running step
    for _ in range(4):
        engine.run_once()
    assert a.forgotten == [st.key]  # the old model drops the station's KV state
    assert b.calls and b.calls[0][0][0].context.shape[1] > 0  # b continued from a's codes
    out = drain(st)
    ideal = a.pcm_for_frames(0, len(out) // 640 + 1)[: len(out)]
    assert np.abs(out - ideal).max() < 1e-4  # one continuous sine across the switch


def test_switch_to_a_model_with_other_codes_starts_fresh_with_a_crossfade() -> None:
    a, b = FakeModel(441.0), FakeModel(441.0, num_codebooks=8)  # 441 Hz: not in phase 0 where b starts
    engine, st = playing_on_a(a, b)
    switch_at = sum(f for _, f in a.calls) * 640 - 20 * 32  # where a's audio ends (its tail was held back)
    engine.set_station_model(st.key, "b")
    engine.run_once()
    first = b.calls[0][0][0]
    assert first.context.shape == (8, 0)  # b cannot read a's codes: it starts fresh
    out = drain(st)
    assert len(out) > switch_at + 2000
    smooth = 0.5 * 2 * np.pi * 441 / 32000  # the largest step inside a 440 Hz sine of amplitude 0.5
    jumps = np.abs(np.diff(out[switch_at - 1000: switch_at + 1000]))
    assert jumps.max() < 2.5 * smooth, "the switch must be crossfaded, not butted"


# -- pool --------------------------------------------------------------------------------------------------------

class Loader:
    """A fake model loader: sizes by name, failures by name, and a gate that holds loads back."""

    def __init__(self, sizes: dict[str, int], fail: tuple[str, ...] = (), rates: dict[str, int] | None = None):
        self.sizes = sizes
        self.fail = fail
        self.rates = rates or {}
        self.gate = threading.Event()
        self.gate.set()
        self.loaded: list[str] = []

    def __call__(self, spec: ModelSpec) -> FakeModel:
        self.gate.wait(10)
        if spec.name in self.fail:
            raise ModelError(f"could not load model {spec.name!r}: broken")
        self.loaded.append(spec.name)
        return FakeModel(size=self.sizes[spec.name], sample_rate=self.rates.get(spec.name, 32000))

    def estimate(self, spec: ModelSpec) -> int | None:
        return self.sizes.get(spec.name)


def pool_with(loader: Loader, budget: int | None, **stations: str) -> tuple[ModelPool, Engine, dict[str, Station]]:
    engine = Engine(None, CFG)
    pool = ModelPool(engine, loader, budget=budget, estimate=loader.estimate)
    made = {}
    for mount, model in stations.items():
        st = new_station(f"/{mount}.mp3")
        pool.load(ModelSpec(model))
        pool.add_station(st, ModelSpec(model))
        made[mount] = st
    return pool, engine, made


def test_change_loads_in_the_background_keeps_the_old_model_meanwhile_and_unloads_it_after() -> None:
    loader = Loader({"small": 100, "medium": 300})
    pool, engine, st = pool_with(loader, None, a="small", b="small")
    old = weakref.ref(pool.models()[ModelSpec("small")])
    loader.gate.clear()
    assert pool.change(st["a"].key, ModelSpec("medium")) == "loading"
    assert engine.model_of(st["a"].key) == "small"  # on air from the old model while the new one loads
    assert pool.station_status(st["a"].key)["model_loading"] == "medium"
    assert pool.station_status(st["a"].key)["model"] == "small"
    loader.gate.set()
    assert pool.wait_idle(5)
    assert engine.model_of(st["a"].key) == "medium" and engine.model_of(st["b"].key) == "small"
    assert pool.change(st["b"].key, ModelSpec("medium")) == "switched"  # loaded already: at once
    gc.collect()
    assert old() is None, "a model no station uses must be unloaded and its memory returned"
    assert set(engine.models) == {"medium"} and pool.used_bytes() == 300
    assert pool.status()["unloads"] == 1


def test_swap_that_does_not_fit_beside_the_old_model_goes_through_filler() -> None:
    loader = Loader({"small": 100, "large": 350})
    pool, engine, st = pool_with(loader, 400, a="small")
    loader.gate.clear()
    assert pool.change(st["a"].key, ModelSpec("large")) == "loading-on-filler"
    assert engine.model_of(st["a"].key) is None and not engine.models  # old unloaded first; filler covers
    loader.gate.set()
    assert pool.wait_idle(5)
    assert engine.model_of(st["a"].key) == "large" and pool.used_bytes() == 350


def test_swap_that_cannot_fit_is_refused_and_changes_nothing() -> None:
    loader = Loader({"small": 100, "large": 350})
    pool, engine, st = pool_with(loader, 400, a="small", b="small")  # small is shared: it cannot go
    with pytest.raises(ModelError, match=r"large.*memory budget.*keeps small"):
        pool.change(st["a"].key, ModelSpec("large"))
    assert engine.model_of(st["a"].key) == "small" and "large" not in loader.loaded


def test_failed_load_keeps_the_old_model_and_the_others_untouched() -> None:
    loader = Loader({"small": 100, "big": 350}, fail=("broken", "big"))
    pool, engine, st = pool_with(loader, 400, a="small", b="small")
    assert pool.change(st["a"].key, ModelSpec("broken")) == "loading"
    assert pool.wait_idle(5)
    status = pool.station_status(st["a"].key)
    assert status["model"] == "small" and "broken" in str(status["model_error"])
    assert engine.model_of(st["a"].key) == "small" and engine.model_of(st["b"].key) == "small"
    # A failed swap through filler brings the old model back.
    pool2, engine2, st2 = pool_with(loader, 400, c="small")
    assert pool2.change(st2["c"].key, ModelSpec("big")) == "loading-on-filler"
    assert pool2.wait_idle(5)
    assert engine2.model_of(st2["c"].key) == "small"
    assert "big" in str(pool2.station_status(st2["c"].key)["model_error"])


def test_a_model_with_another_sample_rate_is_refused() -> None:
    loader = Loader({"small": 100, "hifi": 100}, rates={"hifi": 48000})
    pool, engine, st = pool_with(loader, None, a="small")
    pool.change(st["a"].key, ModelSpec("hifi"))
    assert pool.wait_idle(5)
    assert "48000 Hz" in str(pool.station_status(st["a"].key)["model_error"])
    assert engine.model_of(st["a"].key) == "small" and set(engine.models) == {"small"}


# -- config ------------------------------------------------------------------------------------------------------

def test_station_model_key_is_checked_where_it_is_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    ok = write_station(tmp_path, "ok.yaml", f"""
        name: A
        mount: /a.mp3
        model: {tiny_model_dir}
        dtype: float32
        playlist: [{{prompt: calm, duration: 1m}}]
    """)
    sc = load_station(ok)
    assert sc.model == str(tiny_model_dir) and sc.dtype == "float32"
    hub = write_station(tmp_path, "hub.yaml", """
        name: A
        mount: /a.mp3
        model: facebook/musicgen-medium
        playlist: [{prompt: calm, duration: 1m}]
    """)
    assert load_station(hub).model == "facebook/musicgen-medium"
    bad = write_station(tmp_path, "bad.yaml", """
        name: A
        mount: /a.mp3
        model: ./no-such-checkpoint
        dtype: float64
        playlist: [{prompt: calm, duration: 1m}]
    """)
    with pytest.raises(ConfigError) as exc:
        load_station(bad)
    text = str(exc.value)
    assert f"{bad}:3: model:" in text and "no-such-checkpoint is not a directory" in text
    assert f"{bad}:4: dtype: 'float64' is not one of" in text


# -- end to end --------------------------------------------------------------------------------------------------

def station_yaml(name: str, mount: str, model: Path | None) -> str:
    model_line = f"model: {model}\n" if model else ""
    return (f"name: {name}\nmount: {mount}\nformat: mp3\n{model_line}playlist:\n"
            f"  - {{title: {name} one, prompt: calm piano, duration: 10m}}\n")


@pytest.fixture(scope="module")
def alt_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radio.tools.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-alt-model"), shape="tiny-alt", seed=1)


def station_status(daemon: Daemon, mount: str) -> dict:
    return next(s for s in daemon.status()["stations"] if s["mount"] == mount)


@pytest.mark.e2e
def test_two_models_on_two_mounts_and_a_live_swap_without_a_gap(icecast, tiny_model_dir: Path, alt_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    st = tmp_path / "stations"
    write_station(st, "a.yaml", station_yaml("A", "/a.mp3", None))  # the daemon's model: tiny
    write_station(st, "b.yaml", station_yaml("B", "/b.mp3", alt_model_dir))
    port = free_port()
    daemon = run_daemon(icecast, tiny_model_dir, st, api_port=port)
    api = f"http://127.0.0.1:{port}"
    try:
        models = daemon.status()["models"]["models"]
        assert {m["name"] for m in models} == {str(tiny_model_dir), str(alt_model_dir)}
        assert all(m["device"] == "cpu" and m["decoder"] == "dynamic" and m["batch_limit"] == 16 for m in models)
        wait_for(lambda: mount_info(icecast, "/a.mp3") and mount_info(icecast, "/b.mp3"), 20, message="on air")
        assert all(m["decode_state_bytes"] > 0 for m in daemon.status()["models"]["models"])  # each has a KV cache
        for mount in ("/a.mp3", "/b.mp3"):
            audio = listen(f"{icecast.url}{mount}", 2.0)
            assert np.sqrt(np.mean(audio ** 2)) > 0.005, mount

        # A listener stays tuned to /a.mp3 while its YAML moves it to the other model.
        heard: dict[str, np.ndarray] = {}
        listener = threading.Thread(target=lambda: heard.update(a=listen(f"{icecast.url}/a.mp3", 12.0)))
        listener.start()
        time.sleep(3.0)
        write_station(st, "a.yaml", station_yaml("A", "/a.mp3", alt_model_dir))
        daemon.reload()
        wait_for(lambda: station_status(daemon, "/a.mp3")["model"] == str(alt_model_dir), 20, message="swap")
        wait_for(lambda: len(daemon.status()["models"]["models"]) == 1, 10, message="the unused model unloaded")
        listener.join(60)
        a = heard["a"]
        assert len(a) >= 12.0 * 16000 * 0.99
        assert silent_run_seconds(a) <= 1.0, "no gap longer than 1 s"
        assert daemon.status()["models"]["unloads"] >= 1

        # A broken checkpoint (weights corrupt) is reported for its station and changes nothing.
        broken = corrupt_copy(alt_model_dir, tmp_path / "broken-model")
        status, body, _ = request(f"{api}/stations/b.mp3/model", "POST", json.dumps({"model": str(broken)}).encode())
        assert status == 202 and json.loads(body)["model_loading"] == str(broken)
        wait_for(lambda: station_status(daemon, "/b.mp3")["model_error"], 30, message="load error reported")
        b = station_status(daemon, "/b.mp3")
        assert str(broken) in b["model_error"] and b["model"] == str(alt_model_dir)
        assert station_status(daemon, "/a.mp3")["model_error"] is None
        audio = listen(f"{icecast.url}/b.mp3", 2.0)
        assert np.sqrt(np.mean(audio ** 2)) > 0.005
        # A directory that does not exist is refused at once.
        status, body, _ = request(f"{api}/stations/b.mp3/model", "POST",
                                  json.dumps({"model": str(tmp_path / "nowhere")}).encode())
        assert status == 409 and "does not exist" in json.loads(body)["error"]
        status, body, _ = request(f"{api}/stations/b.mp3/model", "POST",
                                  json.dumps({"model": str(tiny_model_dir), "dtype": "float64"}).encode())
        assert status == 400 and "dtype" in json.loads(body)["error"]
        # This API has no token: a write that comes through a reverse proxy is refused all the same.
        status, body, _ = request(f"{api}/stations/b.mp3/skip", "POST", b"{}",
                                  headers={"X-Forwarded-For": "203.0.113.9"})
        assert status == 403 and "RADIO_API_TOKEN" in json.loads(body)["error"]
        # And back to the first model through the API.
        status, body, _ = request(f"{api}/stations/b.mp3/model", "POST",
                                  json.dumps({"model": str(tiny_model_dir)}).encode())
        assert status == 202
        wait_for(lambda: station_status(daemon, "/b.mp3")["model"] == str(tiny_model_dir), 20, message="API swap")
    finally:
        daemon.stop()


@pytest.mark.e2e
def test_swap_over_the_memory_budget_is_covered_by_filler(icecast, tiny_model_dir: Path, alt_model_dir: Path,
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="radio.pool")
    st = tmp_path / "stations"
    write_station(st, "a.yaml", station_yaml("A", "/a.mp3", None))
    # Room for the bigger model alone, not for both.
    daemon = run_daemon(icecast, tiny_model_dir, st, memory_budget="1.5MB")
    try:
        wait_for(lambda: mount_info(icecast, "/a.mp3"), 20, message="on air")
        heard: dict[str, np.ndarray] = {}
        listener = threading.Thread(target=lambda: heard.update(a=listen(f"{icecast.url}/a.mp3", 8.0)))
        listener.start()
        time.sleep(2.0)
        write_station(st, "a.yaml", station_yaml("A", "/a.mp3", alt_model_dir))
        daemon.reload()
        wait_for(lambda: station_status(daemon, "/a.mp3")["model"] == str(alt_model_dir), 20, message="swap")
        listener.join(60)
        assert "filler covers" in caplog.text  # the old model had to go first
        assert silent_run_seconds(heard["a"]) <= 1.0
        models = daemon.status()["models"]
        assert [m["name"] for m in models["models"]] == [str(alt_model_dir)]
        assert models["memory_used_bytes"] <= 1_500_000
    finally:
        daemon.stop()


def corrupt_copy(model_dir: Path, where: Path) -> Path:
    shutil.copytree(model_dir, where)
    for weights in where.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return where


@pytest.mark.e2e
def test_a_station_whose_model_fails_at_startup_stays_off_and_the_others_play(icecast, tiny_model_dir: Path,
                                                                               tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken-model")
    st = tmp_path / "stations"
    write_station(st, "a.yaml", station_yaml("A", "/a.mp3", None))
    b_file = write_station(st, "b.yaml", station_yaml("B", "/b.mp3", broken))
    daemon = run_daemon(icecast, tiny_model_dir, st)
    try:
        assert [s["mount"] for s in daemon.status()["stations"]] == ["/a.mp3"]
        line = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert str(b_file) in line and str(broken) in line and "not started" in line
        wait_for(lambda: mount_info(icecast, "/a.mp3"), 20, message="the good station on air")
        assert np.sqrt(np.mean(listen(f"{icecast.url}/a.mp3", 2.0) ** 2)) > 0.005
        # Fixing the file starts the station.
        write_station(st, "b.yaml", station_yaml("B", "/b.mp3", tiny_model_dir))
        daemon.reload()
        wait_for(lambda: mount_info(icecast, "/b.mp3"), 20, message="the fixed station on air")
    finally:
        daemon.stop()
