"""``radio soak``: run the whole daemon for a long time and report what operators worry about.

Starts a private icecast2 and N generated stations (formats rotating mp3 / vorbis / opus), lets them play for
``--minutes``, and reports per mount: underruns (times the generator fell behind), filled seconds, drift between
media time and wall time, reconnects, encoder restarts; and the process's RSS growth after warm-up.
Targets (tiny model): 0 underruns, |drift| <= 1 s, RSS growth <= 5 %.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench import RssSampler
from ..config import DaemonConfig, EngineConfig, IcecastConfig, load_stations
from ..daemon import Daemon
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


def run_soak(model: str, minutes: float, stations: int, warmup: float = 60.0,
             report_every: float = 60.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="radio-soak-"))
    write_soak_stations(workdir / "stations", stations)
    configs, problems = load_stations([workdir / "stations"])
    if problems:
        raise RuntimeError("; ".join(problems))
    with LocalIcecast(min_sources=stations + 4) as server:
        cfg = DaemonConfig(stations_dir=str(workdir / "stations"), model=model, device="auto", dtype="auto",
                           icecast=IcecastConfig(host=server.host, port=server.port, password=server.source_password),
                           engine=EngineConfig())
        daemon = Daemon(cfg, configs)
        daemon.start()
        try:
            t_end = time.monotonic() + warmup + minutes * 60
            time.sleep(min(warmup, max(0.0, t_end - time.monotonic())))
            rss_start = RssSampler.rss()
            under_start = {k: s.underruns for k, s in daemon.stations.items()}
            max_drift = {k: 0.0 for k in daemon.stations}
            next_report = time.monotonic() + report_every
            while time.monotonic() < t_end:
                time.sleep(1.0)
                for k, m in daemon.mounts.items():
                    if m.started_wall is not None:
                        drift = m.media_seconds - (time.monotonic() - m.started_wall)
                        max_drift[k] = max(max_drift[k], abs(drift))
                if time.monotonic() >= next_report:
                    next_report += report_every
                    logger.info("soak: %.0f min left, RSS %.0f MB", (t_end - time.monotonic()) / 60,
                                RssSampler.rss() / 2**20)
            rss_end = RssSampler.rss()
            rows = []
            for k, st in daemon.stations.items():
                s, m = st.status(), daemon.mounts[k].status()
                rows.append({"mount": st.mount, "format": st.config.format,
                             "underruns": st.underruns - under_start.get(k, 0),
                             "filled_seconds": s["filled_seconds"], "max_drift_seconds": round(max_drift[k], 3),
                             "reconnects": m["reconnects"], "encoder_restarts": m["encoder_restarts"]})
        finally:
            daemon.stop()
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start else 0.0
    report = {"minutes": minutes, "stations": stations, "model": model, "mounts": rows,
              "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
              "rss_growth_percent": round(growth, 2)}
    report["targets"] = {
        "underruns == 0": all(r["underruns"] == 0 for r in rows),
        "|drift| <= 1 s": all(abs(r["max_drift_seconds"]) <= 1.0 for r in rows),
        "RSS growth <= 5 %": growth <= 5.0,
    }
    return report


def format_soak(report: dict[str, Any]) -> str:
    lines = [f"radio soak: {report['stations']} stations, {report['minutes']:g} min, model={report['model']}", "",
             f"{'mount':<14} {'format':<7} {'underruns':>9} {'filled s':>9} {'drift s':>8} {'reconn':>7} "
             f"{'enc rst':>8}"]
    for r in report["mounts"]:
        lines.append(f"{r['mount']:<14} {r['format']:<7} {r['underruns']:>9} {r['filled_seconds']:>9.1f} "
                     f"{r['max_drift_seconds']:>8.2f} {r['reconnects']:>7} {r['encoder_restarts']:>8}")
    lines.append("")
    lines.append(f"RSS {report['rss_start_mb']} MB -> {report['rss_end_mb']} MB ({report['rss_growth_percent']:+.1f} %)")
    for target, ok in report["targets"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {target}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
