"""The control API and web player, against a running daemon (tiny model, real icecast2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radio.cli import _daemon_config, build_parser
from radio.config import load_daemon_config, load_stations
from radio.daemon import Daemon
from radio.errors import ConfigError

from ..conftest import daemon_config, generating_after, mount_info, request, wait_for, write_station

pytestmark = pytest.mark.e2e
TOKEN = "t0ken-for-tests"


@pytest.fixture
def api_daemon(icecast, tiny_model_dir: Path, tmp_path: Path):
    st = tmp_path / "stations"
    write_station(st, "a.yaml", """
        name: Alpha Radio
        mount: /alpha.mp3
        description: the first one
        playlist:
          - {title: One, prompt: calm piano, duration: 10m}
          - {title: Two, prompt: fast drums, duration: 10m}
    """)
    write_station(st, "b.yaml", """
        name: Bravo Radio
        mount: /bravo.ogg
        format: vorbis
        playlist:
          - {title: Uno, prompt: soft pads, duration: 10m}
    """)
    stations, _ = load_stations([st])
    daemon = Daemon(daemon_config(icecast, tiny_model_dir, st, api_port=0, token=TOKEN), stations)
    daemon.start()
    try:
        wait_for(lambda: mount_info(icecast, "/alpha.mp3").get("title") == "One", 20, message="on air")
        yield daemon, f"http://127.0.0.1:{daemon.api.port}", icecast
    finally:
        daemon.stop()


def test_status_has_every_station_with_its_numbers(api_daemon) -> None:
    _daemon, base, _ = api_daemon
    code, body, headers = request(f"{base}/status")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    status = json.loads(body)
    assert 0 < status["uptime_seconds"] < 600 and status["engine"]["steps"] >= 1
    by_mount = {s["mount"]: s for s in status["stations"]}
    assert set(by_mount) == {"/alpha.mp3", "/bravo.ogg"}
    alpha = by_mount["/alpha.mp3"]
    for key in ("name", "format", "now_playing", "next", "buffered_seconds", "generated_seconds", "filled_seconds",
                "listeners", "listen_url", "connected"):
        assert key in alpha, key
    assert alpha["now_playing"] == "One" and alpha["next"] == "Two" and alpha["format"] == "mp3"
    assert alpha["listen_url"].endswith("/alpha.mp3") and alpha["listeners"] == 0


def test_prompt_change_and_skip_reach_the_stream(api_daemon) -> None:
    _daemon, base, icecast = api_daemon
    body = json.dumps({"prompt": "bright disco with strings", "title": "Disco ✨", "blend": "2s"}).encode()
    code, resp, _ = request(f"{base}/stations/alpha.mp3/prompt", "POST", body, token=TOKEN)
    assert generating_after(base, "/alpha.mp3", code, resp) == "Disco ✨"
    wait_for(lambda: mount_info(icecast, "/alpha.mp3").get("title") == "Disco ✨", 20, message="new title on air")
    code, resp, _ = request(f"{base}/stations/alpha.mp3/skip", "POST", b"", token=TOKEN)
    assert generating_after(base, "/alpha.mp3", code, resp) == "Two"
    wait_for(lambda: mount_info(icecast, "/alpha.mp3").get("title") == "Two", 20, message="skipped to Two")
    code, _, _ = request(f"{base}/reload", "POST", b"{}", token=TOKEN)
    assert code == 202


def test_writes_need_the_token_and_bad_requests_are_clear_json(api_daemon) -> None:
    _daemon, base, _ = api_daemon
    prompt = json.dumps({"prompt": "x"}).encode()
    for token in (None, "wrong"):
        code, body, _ = request(f"{base}/stations/alpha.mp3/prompt", "POST", prompt, token=token)
        assert code == 401 and "token" in json.loads(body)["error"]
    cases = [
        ("/stations/alpha.mp3/prompt", b"{not json", 400, "not JSON"),
        ("/stations/alpha.mp3/prompt", b"[1, 2]", 400, "JSON object"),
        ("/stations/alpha.mp3/prompt", b'{"prompt": ""}', 400, "prompt"),
        ("/stations/alpha.mp3/prompt", b'{"prompt": "ok", "blend": "forever"}', 400, "blend"),
        ("/stations/nope.mp3/prompt", b'{"prompt": "ok"}', 404, "no station"),
        ("/stations/alpha.mp3/dance", b"{}", 404, "no such action"),
        ("/stations/alpha.mp3/prompt", b'{"prompt": "' + b"x" * 20000 + b'"}', 413, "limit"),
    ]
    for path, body, expected, phrase in cases:
        code, resp, headers = request(f"{base}{path}", "POST", body, token=TOKEN)
        assert code == expected, (path, code, resp[:200])
        assert headers["Content-Type"].startswith("application/json")
        assert phrase in json.loads(resp)["error"], resp
        assert b"Traceback" not in resp
    code, resp, _ = request(f"{base}/nothing-here")
    assert code == 404 and "error" in json.loads(resp)
    code, _, _ = request(f"{base}/status", "DELETE")
    assert code == 405


def test_metrics_and_web_page(api_daemon) -> None:
    _daemon, base, _ = api_daemon
    code, body, headers = request(f"{base}/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("radio_station_buffered_seconds{mount=\"/alpha.mp3\"}", "radio_station_generated_seconds_total",
                 "radio_station_filled_seconds_total", "radio_station_reconnects_total",
                 "radio_station_encoder_restarts_total", "radio_engine_batch_size", "radio_engine_step_seconds",
                 "radio_engine_realtime_factor", "radio_model_memory_bytes{model=", "radio_model_loads_total 1.0",
                 "radio_model_batch_limit{model=", "radio_model_decode_state_bytes{model="):
        assert name in text, name
    assert "radio_model_slots_used{" not in text  # only a model on the static (GPU) path has slots
    code, body, headers = request(f"{base}/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<audio" in body or b"createElement(\"audio\")" in body


def test_non_loopback_api_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADIO_API_TOKEN", raising=False)
    args = build_parser().parse_args(["run", "--local-icecast", "--api", "0.0.0.0:8765"])
    with pytest.raises(ConfigError) as info:
        _daemon_config(args)
    assert "api.host" in str(info.value) and "token" in str(info.value)
    monkeypatch.setenv("RADIO_API_TOKEN", "secret")
    assert _daemon_config(args).api.token == "secret"
    cfg = tmp_path / "radio.yaml"
    cfg.write_text("api: {host: 10.1.2.3, port: 9000}\n")
    monkeypatch.delenv("RADIO_API_TOKEN")
    with pytest.raises(ConfigError) as info:
        load_daemon_config(cfg)
    assert f"{cfg}:1: api.host:" in str(info.value)
