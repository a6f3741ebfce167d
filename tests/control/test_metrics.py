"""/metrics is read from the status records' declarations: every exported field appears, with its value."""

from __future__ import annotations

from radio.control.api import _metrics
from radio.engine import EngineStatus
from radio.output.mount import MountStatus
from radio.pool import ModelStatus, PoolStatus
from radio.station.station import StationStatus
from radio.status import exported_fields


def test_every_exported_status_field_is_a_metric_with_its_value() -> None:
    per_station = [*exported_fields(StationStatus), *exported_fields(MountStatus)]
    engine_fields = exported_fields(EngineStatus)
    assert len(per_station) >= 15 and len(engine_fields) >= 10
    names = [m.name for _, m in per_station + engine_fields]
    assert len(names) == len(set(names))  # one declaration per metric
    station = {key: 3 for key, _ in per_station} | {"mount": "/a.mp3", "listeners": 2}
    engine = {key: 5 for key, _ in engine_fields}
    text = _metrics({"stations": [station], "engine": engine, "models": {}}).decode()
    for _, metric in per_station:
        sample = metric.name + ("_total" if metric.counter else "")
        assert f'{sample}{{mount="/a.mp3"}} 3.0' in text, sample
        assert f"# HELP {metric.name}" in text
    for _, metric in engine_fields:
        assert f"{metric.name}{'_total' if metric.counter else ''} 5.0" in text, metric.name
    assert 'radio_station_listeners{mount="/a.mp3"} 2.0' in text
    # a station's requests, while it takes them: the queue, the played and the refused by reason
    requests = {"enabled": True, "queued": 1, "played": 2, "refused": {"cooldown": 4, "blocked": 0}}
    text = _metrics({"stations": [station | {"requests": requests}], "engine": engine, "models": {}}).decode()
    assert 'radio_station_requests_queued{mount="/a.mp3"} 1.0' in text
    assert 'radio_station_requests_played_total{mount="/a.mp3"} 2.0' in text
    assert 'radio_station_requests_refused_total{mount="/a.mp3",reason="cooldown"} 4.0' in text
    text = _metrics({"stations": [station | {"requests": requests | {"enabled": False}}], "engine": engine,
                     "models": {}}).decode()
    assert "radio_station_requests_queued{" not in text
    # a value the station does not know (None) is left out, not exported as 0
    text = _metrics({"stations": [station | {"listeners": None}], "engine": engine, "models": {}}).decode()
    assert 'radio_station_listeners{mount="/a.mp3"}' not in text


def test_every_exported_model_and_pool_field_is_a_metric() -> None:
    model = {key: 7 for key, _ in exported_fields(ModelStatus)} | {"name": "m", "dtype": "auto", "device": "cpu"}
    pool = {key: 9 for key, _ in exported_fields(PoolStatus)} | {"models": [model]}
    text = _metrics({"stations": [], "engine": {}, "models": pool}).decode()
    for _, metric in exported_fields(ModelStatus):
        assert f'{metric.name}{{model="m (auto)"}} 7.0' in text, metric.name
    for _, metric in exported_fields(PoolStatus):
        assert f"{metric.name}{'_total' if metric.counter else ''} 9.0" in text, metric.name

