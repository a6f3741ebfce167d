"""``radio soak``: run the whole daemon for a long time and report what operators worry about.

Starts a private icecast2 and N generated stations (formats rotating mp3 / vorbis / opus), lets them play for
``--minutes``, and reports per mount: underruns (times the generator fell behind), filled seconds, drift between
media time and wall time, reconnects, encoder restarts; and the process's memory: RSS sampled every
``sample_every`` seconds, and its *slope* after the first ``settle`` minutes (least squares over each minute's
lowest sample, MB per hour: a chunk's working buffers come and go), which is what a run of weeks cares about
(a percentage over half an hour cannot see a steady leak). ``trace`` adds the allocation sites (tracemalloc)
and the object types (gc) that grew most between the settle point and the end. ``churn`` creates, edits and
deletes a station file, one step a minute, and judges too the floors of the minutes the churned station is
gone: memory must come back to its level when a station leaves, cycle after cycle.
Targets (tiny model): 0 underruns, |drift| <= 1 s, RSS slope <= 2 MB per hour.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
import tracemalloc
from collections import Counter, deque
from pathlib import Path
from typing import Any

from .bench import RssSampler
from ..config import ApiConfig, DaemonConfig, EngineConfig, IcecastConfig, load_stations
from ..daemon import Daemon
from ..native import trim
from ..output.local import LocalIcecast

logger = logging.getLogger(__name__)

FORMATS = (("mp3", ".mp3"), ("vorbis", ".ogg"), ("opus", ".opus"))


def write_soak_stations(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        fmt, ext = FORMATS[i % len(FORMATS)]
        (directory / f"soak{i}.yaml").write_text(
            f"name: Soak {i}\nmount: /soak{i}{ext}\nformat: {fmt}\norder: shuffle\nplaylist:\n"
            f"  - {{title: Soak {i} A, prompt: soak test {i} first, duration: 40s}}\n"
            f"  - {{title: Soak {i} B, prompt: soak test {i} second, duration: 30s, transition: {{blend: 5s}}}}\n"
            f"  - {{title: Soak {i} C, prompt: soak test {i} third, duration: 50s}}\n",
            encoding="utf-8")


SLOPE_TARGET_MB_PER_HOUR = 2.0
CHURN_EVERY = 60.0  # seconds between churn steps
CHURN_STEPS = 3  # create, edit, delete


def rss_slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per hour."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 3600.0 * sum((t - mt) * (r - mr) for t, r in samples) / var if var else 0.0


def floor_samples(samples: list[tuple[float, float]], period: float = 60.0) -> list[tuple[float, float]]:
    """Each ``period``'s lowest sample. A chunk in flight holds its working buffers for a moment (with 16
    stations single samples swing by 100 MB), so a single sample says little; what a leak raises is the floor."""
    floors: dict[int, tuple[float, float]] = {}
    counts: Counter[int] = Counter()
    for t, r in samples:
        k = int(t // period)
        counts[k] += 1
        if k not in floors or r < floors[k][1]:
            floors[k] = (t, r)
    # A period with few samples (the run's last, cut short: often one sample, taken mid-chunk) has no floor to
    # speak of; it would weigh as much as a whole minute at the end of the fit.
    full = max(counts.values(), default=0)
    return [floors[k] for k in sorted(floors) if 2 * counts[k] >= full]


def churn_floors(floors: list[tuple[float, float]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Split minute floors by whether the churned station was on air: churn step ``s`` runs at minute ``s + 1``
    (steps 0, 1, 2: create, edit, delete), so the station is gone in minutes 0 and 3, 6, 9, ... and on air in
    the others. The minute a station goes still holds it for a moment; its floor is after it left."""
    gone: list[tuple[float, float]] = []
    present: list[tuple[float, float]] = []
    for t, r in floors:
        (gone if int(t // CHURN_EVERY) % CHURN_STEPS == 0 else present).append((t, r))
    return gone, present


def _type_counts() -> Counter[str]:
    """Live objects by type, for the daemon's own types and the containers that usually leak."""
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        module = t.__module__ if isinstance(t.__module__, str) else ""
        if module.startswith("radio") or t in (dict, list, tuple, bytes, deque):
            counts[f"{module}.{t.__qualname__}"] += 1
    return counts


def _churn_station(directory: Path, step: int) -> None:
    """Every minute, one of: create a station file, edit it, delete it (step 0 creates)."""
    path = directory / "churn.yaml"
    if step % CHURN_STEPS == CHURN_STEPS - 1:
        path.unlink(missing_ok=True)
        return
    path.write_text(f"name: Churn\nmount: /churn.mp3\nplaylist:\n  - {{title: Churn {step}, prompt: churn test "
                    f"{step}, duration: 30s}}\n", encoding="utf-8")


def run_soak(model: str, minutes: float, stations: int, warmup: float = 60.0,
             report_every: float = 60.0, settle_minutes: float | None = None, sample_every: float = 2.0,
             trace: bool = False, churn: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="radio-soak-"))
    write_soak_stations(workdir / "stations", stations)
    configs, problems = load_stations([workdir / "stations"])
    if problems:
        raise RuntimeError("; ".join(problems))
    with LocalIcecast(min_sources=stations + 4) as server:
        cfg = DaemonConfig(stations_dir=str(workdir / "stations"), model=model, device="auto", dtype="auto",
                           icecast=IcecastConfig(host=server.host, port=server.port, password=server.source_password),
                           engine=EngineConfig(), api=ApiConfig(enabled=False))  # two soaks may run at once
        daemon = Daemon(cfg, configs)
        daemon.start()
        try:
            t_end = time.monotonic() + warmup + minutes * 60
            time.sleep(min(warmup, max(0.0, t_end - time.monotonic())))
            rss_start = RssSampler.rss()
            under_start = {k: s.underruns for k, s in daemon.stations.items()}
            max_drift = {k: 0.0 for k in daemon.stations}
            t0 = time.monotonic()
            next_report = t0 + report_every
            settle = settle_minutes if settle_minutes is not None else min(10.0, minutes / 3)
            settle_at = t0 + settle * 60
            samples: list[tuple[float, float]] = []
            next_sample = t0
            next_churn = t0 + CHURN_EVERY
            churn_step = 0
            snapshot = counts = None
            if trace:
                tracemalloc.start(10)
            while time.monotonic() < t_end:
                time.sleep(1.0)
                now = time.monotonic()
                if now >= next_sample:
                    next_sample += sample_every
                    if now >= settle_at:
                        samples.append((now - t0, RssSampler.rss() / 2**20))
                if trace and snapshot is None and now >= settle_at:
                    gc.collect()
                    snapshot, counts = tracemalloc.take_snapshot(), _type_counts()
                if churn and now >= next_churn:
                    next_churn += CHURN_EVERY
                    _churn_station(workdir / "stations", churn_step)
                    churn_step += 1
                    daemon.reload()
                for k, m in daemon.mounts.items():
                    if m.started_wall is not None and k in max_drift:  # the churned station is not judged
                        drift = m.media_seconds - (time.monotonic() - m.started_wall)
                        max_drift[k] = max(max_drift[k], abs(drift))
                if time.monotonic() >= next_report:
                    next_report += report_every
                    trim()  # as `radio run` does once a minute
                    logger.info("soak: %.0f min left, RSS %.0f MB", (t_end - time.monotonic()) / 60,
                                RssSampler.rss() / 2**20)
            rss_end = RssSampler.rss()
            growth_sites: list[str] = []
            growth_types: list[str] = []
            if trace and snapshot is not None and counts is not None:
                gc.collect()
                end_snapshot = tracemalloc.take_snapshot()
                # By line first: a leak spread over many call paths (a C extension called from one line, say)
                # adds up there; then the fullest call paths.
                by_line = end_snapshot.compare_to(snapshot, "lineno")
                growth_sites = [f"{d.size_diff / 1024:+.0f} KiB {d.count_diff:+d} blocks at {d.traceback[0]}"
                                for d in sorted(by_line, key=lambda d: d.size_diff, reverse=True)[:10]]
                diff = end_snapshot.compare_to(snapshot, "traceback")
                growth_sites += [f"{d.size_diff / 1024:+.0f} KiB {d.count_diff:+d} blocks: "
                                 f"{' <- '.join(str(f) for f in list(d.traceback)[::-1][:4])}"
                                 for d in sorted(diff, key=lambda d: d.size_diff, reverse=True)[:5]]
                now_counts = _type_counts()
                growth_types = [f"{name}: {counts.get(name, 0)} -> {n}" for name, n in
                                sorted(now_counts.items(), key=lambda kv: kv[1] - counts.get(kv[0], 0),
                                       reverse=True)[:10] if n > counts.get(name, 0)]
                tracemalloc.stop()
            rows: list[dict[str, Any]] = []
            for k, st in daemon.stations.items():
                if k.endswith("churn.yaml"):
                    continue
                s, ms = st.status(), daemon.mounts[k].status()
                rows.append({"mount": st.mount, "format": st.config.format,
                             "underruns": st.underruns - under_start.get(k, 0),
                             "filled_seconds": s["filled_seconds"], "max_drift_seconds": round(max_drift[k], 3),
                             "reconnects": ms["reconnects"], "encoder_restarts": ms["encoder_restarts"]})
        finally:
            daemon.stop()
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start else 0.0
    floors = floor_samples(samples)
    slope = rss_slope(floors)
    report: dict[str, Any] = {
        "minutes": minutes, "stations": stations, "model": model, "mounts": rows, "churn": churn,
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_percent": round(growth, 2), "settle_minutes": settle,
        "rss_slope_mb_per_hour": round(slope, 2),
        "rss_slope_all_samples_mb_per_hour": round(rss_slope(samples), 2),
        "rss_samples": [[round(t), round(r, 1)] for t, r in samples],
        "rss_floors": [[round(t), round(r, 1)] for t, r in floors],
        "growth_sites": growth_sites, "growth_types": growth_types,
    }
    report["targets"] = {
        "underruns == 0": all(r["underruns"] == 0 for r in rows),
        "|drift| <= 1 s": all(abs(r["max_drift_seconds"]) <= 1.0 for r in rows),
        f"RSS slope <= {SLOPE_TARGET_MB_PER_HOUR:g} MB/h after {settle:g} min": slope <= SLOPE_TARGET_MB_PER_HOUR,
    }
    if churn:
        gone, present = churn_floors(floors)
        gone_slope = rss_slope(gone)
        report["churn_floors"] = {
            "gone_mb": [round(r, 1) for _, r in gone], "on_air_mb": [round(r, 1) for _, r in present],
            "gone_slope_mb_per_hour": round(gone_slope, 2)}
        report["targets"][f"RSS slope with the churned station gone <= {SLOPE_TARGET_MB_PER_HOUR:g} MB/h"] = (
            len(gone) >= 2 and gone_slope <= SLOPE_TARGET_MB_PER_HOUR)
    return report


def format_soak(report: dict[str, Any]) -> str:
    lines = [f"radio soak: {report['stations']} stations, {report['minutes']:g} min, model={report['model']}", "",
             f"{'mount':<14} {'format':<7} {'underruns':>9} {'filled s':>9} {'drift s':>8} {'reconn':>7} "
             f"{'enc rst':>8}"]
    for r in report["mounts"]:
        lines.append(f"{r['mount']:<14} {r['format']:<7} {r['underruns']:>9} {r['filled_seconds']:>9.1f} "
                     f"{r['max_drift_seconds']:>8.2f} {r['reconnects']:>7} {r['encoder_restarts']:>8}")
    lines.append("")
    lines.append(f"RSS {report['rss_start_mb']} MB -> {report['rss_end_mb']} MB ({report['rss_growth_percent']:+.1f} %); "
                 f"slope after {report['settle_minutes']:g} min: {report['rss_slope_mb_per_hour']:+.2f} MB/h "
                 f"(each minute's lowest of {len(report['rss_samples'])} samples; all samples: "
                 f"{report['rss_slope_all_samples_mb_per_hour']:+.2f} MB/h)")
    churned = report.get("churn_floors")
    if churned:
        lines.append(f"churn: lowest RSS of each minute the station was gone: "
                     f"{', '.join(f'{r:g}' for r in churned['gone_mb'])} MB "
                     f"(slope {churned['gone_slope_mb_per_hour']:+.2f} MB/h); "
                     f"on air: {', '.join(f'{r:g}' for r in churned['on_air_mb'])} MB")
    for title, key in (("allocation sites that grew most (tracemalloc)", "growth_sites"),
                       ("object types that grew most (gc)", "growth_types")):
        if report.get(key):
            lines.append(f"{title}:")
            lines.extend(f"  {line}" for line in report[key])
    for target, ok in report["targets"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {target}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
