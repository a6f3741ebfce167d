"""Many hands at once (tiny model, real icecast2, four stations): for 30 s several threads change prompts, skip,
edit station files and reload, and swap models through the API while listeners decode every mount. The engine
thread is the only writer of a station's generation state, so nothing is lost, doubled or torn."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from radio.config import load_stations
from radio.daemon import Daemon
from radio.tools.testing import make_test_model

from .conftest import daemon_config, listen, mount_info, wait_for, write_station
from .conftest import request

pytestmark = pytest.mark.e2e
TOKEN = "stress-token"
TITLES = [f"T{i}" for i in range(5)]


def station_text(name: str, mount: str, fmt: str, temperature: float = 1.0) -> str:
    items = "\n".join(f"  - {{title: {t}, prompt: 'piano {t}', duration: 10m}}" for t in TITLES)
    return (f"name: {name}\nmount: {mount}\nformat: {fmt}\ngeneration: {{temperature: {temperature}}}\n"
            f"playlist:\n{items}\n")


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_hammering_the_api_and_the_files_loses_nothing(icecast, tiny_model_dir: Path, tmp_path: Path) -> None:
    alt = make_test_model(tmp_path / "alt", shape="tiny-alt", seed=1)
    st = tmp_path / "stations"
    mounts = {"a": ("/a.mp3", "mp3"), "b": ("/b.ogg", "vorbis"), "c": ("/c.opus", "opus"), "d": ("/d.mp3", "mp3")}
    for name, (mount, fmt) in mounts.items():
        write_station(st, f"{name}.yaml", station_text(name, mount, fmt))
    stations, problems = load_stations([st])
    assert not problems
    daemon = Daemon(daemon_config(icecast, tiny_model_dir, st, api_port=0, token=TOKEN), stations)
    errors = Errors()
    logging.getLogger().addHandler(errors)
    starts: list[str] = []

    class Starts(logging.Handler):  # the items station /a.mp3 starts, in order (skips only)
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("/a.mp3: next item"):
                starts.append(record.args[1])  # type: ignore[index]

    starts_handler = Starts(logging.INFO)
    station_log = logging.getLogger("radio.station")
    level = station_log.level
    station_log.setLevel(logging.INFO)
    station_log.addHandler(starts_handler)
    daemon.start()
    try:
        base = f"http://127.0.0.1:{daemon.api.port}"
        for mount, _ in mounts.values():
            wait_for(lambda m=mount: mount_info(icecast, m), 40, message=f"{mount} on air")
        stop = threading.Event()
        failures: list[str] = []
        skips_a = [0]

        def post(path: str, body: dict) -> None:
            code, resp, _ = request(f"{base}{path}", "POST", json.dumps(body).encode(), token=TOKEN)
            if code not in (200, 202):
                failures.append(f"{path} -> {code} {resp[:200]!r}")

        def skipper() -> None:  # station a: skips only, so its items must follow the playlist one by one
            while not stop.wait(0.7):
                post("/stations/a.mp3/skip", {})
                skips_a[0] += 1

        def prompter(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.wait(0.1):
                target = rng.choice(["b.ogg", "c.opus", "d.mp3"])
                if rng.random() < 0.5:
                    post(f"/stations/{target}/prompt", {"prompt": f"jazz {rng.randrange(1000)}",
                                                        "title": f"P{rng.randrange(1000)}", "blend": "1s"})
                else:
                    post(f"/stations/{target}/skip", {})

        def editor() -> None:
            rng = random.Random(7)
            while not stop.wait(1.5):
                write_station(st, "b.yaml", station_text("b", "/b.ogg", "vorbis", rng.choice([0.8, 1.0, 1.2])))
                post("/reload", {})

        def swapper() -> None:
            models = [str(alt), str(tiny_model_dir)]
            i = 0
            while not stop.wait(6.0):
                post("/stations/d.mp3/model", {"model": models[i % 2]})
                i += 1

        heard: dict[str, np.ndarray] = {}

        def listener(mount: str) -> None:
            heard[mount] = listen(f"{icecast.url}{mount}", 25.0, timeout=60)

        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in
                   [(skipper, ()), (prompter, (1,)), (prompter, (2,)), (editor, ()), (swapper, ())]
                   + [(listener, (m,)) for m, _ in mounts.values()]]
        for t in threads:
            t.start()
        time.sleep(30.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures[:5]
        assert not [r for r in errors.records if r.name.startswith("radio")], \
            [r.getMessage() for r in errors.records][:5]
        for mount, _ in mounts.values():
            audio = heard.get(mount)
            assert audio is not None and len(audio) > 16000 * 20 and np.sqrt(np.mean(audio ** 2)) > 0.005, mount
        # Station a only ever skipped: its items follow the playlist one at a time, none skipped twice.
        assert len(starts) >= skips_a[0] - 2 and len(starts) >= 10, (len(starts), skips_a[0])
        for prev, cur in zip(starts, starts[1:]):
            assert TITLES.index(cur) == (TITLES.index(prev) + 1) % len(TITLES), starts
        # Every station's samples add up.
        for station in daemon.stations.values():
            acc = station.accounting()
            assert acc["generated"] == acc["played"] + acc["queued"] + acc["dropped"], (station.mount, acc)
        code, body, _ = request(f"{base}/status")
        assert code == 200 and all(s.get("pending") == [] or isinstance(s.get("pending"), list)
                                   for s in json.loads(body)["stations"])
    finally:
        logging.getLogger().removeHandler(errors)
        station_log.removeHandler(starts_handler)
        station_log.setLevel(level)
        daemon.stop()
