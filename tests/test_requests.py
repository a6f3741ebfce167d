"""Listener requests end to end: a real icecast2, the tiny model, the HTTP API and the web player in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import listen, mount_info, request, run_daemon, wait_for, write_station
from .output.test_clients import chromium_page

pytestmark = pytest.mark.e2e
TOKEN = "t0ken-for-requests"
ITEMS = ["One", "Two", "Three"]


@pytest.fixture
def request_daemon(icecast, tiny_model_dir: Path, tmp_path: Path):
    st = tmp_path / "stations"
    st.mkdir()
    (st / "blocked.txt").write_text("# words this station refuses\nbadword\nre:spa+m\n", encoding="utf-8")
    write_station(st, "req.yaml", """
        name: Request Radio
        mount: /req.ogg
        format: vorbis
        requests: {enabled: true, every: 10m, queue: 2, duration: 5s, share: 1, blocklist: blocked.txt}
        playlist:
          - {title: One, prompt: calm piano, duration: 5s}
          - {title: Two, prompt: fast drums, duration: 5s}
          - {title: Three, prompt: soft pads, duration: 5s}
    """)
    write_station(st, "off.yaml", """
        name: No Requests
        mount: /off.mp3
        playlist: [{title: Only, prompt: dub, duration: 1m}]
    """)
    daemon = run_daemon(icecast, tiny_model_dir, st, api_port=0, token=TOKEN)
    try:
        wait_for(lambda: mount_info(icecast, "/req.ogg").get("title") in ITEMS, 30, message="on air")
        yield daemon, f"http://127.0.0.1:{daemon.api.port}", icecast
    finally:
        daemon.stop()


def ask(base: str, station: str, body: object, forwarded: str | None = None) -> tuple[int, dict, dict[str, str]]:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    code, raw, resp_headers = request(f"{base}/stations/{station}/requests", "POST",
                                      json.dumps(body).encode(), headers=headers)
    return code, json.loads(raw), resp_headers


def test_a_request_is_queued_plays_next_with_its_title_and_the_playlist_resumes(request_daemon) -> None:
    daemon, base, icecast = request_daemon
    code, answer, _ = ask(base, "req.ogg", {"prompt": "bright disco with strings", "name": "Ann"})
    assert code == 202, answer
    assert answer["request"]["position"] == 1 and answer["request"]["prompt"] == "bright disco with strings"
    assert 0 <= answer["request"]["plays_in_seconds"] < 60
    mine = answer["request"]["id"]

    # the same listener again: the cooldown, with Retry-After
    code, answer, headers = ask(base, "req.ogg", {"prompt": "more disco"})
    assert code == 429 and answer["reason"] == "cooldown" and 590 <= int(headers["Retry-After"]) <= 600
    # listeners behind the reverse proxy are told apart by the address the proxy appends (the last one)
    code, answer, _ = ask(base, "req.ogg", {"prompt": "slow blues", "name": "Bob"}, forwarded="203.0.113.5")
    assert code == 202 and answer["request"]["position"] == 2, answer
    bob = answer["request"]["id"]
    code, answer, headers = ask(base, "req.ogg", {"prompt": "polka"}, forwarded="198.51.100.7, 203.0.113.9")
    assert code == 429 and answer["reason"] == "queue_full" and int(headers["Retry-After"]) >= 1
    code, answer, _ = ask(base, "req.ogg", {"prompt": "polka"}, forwarded="203.0.113.5, 198.51.100.8")
    assert answer.get("reason") != "cooldown"  # a forged first entry is not who asks: .8 has not asked yet
    # the station's words: refused, without saying which word
    code, answer, _ = ask(base, "req.ogg", {"prompt": "some BADWORD music"}, forwarded="203.0.113.10")
    assert code == 400 and answer["reason"] == "blocked" and "badword" not in answer["error"].lower()
    code, answer, _ = ask(base, "req.ogg", {"prompt": "two\nlines"}, forwarded="203.0.113.11")
    assert code == 400 and answer["reason"] == "invalid" and answer["error"].startswith("prompt:")
    # requests off, or no such station: 404
    assert ask(base, "off.mp3", {"prompt": "dub"})[0] == 404
    assert ask(base, "nowhere", {"prompt": "dub"})[0] == 404
    assert request(f"{base}/stations/off.mp3/requests")[0] == 404

    queue = json.loads(request(f"{base}/stations/req.ogg/requests")[1])
    assert [(r["prompt"], r["name"], r["position"]) for r in queue["waiting"]][:1] == \
        [("bright disco with strings", "Ann", 1)] or queue["playing"]["id"] == mine
    # the operator takes Bob's out (token needed)
    assert request(f"{base}/stations/req.ogg/requests/{bob}", "DELETE")[0] == 401
    code, raw, _ = request(f"{base}/stations/req.ogg/requests/{bob}", "DELETE", token=TOKEN)
    assert code == 200 and bob not in raw.decode()
    assert request(f"{base}/stations/req.ogg/requests/{bob}", "DELETE", token=TOKEN)[0] == 404

    # at the listener: the request's title comes after an item, and the item after that one follows it
    titles: list[str] = []

    def seen_after_request() -> bool:
        title = mount_info(icecast, "/req.ogg").get("title")
        if title and (not titles or titles[-1] != title):
            titles.append(title)
        heard = "Requested by Ann: bright disco with strings"
        return heard in titles and titles.index(heard) < len(titles) - 1

    wait_for(seen_after_request, 90, 0.2, message="the request's title, then the playlist again")
    i = titles.index("Requested by Ann: bright disco with strings")
    assert i > 0 and titles[i - 1] in ITEMS and titles[i + 1] in ITEMS, titles
    assert ITEMS.index(titles[i + 1]) == (ITEMS.index(titles[i - 1]) + 1) % len(ITEMS), titles  # resumed
    audio = listen(f"{icecast.url}/req.ogg", 2.0)
    assert len(audio) >= 16000 and np.sqrt(np.mean(audio ** 2)) > 0.001

    status = json.loads(request(f"{base}/status")[1])
    req = next(s for s in status["stations"] if s["mount"] == "/req.ogg")["requests"]
    assert req["played"] >= 1 and req["refused"]["cooldown"] == 1 and req["refused"]["blocked"] == 1
    assert req["refused"]["queue_full"] >= 1 and req["refused"]["invalid"] == 1
    metrics = request(f"{base}/metrics")[1].decode()
    assert 'radio_station_requests_refused_total{mount="/req.ogg",reason="blocked"} 1.0' in metrics
    assert 'radio_station_requests_played_total{mount="/req.ogg"}' in metrics
    off = next(s for s in status["stations"] if s["mount"] == "/off.mp3")["requests"]
    assert off["enabled"] is False


def test_hostile_requests_never_stall_the_api_or_grow_the_queue(request_daemon) -> None:
    _daemon, base, _ = request_daemon
    codes: dict[int, int] = {}
    for i in range(300):  # one address, as fast as it can
        code = ask(base, "req.ogg", {"prompt": f"flood {i}"})[0]
        codes[code] = codes.get(code, 0) + 1
    assert codes.get(202) == 1 and codes.get(429) == 299, codes
    for i in range(200):  # many addresses (through the proxy)
        code = ask(base, "req.ogg", {"prompt": f"flood {i}"}, forwarded=f"10.0.{i // 250}.{i % 250}")[0]
        assert code in (202, 429)
    assert len(json.loads(request(f"{base}/stations/req.ogg/requests")[1])["waiting"]) <= 2
    for body in ({"prompt": "x" * 100_000}, {"prompt": "a", "name": "b" * 1000}, {"prompt": "\ud800"},
                 {"prompt": ""}, {"prompt": 5}, {"prompt": "ok", "extra": 1}):
        code, raw, _ = request(f"{base}/stations/req.ogg/requests", "POST", json.dumps(body).encode(),
                               headers={"X-Forwarded-For": "192.0.2.200"})
        assert code in (400, 413) and json.loads(raw)["error"], (body, raw[:200])
    code, raw, _ = request(f"{base}/stations/req.ogg/requests", "POST", b"[" * 5000 + b"]" * 5000)
    assert code in (400, 413) and json.loads(raw)["error"]
    assert request(f"{base}/status")[0] == 200  # the API still answers


def test_the_web_players_request_box_works_in_a_real_browser(request_daemon, tmp_path: Path) -> None:
    _daemon, base, _ = request_daemon
    with chromium_page(f"{base}/", tmp_path / "profile", size="1100,900") as tools:
        card = "document.getElementById('st-/req.ogg')"
        wait_for(lambda: tools.js(f"!!{card} && getComputedStyle({card}.querySelector('form.request')).display")
                 == "block", 20, message="the request box")
        assert tools.js("getComputedStyle(document.getElementById('st-/off.mp3').querySelector('form.request'))"
                        ".display") == "none"  # requests off: no box
        tools.js(f"{card}.querySelector('.prompt').value = 'warm dub techno with rain'")
        tools.js(f"{card}.querySelector('.who').value = 'Cleo'")
        tools.js(f"{card}.querySelector('form.request button').click()")
        wait_for(lambda: (tools.js(f"{card}.querySelector('.answer').textContent") or "").startswith("Queued"), 20,
                 message="the answer")
        assert "number 1" in tools.js(f"{card}.querySelector('.answer').textContent")
        wait_for(lambda: "warm dub techno with rain (Cleo)" in (tools.js(f"{card}.querySelector('.queue')"
                                                                          ".textContent") or ""), 20,
                 message="the queue on the page")
        tools.js(f"{card}.querySelector('.prompt').value = 'more please'")
        tools.js(f"{card}.querySelector('form.request button').click()")
        wait_for(lambda: tools.js(f"{card}.querySelector('.answer').classList.contains('error')"), 20,
                 message="the refusal")
        assert "one request every" in tools.js(f"{card}.querySelector('.answer').textContent")
        queued = json.loads(request(f"{base}/stations/req.ogg/requests")[1])
        assert any(r["prompt"] == "warm dub techno with rain" for r in queued["waiting"]) or \
            (queued["playing"] or {}).get("prompt") == "warm dub techno with rain"
