"""Listener requests without servers: the queue's rules, and a request's place in a station's programme."""

from __future__ import annotations

import pytest

from radio.config import EngineConfig, PlaylistItem, RequestsConfig
from radio.config.requests import blocklist_patterns
from radio.engine import Engine
from radio.errors import RequestRefused
from radio.station.requests import MAX_CLIENTS, RequestQueue, listener_id
from radio.station.station import Station
from radio.tools.testing import SineModel

from ..conftest import station_config

ON = RequestsConfig(enabled=True, every=600.0, queue=3, duration=1.0, share=0.5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(queue: RequestQueue, prompt: object, client: str = "198.51.100.1", name: object = None) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        queue.submit(prompt, name, client)
    return info.value


def test_a_listener_waits_out_the_cooldown_and_the_queue_is_bounded() -> None:
    clock = Clock()
    q = RequestQueue(ON, clock)
    request, position = q.submit("  warm dub techno ", "Ann", "198.51.100.1")
    assert position == 1 and request.prompt == "warm dub techno" and request.title == "Requested by Ann: warm dub techno"
    again = refused(q, "more dub")
    assert again.reason == "cooldown" and again.retry_after == pytest.approx(600.0) and "10 min" in str(again)
    clock.now += 599
    assert refused(q, "more dub").retry_after == pytest.approx(1.0)
    clock.now += 1
    assert q.submit("more dub", None, "198.51.100.1")[1] == 2
    assert q.submit("jazz", None, "198.51.100.2")[1] == 3
    full = refused(q, "polka", client="198.51.100.3")
    assert full.reason == "queue_full" and full.retry_after and full.retry_after > 0
    assert len(q) == 3
    assert q.take() is request and q.submit("polka", None, "198.51.100.3")[1] == 3  # a place came free
    assert q.status() == {"enabled": True, "queued": 3, "played": 1,
                          "refused": {"invalid": 0, "blocked": 0, "cooldown": 2, "queue_full": 1}}


def test_hostile_text_is_refused_with_the_reason_and_costs_no_cooldown() -> None:
    q = RequestQueue(ON)
    for bad, where in (("", "prompt"), ("x" * 301, "prompt"), ("two\nlines", "prompt"), ("bell\x07", "prompt"),
                       ("lone \ud800 surrogate", "prompt"), (None, "prompt"), (["list"], "prompt"),
                       ({"a": 1}, "prompt")):
        err = refused(q, bad)
        assert err.reason == "invalid" and str(err).startswith(where + ":") and err.retry_after is None
    for bad_name in ("n" * 41, "a\x00b", 5):
        err = refused(q, "fine prompt", name=bad_name)
        assert err.reason == "invalid" and str(err).startswith("name:")
    assert q.submit("fine prompt", "", "198.51.100.1")[0].name is None  # an empty name is no name
    assert q.refused["invalid"] == 11


def test_the_blocklist_matches_words_and_patterns_in_any_form_without_echoing_them() -> None:
    patterns, problems = blocklist_patterns("# words\nBadword\nlo  fi\nre:sp[a4]m+\n\n")
    assert problems == []
    q = RequestQueue(RequestsConfig(enabled=True, blocklist=patterns, every=0.0, queue=100))
    for text in ("some BADWORD music", "ｂａｄｗｏｒｄ", "LO FI beats", "spammm rock", "sp4m"):
        err = refused(q, text)
        assert err.reason == "blocked" and "badword" not in str(err).lower() and "spam" not in str(err).lower()
    assert refused(q, "ok", name="badword").reason == "blocked"
    for fine in ("badwords are fine as another word", "lofi", "spa day"):
        q.submit(fine, None, "198.51.100.9")
    _, problems = blocklist_patterns("ok\nre:(unclosed\n")
    assert problems and problems[0][0] == 2 and "not a valid regular expression" in problems[0][1]


def test_a_listener_is_their_address_or_their_ipv6_network() -> None:
    assert listener_id("2001:db8:1:2:aaaa::1") == listener_id("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert listener_id("2001:db8:1:3::1") != listener_id("2001:db8:1:2::1")
    assert listener_id("::ffff:198.51.100.1") == "198.51.100.1"
    q = RequestQueue(ON)
    q.submit("one", None, "2001:db8:1:2::1")
    assert refused(q, "two", client="2001:db8:1:2::99").reason == "cooldown"


def test_the_cooldown_table_stays_bounded_under_a_flood_of_addresses() -> None:
    clock = Clock()
    q = RequestQueue(RequestsConfig(enabled=True, every=600.0, queue=1000), clock)
    for i in range(MAX_CLIENTS + 500):
        clock.now += 0.001
        try:
            q.submit("flood", None, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        except RequestRefused as exc:
            assert exc.reason == "queue_full"
    assert len(q) == 1000 and len(q._last) <= MAX_CLIENTS


def _station(requests: RequestsConfig = ON, **kw) -> tuple[Engine, Station, SineModel]:
    model = SineModel()
    cfg = EngineConfig(chunk_seconds=0.5, first_chunk_seconds=0.5, buffer_seconds=100)
    items = (PlaylistItem("first", "p1", 1.0), PlaylistItem("second", "p2", 1.0), PlaylistItem("third", "p3", 1.0))
    st = Station(station_config("/a.mp3", items=items, **kw), 32000, 50, 4, cfg, requests=requests)
    engine = Engine(model, cfg)
    engine.add_station(st)
    return engine, st, model


def test_a_request_plays_after_the_current_item_then_the_playlist_resumes_where_it_was() -> None:
    engine, st, model = _station()
    engine.run_once()  # "first" is on
    assert st.status()["next"] == "second"
    st.requests.submit("bright disco", None, "198.51.100.1")
    assert st.status()["next"] == "Requested: bright disco"  # what the web player and /status show as next
    for _ in range(7):
        engine.run_once()
    prompts = [c[0][0].prompt for c in model.calls]
    assert prompts == ["p1", "p1", "bright disco", "bright disco", "p2", "p2", "p3", "p3"]
    assert (st.status()["generating"], st.status()["next"]) == ("first", "second")
    blend = [c[0][0] for c in model.calls][2]
    assert blend.blend_from == "p1" and 0 < blend.blend < 1  # a segue through a prompt blend
    _, titles = st.read(int(round(st.buffered_seconds * 32000)) - st.reserve_samples)
    assert titles == ["first", "Requested: bright disco", "second", "third"]
    assert st.requests.status()["played"] == 1


def test_requests_take_at_most_their_share_of_airtime() -> None:
    engine, st, model = _station(RequestsConfig(enabled=True, every=0.0, queue=5, duration=1.0, share=0.5))
    engine.run_once()
    for i in range(3):
        st.requests.submit(f"request {i}", None, f"198.51.100.{i}")
    wait = [st.request_wait(p) for p in (1, 2, 3)]
    assert wait[0] < wait[1] < wait[2]
    for _ in range(13):
        engine.run_once()
    prompts = [c[0][0].prompt for c in model.calls][::2]  # one item = two chunks
    # each request is followed by as much programme as it took (share 0.5)
    assert prompts == ["p1", "request 0", "p2", "request 1", "p3", "request 2", "p1"]


def test_turning_requests_off_in_an_edit_drops_the_queue() -> None:
    engine, st, _ = _station()
    st.requests.submit("bright disco", None, "198.51.100.1")
    st.apply_config(station_config("/a.mp3", items=st.config.playlist, requests=(("enabled", False),)))
    assert not st.requests.enabled and len(st.requests) == 0
