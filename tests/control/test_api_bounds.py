"""The API server on its own (a fake controller, no daemon): forwarding headers and the bounded server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from radio.control.api import ApiServer
from radio.config import ApiConfig

from ..conftest import request


class Recorder:
    def __init__(self) -> None:
        self.prompts: list[tuple] = []

    def status(self) -> dict[str, Any]:
        return {"stations": [{"mount": "/a.mp3", "now_playing": "bad \ud800 title", "generated_seconds": 1.0}],
                "engine": {}}

    def set_prompt(self, *args: Any) -> dict[str, Any]:
        self.prompts.append(args)
        return {"ok": True}

    def skip(self, station_id: str) -> None:
        return None

    def set_model(self, station_id: str, model: str, dtype: str | None) -> None:
        return None

    def request_reload(self) -> None:
        pass

    def request(self, station_id: str, prompt: object, name: object, client: str) -> None:
        return None  # no station here takes requests

    def requests(self, station_id: str) -> None:
        return None

    def remove_request(self, station_id: str, request_id: str) -> None:
        return None


@pytest.fixture
def server():
    controller = Recorder()
    api = ApiServer(ApiConfig(port=0), controller)  # loopback, no token
    api.start()
    try:
        yield f"http://127.0.0.1:{api.port}", controller
    finally:
        api.stop()


@pytest.mark.parametrize("header,value", [
    ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", ""), ("X-Real-IP", "203.0.113.9"), ("X-Real-IP", ""),
    ("Forwarded", "for=203.0.113.9"), ("X-Forwarded-Host", "radio.example"), ("X-Forwarded-Proto", "https"),
    ("x-forwarded-for", "1.2.3.4"), ("Via", "1.1 proxy"),
])
def test_any_forwarding_header_means_proxied_and_writes_need_a_token(server, header: str, value: str) -> None:
    base, controller = server
    code, body, _ = request(f"{base}/stations/a.mp3/prompt", "POST", b'{"prompt": "x"}', headers={header: value})
    assert code == 403 and "token" in json.loads(body)["error"]
    assert controller.prompts == []
    code, _, _ = request(f"{base}/stations/a.mp3/prompt", "POST", b'{"prompt": "x"}')  # direct: allowed
    assert code == 200 and len(controller.prompts) == 1


def test_status_and_metrics_survive_text_that_is_not_unicode(server) -> None:
    base, _ = server
    code, body, _ = request(f"{base}/status")
    assert code == 200 and json.loads(body)["stations"][0]["mount"] == "/a.mp3"
    code, body, _ = request(f"{base}/metrics")
    assert code == 200 and b'radio_station_generated_seconds_total{mount="/a.mp3"} 1.0' in body


def test_request_routes_are_told_apart_from_mounts_named_like_them() -> None:
    from radio.control.api import _request_route

    assert _request_route("/stations/lofi.mp3/requests") == ("lofi.mp3", None)
    assert _request_route("/stations/lofi.mp3/requests/") == ("lofi.mp3", None)
    assert _request_route("/stations/live/lofi.mp3/requests/abc") == ("live/lofi.mp3", "abc")
    assert _request_route("/stations/requests.mp3/prompt") is None  # a station called "requests..." keeps its prompt
    assert _request_route("/stations/requests") is None
    assert _request_route("/status") is None


def test_request_endpoints_on_a_server_without_them_are_404_and_unknown_methods_405(server) -> None:
    base, _ = server
    code, raw, _ = request(f"{base}/stations/a.mp3/requests", "POST", json.dumps({"prompt": "x"}).encode())
    assert code == 404 and "takes requests" in json.loads(raw)["error"]
    assert request(f"{base}/stations/a.mp3/requests", "PUT", b"{}")[0] == 405
