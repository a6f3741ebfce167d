"""`radio bench` runs end to end on the tiny shape (the small shape is for runs by hand)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_tiny_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "radio.cli", "bench", "--shape", "tiny", "--mounts", "1,3,4",
                           "--frames", "20", "--chunks", "2", "--proto-steps", "1", "--weights", "auto,int8",
                           "--quality", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "audio s/s" in proc.stdout and "prototype" in proc.stdout
    report = json.loads(out.read_text())
    scenarios = {(r["scenario"], r["dtype"], r["mounts"]) for r in report["results"]}
    assert {("prototype", "float32", 3), ("generate", "float32", 3), ("ours", "float32", 3)} <= scenarios
    for r in report["results"]:
        assert r["audio_per_wall"] > 0 and r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0
        if r["scenario"] == "ours":
            assert r["ttfa_seconds"] is not None and r["ttfa_seconds"] > 0
    ratios = report["ratios"]
    assert "ours_float32_vs_prototype_at_3_mounts" in ratios
    assert "batching_efficiency_float32_4_vs_1" in ratios
    # figures are computed, finite and positive; how fast anything ran is for `radio bench` to report, not to test
    assert all(math.isfinite(v) and v > 0 for v in ratios.values() if isinstance(v, (int, float))), ratios
    for r in report["results"]:
        if r["scenario"] == "ours":
            assert r["reset_seconds"] is not None and r["reset_seconds"] > 0  # a prefill, timed
    assert set(report["bare_decode_step_seconds"]) == set(report["raw_decode_step_seconds"])
    assert report["machine"]["cores"] >= 1
    ours = {r["dtype"] for r in report["results"] if r["scenario"] == "ours"}
    assert set(report["loaded_rss_mb"]) == ours and all(mb > 0 for mb in report["loaded_rss_mb"].values())
    assert "RSS right after loading" in proc.stdout
    assert {r["weights"] for r in report["results"] if r["scenario"] == "ours"} >= {"int8"}
    q = report["weight_quality"]["int8"]
    assert 0 < q["logits_rel_error"] < 1 and 0 < q["top1_agreement"] <= 1 and q["frames"] > 0
    assert (tmp_path / "cache" / "radio" / "test-models" / "tiny-seed0" / "config.json").exists()


def test_bench_splits_the_static_steps_time_into_its_parts(tmp_path: Path) -> None:
    """On the static path a chunk's step time is split into the layers, sampling, the noise draw and the rest
    (Python, launches, the copy back), so a missed target says where the time goes."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "radio.cli", "bench", "--shape", "tiny", "--mounts", "2",
                           "--scenarios", "ours", "--decoder", "static", "--dtypes", "float32", "--frames", "20",
                           "--chunks", "2", "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    parts = r["breakdown"]
    assert list(parts)[:5] == ["steps", "layers", "sampling", "noise", "other"]
    assert parts["layers"] > 0 and parts["sampling"] > 0
    assert abs(parts["layers"] + parts["sampling"] + parts["noise"] + parts["other"] - parts["steps"]) < 1e-3
    assert set(r["step_anatomy"]) == {"step", "sampling", "noise"}
    assert "steps=" in proc.stdout and "(layers=" in proc.stdout


@pytest.mark.e2e
def test_bench_audience_spends_model_time_on_the_listened_stations_only(tiny_model_dir: Path) -> None:
    """The audience scenario: a real daemon with a real listener on one of three stations."""
    from radio.tools.bench import bench_audience

    # The window must outlast a full buffer's slack: a listened station steps when it falls below its 12 s
    # target and may hold up to ~20 s (target + a ride-along chunk + its own chunk), so 3 s could see no step.
    r = bench_audience(str(tiny_model_dir), stations=3, listened=1, seconds=10.0, progress=lambda m: None)
    assert r["realtime_per_listened_station"] > 0 and r["realtime_per_idle_station"] == 0, r
    assert r["wake_seconds"] is not None and r["wake_seconds"] > 0, r
    assert r["first_fresh_bytes_seconds"] is not None and r["first_fresh_bytes_seconds"] > 0, r
