"""`radio check` and the config layer: every problem, with file and line, in one run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from radio.cli import main
from radio.config import load_daemon_config, load_station, parse_duration
from radio.errors import ConfigError

from ..conftest import write_station

REPO = Path(__file__).resolve().parents[2]

GOOD = """
name: Good
mount: /good.mp3
format: mp3
playlist:
  - title: One
    prompt: mellow jazz piano
    duration: 90s
"""

# filename -> (text, expected line, expected key, a phrase the message must contain)
BROKEN = {
    "syntax.yaml": ("name: x\nmount: /x.mp3\nplaylist: [\n  {prompt: a, duration: 3\n", 5, "yaml", "syntax error"),
    "unknown.yaml": ("name: x\nmount: /unknown.mp3\nformt: mp3\nplaylist:\n  - {prompt: a, duration: 3}\n",
                     3, "formt", "did you mean 'format'"),
    "wrongtype.yaml": ("name: x\nmount: /wrongtype.mp3\nbitrate: loud\nplaylist:\n  - {prompt: a, duration: 3}\n",
                       3, "bitrate", "whole number"),
    "badformat.yaml": ("name: x\nmount: /badformat.mp4\nformat: mp4\nplaylist:\n  - {prompt: a, duration: 3}\n",
                       3, "format", "'mp4' is not one of mp3, vorbis, opus"),
    "noslash.yaml": ("name: x\nmount: noslash.mp3\nplaylist:\n  - {prompt: a, duration: 3}\n",
                     2, "mount", "must start with '/'"),
    "emptylist.yaml": ("name: x\nmount: /emptylist.mp3\nplaylist: []\n", 3, "playlist", "is empty"),
    "negative.yaml": ("name: x\nmount: /negative.mp3\nplaylist:\n  - prompt: a\n    duration: -3m\n",
                      5, "playlist[0].duration", "greater than 0"),
    "emptyprompt.yaml": ("name: x\nmount: /emptyprompt.mp3\nplaylist:\n  - title: t\n    prompt: '  '\n"
                         "    duration: 3\n", 5, "playlist[0].prompt", "must not be empty"),
    "surrogate.yaml": ('name: x\nmount: /surrogate.mp3\nplaylist:\n  - title: t\n    prompt: "x \\udfff y"\n'
                       "    duration: 3\n", 5, "playlist[0].prompt", "lone surrogate"),
    "bell.yaml": ('name: x\nmount: /bell.mp3\nplaylist:\n  - title: "ding \\a"\n    prompt: a\n'
                  "    duration: 3\n", 4, "playlist[0].title", "control characters"),
    "nel.yaml": ('name: "x \\N y"\nmount: /nel.mp3\nplaylist:\n  - {prompt: a, duration: 3}\n',
                 1, "name", "control characters"),
    "infinite.yaml": ("name: x\nmount: /infinite.mp3\nplaylist:\n  - prompt: a\n    duration: 999999h\n",
                      5, "playlist[0].duration", "out of range"),
    "zz_duplicate.yaml": ("name: dup\nmount: /good.mp3\nplaylist:\n  - {prompt: a, duration: 3}\n",
                          2, "mount", "already used"),
}


def test_example_stations_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(REPO / "stations")]) == 0
    out = capsys.readouterr().out
    assert "3 station(s)" in out
    formats = {load_station(p).format for p in (REPO / "stations").glob("*.yaml")}
    assert formats == {"mp3", "vorbis", "opus"}


def test_check_reports_every_broken_file_with_line_and_exits_2(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    write_station(tmp_path, "good.yaml", GOOD)
    for name, (text, *_rest) in BROKEN.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert main(["check", str(tmp_path)]) == 2
    lines = capsys.readouterr().out.splitlines()
    for name, (_text, line, key, phrase) in BROKEN.items():
        expected = f"{tmp_path / name}:{line}: {key}: "
        hits = [entry for entry in lines if entry.startswith(expected)]
        assert hits, f"no '{expected}...' line in:\n" + "\n".join(lines)
        assert phrase in hits[0], hits[0]
    assert not any(entry.startswith(str(tmp_path / "good.yaml")) for entry in lines)
    # every line has the path:line: key: message shape
    assert all(re.match(r"^.+:\d+: [\w.\[\]]+: .+", entry) for entry in lines), lines


def test_all_problems_of_one_file_are_reported_at_once(tmp_path: Path) -> None:
    path = write_station(tmp_path, "many.yaml", """
        name: ""
        mount: bad
        format: wav
        generation: {temprature: 2, top_k: 0}
        playlist:
          - prompt: ok
            duration: 3 parsecs
    """)
    with pytest.raises(ConfigError) as info:
        load_station(path)
    keys = [p.split(": ")[1] for p in info.value.problems]
    assert keys == ["name", "mount", "format", "generation.temprature", "generation.top_k",
                    "playlist[0].duration"], info.value.problems


def test_clean_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_station(tmp_path, "good.yaml", GOOD)
    assert main(["check", str(path)]) == 0
    assert "ok:" in capsys.readouterr().out


@pytest.mark.parametrize("text,seconds", [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("3m", 180.0),
                                          ("1m30s", 90.0), ("1h", 3600.0), (2.5, 2.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "3 parsecs", "", True, None, "m"])
def test_not_durations(text: object) -> None:
    assert parse_duration(text) is None


def test_daemon_config_reads_password_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    cfg_path = tmp_path / "radio.yaml"
    cfg_path.write_text("stations: st\nmodel: /models/x\nicecast: {host: 10.0.0.5, port: 8001, password_file: pw}\n"
                        "engine: {chunk_seconds: 2.5}\n")
    monkeypatch.delenv("RADIO_SOURCE_PASSWORD", raising=False)
    cfg = load_daemon_config(cfg_path)
    assert cfg.icecast.password == "from-file"
    assert cfg.icecast.port == 8001 and cfg.engine.chunk_seconds == 2.5
    assert cfg.stations_dir == str(tmp_path / "st")
    assert "from-file" not in repr(cfg)  # secrets stay out of logs
    monkeypatch.setenv("RADIO_SOURCE_PASSWORD", "from-env")
    assert load_daemon_config(cfg_path).icecast.password == "from-env"


def test_daemon_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "radio.yaml"
    cfg_path.write_text("stations: st\nmodel: x\nicecast:\n  prot: 8000\nengine: {chunk_seconds: -1}\n")
    assert main(["check", str(cfg_path)]) == 2
    out = capsys.readouterr().out
    assert f"{cfg_path}:4: icecast.prot: unknown key; did you mean 'port'?" in out
    assert f"{cfg_path}:5: engine.chunk_seconds:" in out


def test_transition_blend_is_read_and_checked(tmp_path: Path) -> None:
    path = write_station(tmp_path, "blend.yaml", """
        name: Blend
        mount: /blend.mp3
        playlist:
          - {prompt: a, duration: 1m}
          - prompt: b
            duration: 1m
            transition: {blend: 8s}
          - prompt: c
            duration: 5s
            transition: {blend: 8s, fade: 2}
    """)
    with pytest.raises(ConfigError) as info:
        load_station(path)
    assert sorted(p.split(": ")[1] for p in info.value.problems) == ["playlist[2].transition.blend",
                                                                     "playlist[2].transition.fade"]
    path.write_text(path.read_text().replace("duration: 5s", "duration: 30s").replace(", fade: 2", ""))
    assert [i.blend for i in load_station(path).playlist] == [0.0, 8.0, 8.0]


def test_idents_are_checked_relative_to_the_station_file(tmp_path: Path) -> None:
    (tmp_path / "ids").mkdir()
    (tmp_path / "ids" / "one.mp3").write_bytes(b"\xff\xfb" + b"\0" * 100)
    path = write_station(tmp_path, "idents.yaml", """
        name: Idents
        mount: /idents.mp3
        idents:
          files: [ids/one.mp3, ids/missing.mp3]
          every: 0
        playlist:
          - {prompt: a, duration: 1m}
    """)
    with pytest.raises(ConfigError) as info:
        load_station(path)
    assert [p.split(": ")[1] for p in info.value.problems] == ["idents.files[1]", "idents.every"]
    assert "missing.mp3 does not exist" in info.value.problems[0]
    path.write_text(path.read_text().replace(", ids/missing.mp3", "").replace("every: 0", "every: 2"))
    station = load_station(path)
    assert station.idents == (str(tmp_path / "ids" / "one.mp3"),) and station.ident_every == 2


def test_a_station_link_that_loops_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_station(tmp_path, "good.yaml", GOOD)
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert main(["check", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    for name in ("loop.yaml", "gone.yaml"):
        assert f"{tmp_path / name}: file: is a symbolic link that loops or points nowhere" in out, out


def test_audience_and_weights_settings_are_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "radio.yaml"
    good.write_text("engine:\n  generate: always\n  linger: 2m\n  weights: int4\n  kv: 8bit\n  compile: never\n"
                    "  codec: float32\n  kernels: torch\n",
                    encoding="utf-8")
    cfg = load_daemon_config(good)
    assert (cfg.engine.generate, cfg.engine.linger, cfg.engine.weights) == ("always", 120.0, "int4")
    assert cfg.engine.kv == "8bit" and load_daemon_config(None).engine.kv == "auto"
    assert cfg.engine.compile == "never" and load_daemon_config(None).engine.compile == "auto"
    assert cfg.engine.codec == "float32" and load_daemon_config(None).engine.codec == "auto"
    assert cfg.engine.kernels == "torch" and load_daemon_config(None).engine.kernels == "auto"
    assert (load_daemon_config(None).engine.generate, load_daemon_config(None).engine.linger) == ("listened", 60.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  weights: int3\n  generate: sometimes\n  linger: forever\n  kv: 4bit\n"
                   "  compile: maybe\n  codec: float16\n  kernels: fast\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_daemon_config(bad)
    text = "\n".join(err.value.problems)
    assert f"{bad}:2: engine.weights: 'int3' is not one of auto, float32, bfloat16, int8, int4" in text
    assert f"{bad}:3: engine.generate: 'sometimes' is not one of listened, always" in text
    assert f"{bad}:4: engine.linger: must be a duration" in text
    assert f"{bad}:5: engine.kv: '4bit' is not one of auto, full, 8bit" in text
    assert f"{bad}:6: engine.compile: 'maybe' is not one of auto, always, never" in text
    assert f"{bad}:7: engine.codec: 'float16' is not one of auto, float32, bfloat16" in text
    assert f"{bad}:8: engine.kernels: 'fast' is not one of auto, torch" in text
    st = write_station(tmp_path / "st", "a.yaml", """
        name: A
        mount: /a.mp3
        always: true
        weights: int8
        playlist:
          - {prompt: calm piano, duration: 1m}
    """)
    station = load_station(st)
    assert station.always is True and station.weights == "int8"
    st.write_text(st.read_text().replace("always: true", "always: maybe").replace("int8", "int2"))
    with pytest.raises(ConfigError) as err:
        load_station(st)
    assert any(":3: always:" in p for p in err.value.problems) and any(":4: weights:" in p for p in err.value.problems)


def test_requests_are_read_with_the_daemons_defaults_and_checked(tmp_path: Path) -> None:
    (tmp_path / "blocked.txt").write_text("# no thanks\nbadword\nre:spa+m\n", encoding="utf-8")
    cfg = tmp_path / "radio.yaml"
    cfg.write_text("requests: {enabled: true, every: 5m, queue: 4, blocklist: blocked.txt}\n", encoding="utf-8")
    daemon = load_daemon_config(cfg)
    assert daemon.requests.enabled and daemon.requests.every == 300 and daemon.requests.queue == 4
    assert len(daemon.requests.blocklist) == 2 and daemon.requests.blocklist_file == str(tmp_path / "blocked.txt")
    own = write_station(tmp_path / "st", "own.yaml", """
        name: Own
        mount: /own.mp3
        requests: {queue: 2, duration: 90s, share: 0.25}
        playlist: [{prompt: jazz, duration: 1m}]
    """)
    plain = write_station(tmp_path / "st", "plain.yaml", """
        name: Plain
        mount: /plain.mp3
        playlist: [{prompt: jazz, duration: 1m}]
    """)
    merged = load_station(own).requests_config(daemon.requests)
    assert (merged.enabled, merged.every, merged.queue, merged.duration, merged.share) == (True, 300, 2, 90, 0.25)
    assert merged.blocklist == daemon.requests.blocklist
    assert load_station(plain).requests_config(daemon.requests) == daemon.requests
    assert not load_station(plain).requests_config(load_daemon_config(None).requests).enabled  # off by default
    (tmp_path / "st" / "bad.txt").write_text("fine\nre:(oops\n", encoding="utf-8")  # beside the station file
    bad = write_station(tmp_path / "st", "bad.yaml", """
        name: Bad
        mount: /bad.mp3
        requests:
          enabled: maybe
          queue: 0
          share: 1.5
          every: soon
          blocklist: bad.txt
          cooldown: 1m
        playlist: [{prompt: jazz, duration: 1m}]
    """)
    with pytest.raises(ConfigError) as info:
        load_station(bad)
    text = "\n".join(info.value.problems)
    for line, key in ((4, "requests.enabled"), (5, "requests.queue"), (6, "requests.share"), (7, "requests.every"),
                      (8, "requests.blocklist"), (9, "requests.cooldown")):
        assert re.search(rf"bad\.yaml:{line}: {re.escape(key)}: ", text), (key, text)
    assert "bad.txt:2: '(oops' is not a valid regular expression" in text
    missing = write_station(tmp_path / "st", "missing.yaml", """
        name: Missing
        mount: /missing.mp3
        requests: {enabled: true, blocklist: nowhere.txt}
        playlist: [{prompt: jazz, duration: 1m}]
    """)
    with pytest.raises(ConfigError, match=r"missing\.yaml:3: requests\.blocklist: cannot read .*nowhere\.txt"):
        load_station(missing)
